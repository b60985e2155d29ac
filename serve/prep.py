"""Request preparation in a process of its own: face decode + crop (MediaPipe), audio decode + encode.

Native libraries can die on hostile input (a segfault in libmediapipe on a 30000x30000 picture, the OOM
killer on a decode): here that kills one worker process, not the server. :class:`PrepPool` holds one warm
worker (it imports the engine's readers once, at its start, never per request; given the engine's path it
opens that engine once too, and runs its audio encoder), runs one call at a time (so a dead worker names
the request that killed it) and starts a fresh worker after a death. A pool given no engine (a library
caller handed the server an engine object, whose path it does not know) decodes and crops only; the
server then encodes the decoded, length-capped samples with its own engine's encoder.
Results come back as numpy arrays (the identity, 16 kHz samples, one embedding per frame), never tensors.

Nothing here imports a web framework; the worker functions raise the engine's own errors (``USER_ERRORS``)
or the small picklable ones below, which ``worker.py`` turns into a client's one line.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Test hook, for the tests only: "<SIGNAL>:<marker>[,<SIGNAL>:<marker>...]" makes a worker signal itself with
# SIGNAL (SEGV, KILL, ABRT; STOP: it hangs) when the file it is asked to prepare contains the bytes <marker>: a
# stand-in for a native crash, the OOM killer or a decoder caught in a loop.
TEST_CRASH_HOOK = "DHEADS_TEST_HOOK_PREP_CRASH"


class PrepCrashed(RuntimeError):
    """The worker process died while preparing a request (a native crash, an OOM kill)."""

    def __init__(self, what: str, how: str):
        super().__init__(f"preparing the {what} crashed its worker process ({how})")
        self.what, self.how = what, how


class PrepTimedOut(RuntimeError):
    """The worker process took too long on a request; it was killed."""

    def __init__(self, what: str, seconds: float):
        super().__init__(f"preparing the {what} took over {seconds:g} s (dh-serve --prep-timeout); its worker "
                         "process was stopped")
        self.what, self.seconds = what, seconds


class TooLong(ValueError):
    """Audio over the server's cap: ``seconds`` as stated by its header or as decoded."""

    def __init__(self, seconds: float):
        super().__init__(seconds)
        self.seconds = float(seconds)


class Silent(ValueError):
    """All-silent speech (the engine's AudioError line, kept in ``args[0]``)."""


# --- in the worker process -------------------------------------------------------------------------------
_HEAD = None


def _init(open_engine: bool, engine: str | None, threads: int | None) -> None:
    """The worker's start: import the readers (torch, MediaPipe, PyAV, soundfile) and, with ``open_engine``,
    open ``engine`` (None: the demo) once: its encoder is what ``speech`` and ``encode`` run."""
    global _HEAD
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the server's to handle, not its worker's
    import dheads.engine.audio  # noqa: F401
    import dheads.engine.image  # noqa: F401

    if open_engine:
        from dheads.engine.pipeline import TalkingHead

        _HEAD = TalkingHead.open(engine, threads=threads)


def _test_hook(path: str) -> None:
    spec = os.environ.get(TEST_CRASH_HOOK)
    if not spec:
        return
    data = Path(path).read_bytes()
    for name, _, marker in (part.partition(":") for part in spec.split(",")):
        if marker and marker.encode() in data:
            log.warning("test hook %s: this worker signals itself SIG%s", TEST_CRASH_HOOK, name)
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


def _ready() -> int:
    return os.getpid()


def face(path: str, size: int) -> np.ndarray:
    """A face upload -> the identity frame, float32 ``[1, 3, size, size]`` (dh-run's ``load_face``, crop auto)."""
    from dheads.engine.image import load_face

    _test_hook(path)
    return load_face(path, crop="auto", size=size).numpy()


def speech(path: str, cap_s: float) -> tuple[np.ndarray, np.ndarray | None]:
    """An audio upload -> (16 kHz samples, embeddings [n_frames, dim] or None where this worker opened no
    engine), with dh-run's checks; audio longer than ``cap_s`` is TooLong, from its header's stated length
    before any decoding where it states one, and no more than ``cap_s`` + 1 s is ever decoded."""
    from dheads.engine.audio import SAMPLE_RATE, AudioError, audio_seconds, check_silence, load_audio

    _test_hook(path)
    stated = audio_seconds(path)
    if stated is not None and stated > cap_s:
        raise TooLong(stated)
    samples, _ = load_audio(path, silence="ignore", max_decode_s=cap_s + 1)
    if samples.size > cap_s * SAMPLE_RATE:
        raise TooLong(samples.size / SAMPLE_RATE)
    try:
        check_silence(path, samples, "error")
    except AudioError as e:
        raise Silent(str(e)) from None
    return samples, None if _HEAD is None else _HEAD.encoder(samples).numpy()


