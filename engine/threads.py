"""Thread policy: how many CPU threads torch and ONNX Runtime use, decided once, at the edge.

Torch's default (one OpenMP thread per core, each CLI and DataLoader worker alike) is catastrophic
on a shared or busy machine. Measured on 2 cores shared with a training run: ``torch.exp`` in the
sampler step took 7.7-53 ms with 2 threads right after an ONNX Runtime call (an OpenMP region woken
after ORT's own pool) against 0.12 ms with 1; training fell to 0.8 samples/s with 2 threads against
22.5 with ``OMP_NUM_THREADS=1``. So every entry point calls :func:`apply` before any parallel work.

The policy, for ``threads`` (``--threads``; None = auto):

* auto: ``OMP_NUM_THREADS`` when the user set it, else the cores this process may run on
  (``os.sched_getaffinity``) minus the ones other processes keep busy (the 1-minute load average,
  rounded, capped by the tasks runnable right now: :func:`busy_cores`), at least 1; split between the
  ranks of a ``torchrun`` node (``LOCAL_WORLD_SIZE``).
* ``runtime``: the engine that runs the UNet gets the threads. When ONNX Runtime or TensorRT runs the
  UNet, torch only does the sampler arithmetic on tiny tensors: 1 thread (no pool to wake).
* ``training``: torch gets the threads; DataLoader workers 1 each (:func:`worker_init`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadPolicy:
    """Threads for torch's intra-op pool, torch's inter-op pool and ONNX Runtime's intra-op pool."""

    torch: int
    interop: int = 1
    onnxruntime: int = 1
    why: str = ""

    def __post_init__(self) -> None:
        for name in ("torch", "interop", "onnxruntime"):
            if getattr(self, name) < 1:
                raise ValueError(f"thread counts must be >= 1, got {name}={getattr(self, name)}")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and ``taskset`` restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


LOADAVG = "/proc/loadavg"  # Linux: "load1 load5 load15 running/total lastpid"


def runnable_others(path: str | None = None, samples: int = 5, gap_s: float = 0.02,
                    enough: int | None = None) -> int | None:
    """Tasks other than this one that are runnable right now: the most of ``samples`` readings of
    ``/proc/loadavg``'s running count (``path``; default :data:`LOADAVG`), ``gap_s`` apart, less this
    process's own reading thread (None where the file is missing or unreadable). Stops reading once the
    count reaches ``enough`` (a caller that only needs to know whether it is that high waits no longer)."""
    most = None
    for i in range(samples):
        try:
            with open(path or LOADAVG) as f:
                running = int(f.read().split()[3].split("/")[0]) - 1
        except (OSError, ValueError, IndexError):
            return None
        most = running if most is None else max(most, running)
        if (enough is not None and most >= enough) or i + 1 == samples:
            break
        time.sleep(gap_s)
    return max(0, most)


def busy_cores() -> int:
    """Cores other processes keep busy: the 1-minute load average, rounded, capped by the tasks runnable
    right now (0 where unknown). The cap matters for chained jobs: a run that just ended leaves the load
    average near its thread count for a minute or more, and the next job alone on the machine would take
    too few threads for its whole run (measured: a ``dh-train rollouts`` started right after a 2-thread
    ``fit`` on 2 cores took 1 thread, load 2)."""
    try:
        load = round(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0
    if load == 0:  # nothing to cap: start-up reads no more
        return 0
    now = runnable_others(enough=load)  # on a busy machine the first reading usually reaches the load
    return load if now is None else min(load, now)


def auto_threads(ranks: int = 1) -> tuple[int, str]:
    """The auto thread count for one process of ``ranks`` on this node, and why (for the log)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), f"OMP_NUM_THREADS={env}"
    cores, busy = usable_cores(), busy_cores()
    free = max(1, cores - busy)
    n = max(1, free // max(1, ranks))
    return n, f"{cores} cores, load {busy}" + (f", {ranks} ranks" if ranks > 1 else "")


def parse_threads(value: int | None) -> int | None:
    """``--threads``: None or 0 = auto, else a positive count (ValueError otherwise)."""
    if value is None or value == 0:
        return None
    if value < 0:
        raise ValueError(f"--threads must be 0 (auto) or a positive count, got {value}")
    return int(value)


def runtime_policy(threads: int | None = None, *, unet_on_torch: bool = False) -> ThreadPolicy:
    """Policy of ``dh-run``: ``threads`` (None = auto) for the UNet's engine, torch 1 unless it runs the UNet."""
    n, why = (threads, "--threads") if threads else auto_threads()
    return ThreadPolicy(torch=n if unet_on_torch else 1, interop=1, onnxruntime=n, why=why)


def training_policy(threads: int | None = None) -> ThreadPolicy:
    """Policy of ``dh-train``: torch gets the threads of this rank (None = auto, split over the node's ranks)."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    n, why = (threads, "--threads") if threads else auto_threads(ranks)
    return ThreadPolicy(torch=n, interop=1, onnxruntime=1, why=why)


def apply(policy: ThreadPolicy) -> ThreadPolicy:
    """Set torch's pools to ``policy`` (the inter-op pool only before any parallel work has run)."""
    import torch

    torch.set_num_threads(policy.torch)
    if torch.get_num_interop_threads() != policy.interop:
        try:
            torch.set_num_interop_threads(policy.interop)
        except RuntimeError:  # parallel work already ran: the pool is fixed for this process
            log.debug("inter-op threads already fixed at %d", torch.get_num_interop_threads())
    log.info("threads: torch %d, onnxruntime %d (%s)", policy.torch, policy.onnxruntime, policy.why or "given")
    return policy


def worker_init(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: one torch thread per worker process (they decode, not compute)."""
    import torch

    torch.set_num_threads(1)
