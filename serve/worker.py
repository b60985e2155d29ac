"""The serving core: one engine, one batching thread, and a :class:`Session` per client stream.

The batching thread admits waiting sessions at frame boundaries (at most ``max_streams`` live), calls
:meth:`Batcher.step` for the live ones, hands each frame to its own session (``Frame.stream`` is the
session's own :class:`Stream`, so a frame cannot reach another client) and drops finished or cancelled
streams at the next boundary. Preparation (face decode + crop, audio decode + encode) runs in a worker
process of its own (``prep.py``), driven from one separate thread so it never stalls the batch: a native
crash there fails that one request (500 / close 1011) and a fresh worker takes the next. Nothing here
imports a web framework; ``app.py`` drives it from asyncio.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dheads.engine.audio import SAMPLE_RATE
from dheads.engine.backends.base import check_batches
from dheads.engine.batcher import Batcher, Frame, Stream
from dheads.engine.config import SPACINGS, SamplerConfig
from dheads.engine.errors import USER_ERRORS
from dheads.engine.image import ImageTooLarge
from dheads.engine.noise import MAX_SEED
from dheads.engine.pipeline import TalkingHead
from dheads.engine.names import check_steps
from dheads.engine.video import write_mp4

from . import prep as prep_fns
from .config import ServeConfig
from .metrics import Metrics
from .prep import PrepCrashed, PrepPool, PrepTimedOut, Silent, TooLong
from .protocol import as_int, as_str
from .uploads import LimitError, RequestError, Upload, remove_stale, temp_prefix

log = logging.getLogger(__name__)

SAMPLES_PER_FRAME = SAMPLE_RATE // 25
_VIDEO_ID = re.compile(r"[0-9a-f]{32}")
PCM_ENCODE_EVERY = 4 * SAMPLES_PER_FRAME  # re-encode streaming speech after this much new audio


class ClientError(ValueError):
    """What a client did wrong, as the one line it is told (``status``: the HTTP code)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ShuttingDown(ClientError):
    """The server is draining or stopping: 503 over HTTP, close 1012 over WebSocket."""

    def __init__(self, message: str = "server is shutting down"):
        super().__init__(message, 503)


class ClientGone(Exception):
    """The client of an HTTP render disconnected: its stream is cancelled."""


@dataclass(frozen=True)
class Queued:
    """A session's place in the line for a batch slot (1: next), told to it whenever it changes."""

    position: int


@dataclass(frozen=True)
class StreamOptions:
    sampler: SamplerConfig
    seed: int = 0


SAMPLING_FIELDS = ("sampler", "steps", "spacing", "frame_noise", "seed")


def stream_options(head: TalkingHead, config: ServeConfig, *, steps=None, sampler=None, seed=None, spacing=None,
                   frame_noise=None) -> StreamOptions:
    """A client's fields over the engine's default sampling, merged as dh-run merges its flags
    (``SamplerConfig.override``): a client that sends none gets exactly what dh-run makes. RequestError (400)."""
    steps = as_int("steps", steps, 1, config.max_steps)
    seed = as_int("seed", seed, 0, MAX_SEED) or 0
    try:
        cfg = head.default_sampler.override(name=as_str("sampler", sampler), steps=steps,
                                            spacing=as_str("spacing", spacing, SPACINGS),
                                            frame_noise=as_str("frame_noise", frame_noise))
        check_steps(cfg.steps, head.info.diffusion.num_timesteps)
    except RequestError:
        raise
    except ValueError as e:
        raise RequestError(" ".join(str(e).split())) from None
    return StreamOptions(cfg, seed)