def encode(samples: np.ndarray) -> np.ndarray:
    """16 kHz samples -> embeddings [n_frames, dim] (a PCM stream's speech so far)."""
    return _HEAD.encoder(samples).numpy()


# --- in the server ---------------------------------------------------------------------------------------
class PrepPool:
    """One warm worker process (``spawn``: no fork of a threaded server), called one request at a time from
    the server's prep thread. A worker that dies is replaced (the call that killed it is PrepCrashed); one that
    takes over ``timeout_s`` on a call (a decoder caught in a loop, a stopped process) is killed and replaced
    (PrepTimedOut). A replacement starts at once and warms up before the next call, whose time limit starts
    only then."""

    def __init__(self, engine: str | None = None, threads: int | None = None, *, encodes: bool = True,
                 timeout_s: float | None = None):
        """``encodes``: the worker opens ``engine`` (None: the demo) and runs its audio encoder; else it only
        decodes and crops. ``timeout_s``: the longest one call may take (None: no limit)."""
        self.engine, self.threads, self.encodes, self.timeout_s = engine, threads, encodes, timeout_s
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._warm: concurrent.futures.Future | None = None  # the new worker's start-up
        self.restarts = 0
        self.closed = False

    def _new_pool(self) -> None:
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
            initargs=(self.encodes, self.engine, self.threads))
        self._warm = self._pool.submit(_ready)

    def start(self, wait: bool = True) -> None:
        """Start the worker (it imports the readers and opens the engine); ``wait``: until it answers."""
        with self._lock:
            if self._pool is None:
                self._new_pool()
            warm = self._warm
        if wait and warm is not None:
            log.info("preparation worker ready (pid %d)", warm.result())

    def call(self, what: str, fn, *args):
        """``fn(*args)`` in the worker; its exceptions are raised here. PrepCrashed when the worker died,
        PrepTimedOut when it took over ``timeout_s`` (it is killed)."""
        with self._lock:
            if self.closed:
                raise RuntimeError("preparation pool is closed")
            if self._pool is None:
                self._new_pool()
            pool, procs = self._pool, []
            try:
                if self._warm is not None:  # a new worker's start-up does not count in the call's time
                    self._warm.result()
                    self._warm = None
                procs = list((getattr(pool, "_processes", None) or {}).values())  # warm: to learn how one ends
                fut = pool.submit(fn, *args)
                procs = list((getattr(pool, "_processes", None) or {}).values()) or procs  # one submit may start
                return fut.result(timeout=self.timeout_s)
            except concurrent.futures.process.BrokenProcessPool:
                how = _exit_reason(procs)
                log.error("preparation worker died preparing a %s (%s); starting a new one", what, how)
                self._replace(pool)
                raise PrepCrashed(what, how) from None
            except TimeoutError:
                log.error("preparation worker took over %g s preparing a %s; killed, starting a new one",
                          self.timeout_s, what)
                for p in procs:
                    p.kill()
                self._replace(pool)
                raise PrepTimedOut(what, self.timeout_s) from None

    def _replace(self, pool) -> None:
        pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._warm = None
        self.restarts += 1
        if not self.closed:
            self._new_pool()

    def pids(self) -> list[int]:
        pool = self._pool
        procs = getattr(pool, "_processes", None) or {}
        return [p.pid for p in list(procs.values()) if p.is_alive()]

    def close(self) -> None:
        self.closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


# How long the server waits to learn how a dead worker ended. The pool's own manager thread reaps it too: when its
# waitpid wins, ours fails (ECHILD) and the shared Process shows no exit code until that thread has stored it, so
# ``exitcode`` is polled for a while (CI once read "it exited" instead of SIGSEGV).
EXIT_WAIT_S = 10.0


def _exit_reason(procs) -> str:
    """How the dead worker ended: its signal's name (SIGSEGV, SIGKILL: the OOM killer's) or exit code. All the
    workers share one EXIT_WAIT_S: live workers of a broken pool cannot make the server wait N times over."""
    deadline = time.monotonic() + EXIT_WAIT_S
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        while (code := p.exitcode) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if code is not None and code < 0:
            try:
                return signal.Signals(-code).name
            except ValueError:
                return f"signal {-code}"
        if code:
            return f"exit code {code}"
    return "it exited"


__all__ = ["PrepCrashed", "PrepPool", "PrepTimedOut", "Silent", "TEST_CRASH_HOOK", "TooLong", "encode", "face", "speech"]
