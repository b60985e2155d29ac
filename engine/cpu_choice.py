"""What ``--device auto`` runs a bundle with on a CPU: the fastest engine that passed quality parity for that model.

A reduced precision is offered only for a model it was measured on (keyed by the sha256 of its ``unet.onnx``)
and only when the held-out quality study scored it within the fp32 model's seed spread
(``benchmarks/heldout_study.py --backend/--precision``); the speed order is ``dh-bench --compare``'s. Anything
else, or an engine this machine cannot run (no openvino, a CPU without bf16, a bundle without
``unet_int8.onnx``), falls through to the next, and finally to ONNX Runtime fp32. ``--device cpu`` or an
explicit ``--backend`` skips the choice.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FALLBACK = ("onnxruntime", "fp32")


@dataclass(frozen=True)
class Measured:
    """Engines that passed parity for one model, fastest first, and where the numbers are."""

    engines: tuple[tuple[str, str], ...]
    evidence: str


# unet.onnx sha256 -> what passed. Filled from measurements only (see the module docstring).
# Measured but not entered (2026-12-07): the talking demo (unet.onnx 47f8868d..., 0d922b1) passed the held-out
# study at seeds 0-4 with OpenVINO int8 and bf16 (benchmarks/results/precision_parity_2026-12-07_s0-4.md); per frame
# at 10 calls, 2 cores, load 2.7-3.0: int8 171 ms, bf16 204 ms, ONNX Runtime fp32 335 ms (cpu_engines_2026-12-07_t2).
# The segfault that kept it out is understood and fixed (a second ov.Core in the process; openvino_.core()). Entered,
# dh-serve on the demo (device auto) broke its own promise that a finished job's video equals a render of the same
# request: tests/test_serve_production.py::test_a_render_job_is_submitted_polled_and_fetched differed by a few pixel
# levels when run after test_replicas_sharing_a_video_dir_serve_each_others_links (two servers over one worker;
# alone, or after any other test, it passed; every test passed with ONNX Runtime). The frames were equal (the
# stream, the library and both renders); the mp4s were not: with OpenVINO loaded in that process, libx264 (PyAV)
# encoded the same frames to different bytes from one thread to another and even twice in one thread (also with
# x264 threads fixed at 1); without OpenVINO every encode was equal. OpenVINO's own calls were checked
# deterministic (repeated, from fresh threads, under load, unaligned inputs). Cause not found. Enter it once that
# is understood:
# "47f8868d905cb3570ad6a2d8d82a97b192513338453e41debf0cbdc1149fefb3":
#     Measured((("openvino", "int8"), ("openvino", "bf16")), "held-out parity at seeds 0-4"),
PASSED: dict[str, Measured] = {}


def choose(bundle: Path) -> tuple[str, str]:
    """(backend, precision) for a bundle on the CPU: the first of its model's measured engines that runs here
    (the model is known by the sha256 of the ``unet.onnx`` on disk, not the manifest's word for it)."""
    from .bundle import UNET_ONNX, sha256_file

    onnx = bundle / UNET_ONNX
    measured = PASSED.get(sha256_file(onnx)) if PASSED and onnx.is_file() else None
    if measured is None:
        return FALLBACK
    for backend, precision in measured.engines:
        why = unavailable(bundle, backend, precision)
        if why is None:
            log.info("--device auto on the CPU: %s %s (%s)", backend, precision, measured.evidence)
            return backend, precision
        log.info("--device auto: not %s %s (%s)", backend, precision, why)
    return FALLBACK


def unavailable(bundle: Path, backend: str, precision: str) -> str | None:
    """Why ``backend`` cannot run ``precision`` of ``bundle`` here, or None when it can."""
    from .bundle import UNET_ONNX_INT8

    if precision == "int8" and not (bundle / UNET_ONNX_INT8).is_file():
        return f"no {UNET_ONNX_INT8}"
    if backend == "openvino":
        if importlib.util.find_spec("openvino") is None:
            return "openvino is not installed"
        from .backends.openvino_ import OV_PRECISIONS, CpuInfo, core

        caps = CpuInfo.of(core()).capabilities
        if OV_PRECISIONS[precision][1] not in caps:
            return f"the CPU lacks {OV_PRECISIONS[precision][1]}"
    return None