class Session:
    """One client's stream: frames arrive on an asyncio queue; ``max_pending`` untaken frames pause it."""

    def __init__(self, worker: EngineWorker, stream: Stream, samples: np.ndarray, *, keep_frames: bool = False):
        self.worker, self.stream, self.samples = worker, stream, samples
        self.id = uuid.uuid4().hex
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.kept: list[np.ndarray] | None = [] if keep_frames else None
        self.cancelled = False
        self.position = 0  # in the line for a batch slot; 0: not waiting
        self.on_queued = None  # async (position) -> None, awaited by ``next`` when the position changes
        self.submitted = time.perf_counter()
        self.first_frame_s: float | None = None
        self._pending = 0
        self._lock = threading.Lock()

    # --- batching thread side
    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the client's event loop is gone
            self.cancelled = True

    def deliver(self, frame: Frame) -> None:
        if self.first_frame_s is None:
            self.first_frame_s = time.perf_counter() - self.submitted
            self.worker.metrics.first_frame.observe(self.first_frame_s)
        with self._lock:
            self._pending += 1
            if self._pending >= self.worker.config.max_pending_frames:
                self.stream.paused = True  # backpressure: sit out frames until the client catches up
        self._put(frame)

    def finish(self, error: BaseException | None = None) -> None:
        self._put(error if error is not None else None)

    # --- client side
    async def next(self) -> Frame | None:
        """The next frame, or None when the stream is complete; raises the stream's error. A change of its place
        in the line is handed to ``on_queued`` on the way."""
        item = await self.queue.get()
        while isinstance(item, Queued):
            if self.on_queued is not None:
                await self.on_queued(item.position)
            item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is not None:
            with self._lock:
                self._pending -= 1
                resume = self.stream.paused and self._pending < self.worker.config.max_pending_frames
                if resume:
                    self.stream.paused = False
            if resume:
                self.worker.wake()
            if self.kept is not None:
                self.kept.append(item.rgb)
        return item

    def cancel(self) -> None:
        self.cancelled = True
        self.worker.wake()

    def audio_of(self, index: int) -> np.ndarray:
        """The speech samples that play during frame ``index`` (16 kHz float32)."""
        return self.samples[index * SAMPLES_PER_FRAME : (index + 1) * SAMPLES_PER_FRAME]


