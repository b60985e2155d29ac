"""The per-frame loop over any Denoiser, with preallocated state and optional CUDA-graph replay.

What crosses a video's frames (the motion ring, the noise function and the frame's noise buffer, the
last frame, the frame count, the sampler's state) lives in one :class:`FrameState`, and a frame runs the
one step loop of ``plan.frame_steps``. Three loops drive that same state: :class:`FrameLoop` here (a fixed
batch of streams, CUDA graphs), ``batcher.Batcher`` (streams that join and leave; one ``FrameState`` per
stream) and ``reference.generate_reference`` (the eager oracle). Everything a frame needs lives in static
buffers allocated once per state, so FrameLoop's whole step loop issues no allocation, host-device copy or
synchronisation of its own and can be captured once as a CUDA graph and replayed for every frame. The
loop never asks which backend it holds.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .backends.base import Denoiser, graph_denoiser
from .conditioning import MotionRing
from .config import DiffusionConfig, ModelConfig, SamplerConfig
from .noise import NoiseFn, as_noise_fn
from .plan import FrameSteps, SamplingPlan, denoise_frame, frame_steps, make_plan, make_state, warm_start

log = logging.getLogger(__name__)


class FrameState:
    """What crosses the frames of ``batch`` streams sampled together with one ``plan``: identity, motion ring,
    the noise function and this frame's noise ``[1 + n, B, 3, S, S]``, the last frame (``frame``, where a warm
    start begins), the frame count and the sampler's state. Buffers are made once; a video begins with
    :meth:`start`, and each frame is :meth:`draw_noise`, :meth:`begin`, the steps, :meth:`finish`."""

    def __init__(self, plan: SamplingPlan, model: ModelConfig, batch: int = 1,
                 device: torch.device | str = "cpu"):
        dev, s = torch.device(device), model.image_size
        self.plan = plan
        self.tables = plan.tables(dev)
        self.noise = torch.empty(plan.steps + 1, batch, 3, s, s, device=dev)
        self.identity = torch.empty(batch, 3, s, s, device=dev)
        self.ring = MotionRing(batch, model.motion_frames, 1 if model.grayscale_motion else 3, s, device=dev,
                               grayscale=model.grayscale_motion)
        self.frame = torch.empty(batch, 3, s, s, device=dev)
        self.x_warm = torch.empty(batch, 3, s, s, device=dev)
        self.sampler_state = make_state(plan.spec, self.frame)  # the sampler's preallocated per-frame state
        self.noise_fn: NoiseFn | None = None
        self.frames_done = 0

    def start(self, identity: torch.Tensor, *, seed: int | Sequence[int] = 0,
              noise: torch.Tensor | NoiseFn | None = None) -> None:
        """Begin a video of ``identity`` [B, 3, S, S]: motion ring full of it, frame count 0, and its noise
        (``noise.as_noise_fn``: the caller's, else seeded, correlated as the plan's sampler says)."""
        self.identity.copy_(identity)
        self.ring.reset(self.identity)
        self.noise_fn = as_noise_fn(noise, seed, self.noise.device, corr=self.plan.sampler.noise_corr)
        self.frames_done = 0

    def draw_noise(self) -> None:
        """Fill ``noise`` with the next frame's."""
        self.noise_fn(self.frames_done, self.noise)

    @property
    def warm(self) -> bool:
        """Whether the next frame starts warm: not the first frame, and the plan's warm start is shorter."""
        return self.frames_done > 0 and self.plan.calls(True) < self.plan.steps

    def begin(self, warm: bool | None = None) -> tuple[torch.Tensor, int]:
        """(x at the frame's first step, that respaced step): ``noise[0]``, or, ``warm`` (default: :attr:`warm`),
        the last frame noised to the plan's warm step (written into ``x_warm``)."""
        warm = self.warm if warm is None else warm
        start = self.plan.start(warm)
        x = warm_start(self.x_warm, self.frame, self.noise[0], self.tables, start) if warm else self.noise[0]
        return x, start

    def steps(self, x: torch.Tensor, start: int) -> FrameSteps:
        """The frame's step loop (``plan.frame_steps``) from ``x`` at ``start``, on this state's noise and
        sampler state."""
        return frame_steps(x, self.plan, self.tables, self.noise, self.sampler_state, start)

    def denoise(self, model, x: torch.Tensor, start: int) -> torch.Tensor:
        """The frame from ``x`` at ``start`` with one ``model(x, k)`` (``plan.denoise_frame``)."""
        return denoise_frame(model, x, self.plan, self.tables, self.noise, self.sampler_state, start)

    def finish(self, x: torch.Tensor | None = None) -> None:
        """Keep frame ``x`` (None: ``frame`` already holds it) as the last frame, push it into the motion ring,
        count it."""
        if x is not None:
            self.frame.copy_(x)
        self.ring.push(self.frame)
        self.frames_done += 1


