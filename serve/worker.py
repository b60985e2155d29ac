"""The serving core: one engine, one batching thread, and a :class:`Session` per client stream.

The batching thread admits waiting sessions at frame boundaries (at most ``max_streams`` live), calls
:meth:`Batcher.step` for the live ones, hands each frame to its own session (``Frame.stream`` is the
session's own :class:`Stream`, so a frame cannot reach another client) and drops finished or cancelled
streams at the next boundary. Preparation (face crop, audio decode + encode) runs on one separate thread
so it never stalls the batch. Nothing here imports a web framework; ``app.py`` drives it from asyncio.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dheads.engine.audio import SAMPLE_RATE, check_silence, load_audio
from dheads.engine.batcher import Batcher, Frame, Stream
from dheads.engine.config import SamplerConfig
from dheads.engine.errors import USER_ERRORS
from dheads.engine.image import load_face
from dheads.engine.pipeline import TalkingHead
from dheads.engine.video import write_mp4

from .config import ServeConfig
from .metrics import Metrics
from .uploads import LimitError, RequestError, Upload

log = logging.getLogger(__name__)

SAMPLES_PER_FRAME = SAMPLE_RATE // 25
PCM_ENCODE_EVERY = 4 * SAMPLES_PER_FRAME  # re-encode streaming speech after this much new audio


class ClientError(ValueError):
    """What a client did wrong, as the one line it is told (``status``: the HTTP code)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ShuttingDown(RuntimeError):
    pass


@dataclass(frozen=True)
class StreamOptions:
    sampler: SamplerConfig
    seed: int = 0


def stream_options(head: TalkingHead, config: ServeConfig, *, steps: int | None = None, sampler: str | None = None,
                   seed: int | None = None) -> StreamOptions:
    """A client's ``steps``/``sampler``/``seed`` over the engine's defaults, checked (ClientError)."""
    base = head.default_sampler
    try:
        steps = base.steps if steps in (None, "") else int(steps)
        seed = 0 if seed in (None, "") else int(seed)
        if not 1 <= steps <= config.max_steps:
            raise ValueError(f"steps must be in 1..{config.max_steps} on this server, got {steps}")
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        cfg = SamplerConfig(name=sampler or base.name, steps=steps, eta=base.eta)
        if steps > head.info.diffusion.num_timesteps:
            raise ValueError(f"steps must be in 1..{head.info.diffusion.num_timesteps} for this model")
    except (TypeError, ValueError) as e:
        raise ClientError(str(e).replace("invalid literal for int() with base 10", "not an integer")) from None
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
        """The next frame, or None when the stream is complete; raises the stream's error."""
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

    def __init__(self, config: ServeConfig, head: TalkingHead | None = None):
        self.config = config
        self.head = head
        self.metrics = Metrics()
        self.batcher: Batcher | None = None
        self._prep = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dh-prep")
        self._cond = threading.Condition()
        self._waiting: collections.deque[Session] = collections.deque()
        self._live: list[Session] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.videos: collections.OrderedDict[str, Path] = collections.OrderedDict()
        self.video_dir = Path(tempfile.mkdtemp(prefix="dh-serve-videos-"))

    # --- life cycle
    def start(self) -> None:
        if self.head is None:
            self.head = TalkingHead.open(self.config.engine, threads=self.config.threads)
        self.batcher = Batcher(self.head.denoiser)
        self._thread = threading.Thread(target=self._run, name="dh-batch", daemon=True)
        self._thread.start()
        log.info("engine ready: %s", self.config.engine or "bundled demo model")

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def stop(self) -> None:
        """Stop admitting, end every session with an error, and join the batching thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._cond:
            for s in [*self._waiting, *self._live]:
                s.finish(ShuttingDown("server is shutting down"))
            self._waiting.clear()
            self._live.clear()
        self._prep.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.video_dir, ignore_errors=True)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # --- preparation (on the prep thread)
    async def run_prep(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._prep, fn, *args)

    def load_identity(self, face: Upload) -> torch.Tensor:
        try:
            return load_face(face.path, crop="auto", size=self.head.info.model.image_size)
        except USER_ERRORS as e:
            raise ClientError(face.explain(e)) from None

    def load_speech(self, audio: Upload) -> tuple[np.ndarray, torch.Tensor]:
        """A whole audio upload -> (16 kHz samples, embeddings), with dh-run's checks and the length cap."""
        try:
            samples, rate = load_audio(audio.path, silence="ignore")
            self.check_seconds(samples.size)
        except USER_ERRORS as e:
            raise ClientError(audio.explain(e)) from None
        try:
            check_silence(audio.path, samples, "error")
        except USER_ERRORS as e:  # dh-run's line without its hint at a flag the server does not have
            raise ClientError(audio.explain(e).split("; ")[0] + "; give a file with speech") from None
        return samples, self.head.encoder(samples)

    def check_seconds(self, n_samples: int) -> None:
        cap = self.config.max_audio_seconds
        if n_samples > cap * SAMPLE_RATE:
            raise ClientError(f"audio is {n_samples / SAMPLE_RATE:.1f} s; this server takes at most {cap:g} s", 413)

    def encode(self, samples: np.ndarray) -> torch.Tensor:
        return self.head.encoder(samples)

    # --- sessions
    def new_stream(self, identity: torch.Tensor, opts: StreamOptions, emb: torch.Tensor | None, final: bool) -> Stream:
        return Stream(self.head.denoiser, identity, diffusion=self.head.info.diffusion, sampler=opts.sampler,
                      seed=opts.seed, audio_emb=emb, final=final)

    def submit(self, session: Session) -> None:
        """Queue a session; it joins the batch at the next frame boundary with a free slot."""
        with self._cond:
            if self._stopping:
                raise ClientError("server is shutting down", 503)
            if len(self._waiting) >= self.config.max_queue:
                raise ClientError(f"server busy: {len(self._waiting)} streams already waiting", 503)
            self._waiting.append(session)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify_all()

    def _admit(self) -> None:
        while self._waiting and len(self._live) < self.config.max_streams:
            self._live.append(self._waiting.popleft())
        self.metrics.queue_depth.set(len(self._waiting))
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
        """Keep a finished mp4 for download under ``vid`` (a server-made uuid); the oldest expire."""
        self.videos[vid] = path
        while len(self.videos) > self.config.keep_videos:
            _, old = self.videos.popitem(last=False)
            old.unlink(missing_ok=True)
        return vid

    def write_video(self, path: Path, frames: list[np.ndarray], samples: np.ndarray) -> Path:
        if not frames:
            raise ClientError("no frames were made")
        write_mp4(path, frames, fps=self.head.info.audio.fps, audio=samples[: len(frames) * SAMPLES_PER_FRAME],
                  sample_rate=SAMPLE_RATE)
        return path


__all__ = ["ClientError", "EngineWorker", "LimitError", "RequestError", "Session", "ShuttingDown", "StreamOptions",
           "stream_options"]