class EngineWorker:
    """A loaded engine and the continuous-batching thread that serves every session."""

    def __init__(self, config: ServeConfig, head: TalkingHead | None = None, prep: PrepPool | None = None):
        """``prep``: a preparation pool to share (one that ``encodes`` must run ``head``'s engine); None: one of
        its own, started by :meth:`start` and closed by :meth:`stop`, whose worker opens ``config.engine`` and
        encodes where this worker opens it too (``head`` None), else decodes and crops only."""
        self.config = config
        self.head = head
        self._own_prep = prep is None
        self.prep = prep if prep is not None else PrepPool(config.engine, config.threads, encodes=head is None,
                                                         timeout_s=config.prep_timeout_s)
        self.metrics = Metrics()
        self.batcher: Batcher | None = None
        self._prep = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dh-prep")
        self._cond = threading.Condition()
        self._waiting: collections.deque[Session] = collections.deque()
        self._live: list[Session] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.draining = False
        self.load_error: BaseException | None = None  # set when a background load failed
        self.open_requests = 0  # renders and streams from their first message to their end
        self._preparing = 0  # of those, the ones not yet submitted: they count in the queue
        remove_stale()
        self._own_video_dir = config.video_dir is None
        self.video_dir = Path(tempfile.mkdtemp(prefix=temp_prefix("videos-"))) if self._own_video_dir \
            else Path(config.video_dir)
        self.video_dir.mkdir(parents=True, exist_ok=True)

    # --- life cycle
    def start(self) -> None:
        if self.head is None:
            self.head = TalkingHead.open(self.config.engine, threads=self.config.threads)
        # the batcher runs every batch up to --max-streams: a plan exported for fewer is refused now, not mid-request
        check_batches(self.head.denoiser, self.config.max_streams, f"--max-streams {self.config.max_streams}")
        self.batcher = Batcher(self.head.denoiser)
        self.prep.start(wait=True)  # the worker process imports and opens the engine now, not at a first request
        self._thread = threading.Thread(target=self._run, name="dh-batch", daemon=True)
        self._thread.start()
        log.info("engine ready: %s", self.config.engine or "bundled demo model")

    def start_in_background(self) -> threading.Thread:
        """Load the engine on a thread (the port is already open: /healthz answers 503 "loading" until it is
        ready); a failure lands in ``load_error``."""
        def load():
            try:
                self.start()
            except BaseException as e:  # noqa: BLE001 - reported by the server, which then exits
                self.load_error = e

        t = threading.Thread(target=load, name="dh-load", daemon=True)
        t.start()
        return t

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def stopping(self) -> bool:
        """Draining or stopped: /healthz answers 503 "draining"."""
        return self.draining or self._stopping

    def begin_drain(self) -> None:
        """Stop taking new requests (503; /healthz 503 "draining"); streams already in go on."""
        self.draining = True
        log.info("draining: new requests get 503; %d open", self.open_requests)

    @contextlib.contextmanager
    def request(self):
        """One render or stream, from its first message to its end: refused (503) while the engine loads,
        while draining, or past ``max_connections`` open at once."""
        with self._cond:
            if self.draining or self._stopping:
                raise ShuttingDown()
            if not self.ready:
                raise ClientError("engine is loading; try again shortly", 503)
            if self.open_requests >= self.config.max_connections:
                raise ClientError(f"server busy: {self.open_requests} streams open, at most "
                                  f"{self.config.max_connections}", 503)
            self.open_requests += 1
        try:
            yield
        finally:
            with self._cond:
                self.open_requests -= 1

    @contextlib.contextmanager
    def preparing(self):
        """A request being uploaded and prepared (face crop, audio decode + encode): it counts in the queue
        (``max_queue``) until it is submitted, so a flood of new streams gets 503 rather than a long wait."""
        with self._cond:
            backlog = self._preparing + len(self._waiting)
            if backlog >= self.config.max_queue:
                raise ClientError(f"server busy: {backlog} streams already waiting", 503)
            self._preparing += 1
            self._queue_metrics()
        try:
            yield
        finally:
            with self._cond:
                self._preparing -= 1
                self._queue_metrics()

    def _queue_metrics(self) -> None:
        self.metrics.queue_depth.set(self._preparing + len(self._waiting))
        self.metrics.preparing.set(self._preparing)

    def end_sessions(self, error: BaseException) -> None:
        """End every waiting and live session with ``error`` (each client is told in one line)."""
        with self._cond:
            for s in [*self._waiting, *self._live]:
                s.finish(error)
                s.cancelled = True
            self._cond.notify_all()

    def stop(self) -> None:
        """Stop admitting, end every session with an error, and join the batching thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._cond:
            for s in [*self._waiting, *self._live]:
                s.finish(ShuttingDown())
            self._waiting.clear()
            self._live.clear()
        self._prep.shutdown(wait=False, cancel_futures=True)
        if self._own_prep:
            self.prep.close()
        if self._own_video_dir:  # a shared --video-dir outlives this replica
            shutil.rmtree(self.video_dir, ignore_errors=True)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # --- preparation (on the prep thread, each call run by the prep worker process)
    async def run_prep(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._prep, fn, *args)

    def _call_prep(self, what: str, fn, *args):
        try:
            return self.prep.call(what, fn, *args)
        except (PrepCrashed, PrepTimedOut) as e:
            self.metrics.prep_crashes.inc()
            raise ClientError(f"server error: {e}; the server goes on (report the file if it is an ordinary "
                              f"{what})", 500) from None

    def load_identity(self, face: Upload) -> torch.Tensor:
        """A face upload -> the identity frame (dh-run's ``load_face``, crop auto), prepared in the worker."""
        try:
            size = self.head.info.model.image_size
            return torch.from_numpy(self._call_prep("face", prep_fns.face, str(face.path), size))
        except USER_ERRORS as e:
            raise ClientError(face.explain(e), 413 if isinstance(e, ImageTooLarge) else 400) from None

    def load_speech(self, audio: Upload) -> tuple[np.ndarray, torch.Tensor]:
        """A whole audio upload -> (16 kHz samples, embeddings), prepared in the worker with dh-run's checks and
        the length cap: the length the header states is checked before decoding, and no more than the cap
        (+ 1 s) is decoded."""
        try:
            samples, emb = self._call_prep("audio", prep_fns.speech, str(audio.path), self.config.max_audio_seconds)
        except TooLong as e:
            raise self.too_long(e.seconds) from None
        except Silent as e:  # dh-run's line without its hint at a flag the server does not have
            raise ClientError(audio.explain(e).split("; ")[0] + "; give a file with speech") from None
        except USER_ERRORS as e:
            raise ClientError(audio.explain(e)) from None
        return samples, self.head.encoder(samples) if emb is None else torch.from_numpy(emb)

    def check_seconds(self, n_samples: int) -> None:
        if n_samples > self.config.max_audio_seconds * SAMPLE_RATE:
            raise self.too_long(n_samples / SAMPLE_RATE)

    def too_long(self, seconds: float) -> ClientError:
        return ClientError(f"audio is {seconds:.1f} s; this server takes at most {self.config.max_audio_seconds:g} s",
                           413)

    def encode(self, samples: np.ndarray) -> torch.Tensor:
        """16 kHz samples -> embeddings, in the prep worker (a PCM stream's speech so far)."""
        if not self.prep.encodes:
            return self.head.encoder(samples)
        return torch.from_numpy(self._call_prep("audio", prep_fns.encode, np.ascontiguousarray(samples, np.float32)))

    # --- sessions
    def new_stream(self, identity: torch.Tensor, opts: StreamOptions, emb: torch.Tensor | None, final: bool) -> Stream:
        return Stream(self.head.denoiser, identity, diffusion=self.head.info.diffusion, sampler=opts.sampler,
                      seed=opts.seed, audio_emb=emb, final=final)

    def submit(self, session: Session) -> None:
        """Queue a session; it joins the batch at the next frame boundary with a free slot."""
        with self._cond:
            if self._stopping or self.draining:
                raise ShuttingDown()
            self._waiting.append(session)  # its place was taken by ``preparing``
            self._queue_metrics()
            self._cond.notify_all()

    def _admit(self) -> None:
        while self._waiting and len(self._live) < self.config.max_streams:
            self._live.append(self._waiting.popleft())
            self._live[-1].position = 0
        self._tell_positions()
        self._queue_metrics()

    def _tell_positions(self) -> None:
        """After admitting (so a stream that gets a free slot at once is never told it waits)."""
        for i, s in enumerate(self._waiting, 1):
            if s.position != i:
                s.position = i
                s._put(Queued(i))
        self.metrics.streams_active.set(len(self._live))

    def _retire(self) -> None:
        keep = []
        for s in self._live:
            if s.cancelled:
                self.metrics.streams.labels("cancelled").inc()
            elif s.stream.done:
                self.metrics.streams.labels("done").inc()
                s.finish()
            else:
                keep.append(s)
        self._live = keep
        self._waiting = collections.deque(s for s in self._waiting if not s.cancelled)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                self._retire()
                self._admit()
                live = list(self._live)
                if not any(s.stream.ready for s in live):
                    self._cond.wait(0.1)
                    continue
            calls = self.batcher.unet_calls
            try:
                frames = self.batcher.step([s.stream for s in live])
            except Exception as e:  # an engine failure ends the streams of this step, not the server
                log.exception("batch step failed")
                with self._cond:
                    for s in live:
                        s.finish(RuntimeError(f"engine failure: {' '.join(str(e).split())}"))
                        s.cancelled = True
                continue
            owner = {id(s.stream): s for s in live}
            for f in frames:
                owner[id(f.stream)].deliver(f)
            self.metrics.frames_made(len(frames), self.batcher.unet_calls - calls)

    # --- finished videos
    def store_video(self, vid: str, path: Path) -> str:
        """Keep a finished mp4 (``video_dir/<vid>.mp4``, ``vid`` a server-made uuid) for download; the oldest
        in the folder expire past ``keep_videos``, whichever replica made them."""
        videos = sorted(self.video_dir.glob("*.mp4"), key=_mtime)
        for old in videos[: max(0, len(videos) - self.config.keep_videos)]:
            if old != path:
                old.unlink(missing_ok=True)
        return vid

    def video_path(self, vid: str) -> Path | None:
        """The finished mp4 of ``vid`` (32 hex digits, else None: never a client-made path), if still kept."""
        path = self.video_dir / f"{vid}.mp4" if _VIDEO_ID.fullmatch(vid) else None
        return path if path is not None and path.is_file() else None

    def write_video(self, path: Path, frames: list[np.ndarray], samples: np.ndarray) -> Path:
        if not frames:
            raise ClientError("no frames were made")
        write_mp4(path, frames, fps=self.head.info.audio.fps, audio=samples[: len(frames) * SAMPLES_PER_FRAME],
                  sample_rate=SAMPLE_RATE)
        return path


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # another replica expired it meanwhile
        return 0.0


__all__ = ["ClientError", "ClientGone", "EngineWorker", "LimitError", "RequestError", "Session", "ShuttingDown", "StreamOptions",
           "stream_options"]