@dataclass(frozen=True)
class LoopConfig:
    """How the loop runs: the artifact's diffusion config, the sampler (None: the artifact's default),
    the batch of streams, and whether to capture a CUDA graph."""

    sampler: SamplerConfig | None = None
    batch: int = 1
    cuda_graph: bool = True
    diffusion: DiffusionConfig = DiffusionConfig()


class FrameLoop:
    """A :class:`FrameState` for ``batch`` independent streams (``video``) and the denoising of one frame
    of each, eager or replayed from a CUDA graph; ``noise``, ``identity``, ``ring``, ``frame`` and ``state``
    are the state's buffers."""

    def __init__(self, denoiser: Denoiser, config: LoopConfig = LoopConfig()):
        self.denoiser, self.config = denoiser, config
        cfg, dev, b = denoiser.config, denoiser.device, config.batch
        self.plan = make_plan(config.diffusion, config.sampler)
        self.n_steps = self.plan.steps
        self.video = FrameState(self.plan, cfg, b, dev)
        self.tables = self.video.tables
        # Per-step float timesteps, already batched: the UNet input for step k is t_table[k].
        self.t_table = self.tables.timesteps.float()[:, None].expand(-1, b).contiguous()
        self.noise, self.identity, self.ring = self.video.noise, self.video.identity, self.video.ring
        self.frame, self.state = self.video.frame, self.video.sampler_state
        self.audio = torch.empty(b, cfg.audio_frames, cfg.audio_dim, device=dev)
        self.use_graph = config.cuda_graph and dev.type == "cuda" and denoiser.graph_safe
        # warm -> (graph, the denoiser it captured): each graph keeps its own (a TensorRT context per graph)
        self._graphs: dict[bool, tuple[torch.cuda.CUDAGraph, Denoiser]] = {}

    @property
    def frames_done(self) -> int:
        return self.video.frames_done

    def denoise(self, warm: bool = False, denoiser: Denoiser | None = None) -> None:
        """x = noise[0] (or, ``warm``, the last frame noised to the plan's warm step); run the plan's steps
        down to k = 0 (``plan.denoise_frame``) with ``denoiser`` (default: the loop's); frame = x."""
        den = denoiser or self.denoiser

        def model(x: torch.Tensor, k: int) -> torch.Tensor:
            return den(x, self.t_table[k], self.identity, self.ring.flat, self.audio)

        x, start = self.video.begin(warm)
        self.frame.copy_(self.video.denoise(model, x, start))

    def _capture(self, warm: bool) -> tuple[torch.cuda.CUDAGraph, Denoiser]:
        """Warm up, then capture, on one side stream of the loop's device, with a denoiser of the graph's own
        (``graph_denoiser``: TensorRT gives each graph its own execution context). ``thread_local`` capture:
        another thread's allocation (the server preparing the next request) cannot invalidate it."""
        dev = self.frame.device
        den = graph_denoiser(self.denoiser)
        caller = torch.cuda.current_stream(dev)
        saved = self.frame.clone()  # on the caller's stream, before the side stream is told to wait for it
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            self.denoise(warm, den)  # warm-up, not captured: lazy init, cuBLAS handles, TensorRT's first enqueue
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                self.denoise(warm, den)
        caller.wait_stream(side)
        self.frame.copy_(saved)  # a warm frame reads the last frame: the warm-up must not have changed it
        log.info("captured a CUDA graph of %d denoising steps at batch %d", self.plan.calls(warm), self.config.batch)
        return graph, den

    def reset(self) -> None:
        """Start a new video: the next frame starts from pure noise."""
        self.video.frames_done = 0

    def run_frame(self) -> None:
        """Denoise one frame of every stream into ``self.frame`` and push it into the motion ring (the frame's
        noise is already in ``noise``: ``FrameState.draw_noise``)."""
        warm = self.video.warm
        with on_device(self.frame.device):  # streams, capture and TensorRT's enqueue on the loop's GPU (cuda:N)
            if self.use_graph:
                if warm not in self._graphs:
                    self._graphs[warm] = self._capture(warm)
                self._graphs[warm][0].replay()
            else:
                self.denoise(warm)
            self.video.finish()


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` for a CUDA device (its streams become the current ones), else nothing."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _HostFrames:
    """Frames come back to the host asynchronously: copy i into pinned memory while i+1 computes."""

    def __init__(self, like: torch.Tensor):
        self.device = like.device
        self.cuda = like.device.type == "cuda"
        pin = self.cuda
        self.buffers = [torch.empty(like.shape, dtype=like.dtype, pin_memory=pin) for _ in range(2)]
        self.events = [torch.cuda.Event() if self.cuda else None for _ in range(2)]
        self.pending: list[int] = []

    def push(self, i: int, frame: torch.Tensor) -> None:
        slot = i % 2
        with on_device(self.device):
            self.buffers[slot].copy_(frame, non_blocking=self.cuda)
            if self.cuda:
                self.events[slot].record(torch.cuda.current_stream(self.device))
        self.pending.append(i)

    def pop(self) -> tuple[int, torch.Tensor]:
        i = self.pending.pop(0)
        if self.cuda:
            self.events[i % 2].synchronize()
        return i, self.buffers[i % 2].clone()


class _RowFeed:
    """A :class:`~dheads.engine.encoders.StreamedRows` read forward by a frame loop: a producer thread
    (``dh-encode``) runs ``rows.batches()`` and hands each batch over; :meth:`rows` gives rows ``a..b`` (waiting
    for the batches that hold them) and lets go of the batches wholly before ``a``, so what is held is the batches
    under the current window, plus what is queued.

    The producer encodes a batch only when it holds a permit: one per batch the frame loop asks for, plus
    ``ahead`` at the start. ``ahead`` 0: encoding runs only while the frame loop waits for it (no overlap, no
    oversubscribed cores); ``ahead`` k: up to k batches beyond what has been asked for, overlapping the UNet calls.
    A producer's error is raised here, as it was raised there; :meth:`close` stops the producer (it finishes the
    batch it is encoding, if any) and closes its reading of the file."""

    _END = object()

    def __init__(self, rows, device, ahead: int = 0):
        self.n, self.device = int(rows.n), device
        self.held: collections.deque[tuple[int, torch.Tensor]] = collections.deque()  # (first row, rows)
        self.received = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._permits = threading.Semaphore(max(0, int(ahead)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(rows,), name="dh-encode", daemon=True)
        try:
            self._thread.start()
        except BaseException:
            # A stop signal's exception out of start()'s wait for the new thread (see MP4Writer._start_worker): no
            # one will close() this feed, yet the thread may run later; told to stop, it ends at its first permit.
            self._stop.set()
            self._permits.release()
            raise

    def _produce(self, rows) -> None:
        batches = None
        try:
            batches = rows.batches()
            while True:
                self._permits.acquire()
                if self._stop.is_set():
                    return
                batch = next(batches, self._END)
                self._queue.put(batch)
                if batch is self._END:
                    return
        except BaseException as e:  # noqa: BLE001 (handed to the frame loop, which raises it)
            self._queue.put(e)
        finally:
            if batches is not None and hasattr(batches, "close"):
                batches.close()

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Rows ``a..b`` (end exclusive, ``0 <= a < b <= n``); nothing before ``a`` is asked for again."""
        while self.received < b:
            self._permits.release()
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is self._END:
                from .encoders import EncoderError

                raise EncoderError(f"the audio encoder gave {self.received} rows for {self.n} frames")
            self.held.append((self.received, item.to(self.device, torch.float32)))
            self.received += int(item.shape[0])
        while self.held and self.held[0][0] + self.held[0][1].shape[0] <= a:
            self.held.popleft()
        parts = [t[max(0, a - s) : b - s] for s, t in self.held if s < b and s + t.shape[0] > a]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def close(self) -> None:
        self._stop.set()
        self._permits.release()
        self._thread.join()


class _AudioWindows:
    """Per-stream [N_b, D] embeddings; :meth:`fill` writes frame i's [B, 2w+1, D] windows (the rule of
    ``conditioning.audio_windows``; a stream that ended repeats its last window). Gathered per frame, so memory is
    the embeddings, not a window table 2w+1 times their size (30000 frames: 46 MB, not 230 MB and its copies).

    A stream given as ``StreamedRows`` (``TalkingHead.prepare(stream=True)``) is read through a :class:`_RowFeed`
    (``ahead`` as there): frame i waits only for the batch that holds row i+w, and rows behind i-w are let go.
    :meth:`close` stops the feeds' producers."""

    def __init__(self, audio_emb: list, window: int, device, ahead: int = 0):
        self.offsets = torch.arange(-window, window + 1, device=device)
        self.window = window
        self.lengths = [int(a.shape[0]) for a in audio_emb]
        self.streams: list[torch.Tensor | _RowFeed] = []
        try:
            for a in audio_emb:
                self.streams.append(a.to(device=device, dtype=torch.float32) if isinstance(a, torch.Tensor)
                                    else _RowFeed(a, device, ahead))
        except BaseException:
            self.close()
            raise

    def fill(self, out: torch.Tensor, i: int) -> None:
        for b, (a, n) in enumerate(zip(self.streams, self.lengths)):
            c = min(i, n - 1)
            if isinstance(a, _RowFeed):
                lo, hi = max(0, c - self.window), min(n, c + self.window + 1)
                out[b].copy_(a.rows(lo, hi)[(self.offsets + c).clamp_(0, n - 1) - lo])
            else:
                out[b].copy_(a[(self.offsets + c).clamp_(0, n - 1)])

    def close(self) -> None:
        for a in self.streams:
            if isinstance(a, _RowFeed):
                a.close()


@torch.no_grad()
def generate_frames(denoiser: Denoiser, identity: torch.Tensor, audio_emb, *,
                    config: LoopConfig | None = None, seed: int | Sequence[int] = 0,
                    noise: torch.Tensor | NoiseFn | None = None, loop: FrameLoop | None = None,
                    encode_ahead: int = 0) -> Iterator[torch.Tensor]:
    """Yield frames [B, 3, H, W] (CPU, float32, [-1, 1]) one video frame at a time, as they are made.

    identity: [B, 3, H, W] in [-1, 1]; audio_emb: [N, D] (B = 1) or a list of B per-stream [N_b, D]; a stream may
    be a ``StreamedRows`` (encoded on a thread as its frames need it, ``encode_ahead`` batches ahead; see
    ``_RowFeed``: the same frames, and closing this generator stops the encoding).
    Streams shorter than the longest keep running on their last audio window; trim with their length.
    seed: one for the batch's noise, or one per stream (each stream's noise as alone with its seed).
    noise: None (seeded), a tensor [N, 1 + steps, B, 3, H, W], or ``fn(i, out)`` filling frame i's buffer.
    """
    streams = list(audio_emb) if isinstance(audio_emb, (list, tuple)) else [audio_emb]
    config = config or LoopConfig(batch=len(streams))
    if identity.shape[0] != len(streams) or config.batch != len(streams):
        raise ValueError(f"batch mismatch: {identity.shape[0]} identities, {len(streams)} audio streams, "
                         f"loop batch {config.batch}")
    loop = loop or FrameLoop(denoiser, config)
    windows = _AudioWindows(streams, denoiser.config.audio_window, denoiser.device, encode_ahead)
    try:
        loop.video.start(identity, seed=seed, noise=noise)
        host = _HostFrames(loop.frame)
        for i in range(max(windows.lengths)):
            loop.video.draw_noise()
            windows.fill(loop.audio, i)
            loop.run_frame()
            host.push(i, loop.frame)
            if len(host.pending) > 1:
                yield host.pop()[1]
        while host.pending:
            yield host.pop()[1]
    finally:
        windows.close()
