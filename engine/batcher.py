"""Continuous batching: live streams that join and leave at frame boundaries share one UNet call per step.

A :class:`Stream` owns everything that crosses its frames (identity ``[1, 3, S, S]``, its audio embeddings
``[N, D]``, which may grow while speech arrives, its motion ring, its seeded noise generator, its sampling
plan and its frame index). :meth:`Batcher.step` makes one frame of every stream that is ready: for
respaced step ``r`` of the frame it concatenates the ``x`` of the streams still running (each at its own
timestep, so streams with different step counts or warm starts batch together), calls the denoiser once,
and applies each stream's own sampler step (``plan.spec.step``, the functions of ``sampling.py``) to its
row. Rows never mix: a stream's frames are those it makes alone, up to batched-kernel rounding of the UNet
(``tests/test_batcher.py`` states the tolerance). The batch changes size from step to step, so this loop
allocates per step and captures no CUDA graph (``FrameLoop`` remains the fixed-batch, graph-safe path).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .backends.base import Denoiser
from .conditioning import MotionRing, audio_window_indices
from .config import DiffusionConfig, SamplerConfig
from .image import to_uint8_frames
from .noise import SeededNoise
from .plan import SamplingPlan, make_plan, make_state, warm_start


@dataclass(frozen=True)
class Frame:
    """One finished frame of one stream: its index in the stream and uint8 pixels ``[S, S, 3]``."""

    stream: Stream
    index: int
    rgb: np.ndarray


class Stream:
    """Per-stream state of one video. Feed embeddings with :meth:`feed`; ``final`` once the speech is whole.

    Frame i needs embeddings ``i - w .. i + w`` (``w`` = the model's audio window, clamped at the ends), so
    while speech is still arriving frame i waits for row ``i + w``; once ``final``, every row is known.
    """

    def __init__(self, denoiser: Denoiser, identity: torch.Tensor, *, diffusion: DiffusionConfig = DiffusionConfig(),
                 sampler: SamplerConfig | None = None, seed: int = 0, audio_emb: torch.Tensor | None = None,
                 final: bool = True, name: str = ""):
        cfg, dev = denoiser.config, denoiser.device
        self.name, self.window = name, cfg.audio_window
        self.plan: SamplingPlan = make_plan(diffusion, sampler)
        self.tables = self.plan.tables(dev)
        self.identity = identity.to(dev, torch.float32).reshape(1, 3, cfg.image_size, cfg.image_size)
        self.ring = MotionRing(1, cfg.motion_frames, 1 if cfg.grayscale_motion else 3, cfg.image_size, device=dev,
                               grayscale=cfg.grayscale_motion)
        self.ring.reset(self.identity)
        self.noise_fn = SeededNoise(seed, dev, corr=self.plan.sampler.noise_corr)
        self.noise = torch.empty(self.plan.steps + 1, 1, 3, cfg.image_size, cfg.image_size, device=dev)
        self.last = torch.empty_like(self.identity)  # the previous frame, for warm starts
        self.emb = torch.empty(0, cfg.audio_dim, device=dev)
        self.final = False
        self.frames_done = 0
        self.paused = False  # set by the consumer (backpressure): a paused stream sits out frames
        self._lock = threading.Lock()
        if audio_emb is not None or final:
            self.feed(audio_emb if audio_emb is not None else self.emb, final=final)

    def feed(self, audio_emb: torch.Tensor, *, final: bool = False) -> None:
        """Replace the embeddings with those of all the speech so far ``[N, D]`` (N may only grow)."""
        with self._lock:
            emb = audio_emb.to(self.emb.device, torch.float32)
            if emb.shape[0] < self.frames_done:
                raise ValueError(f"audio shrank to {emb.shape[0]} frames after {self.frames_done} were made")
            self.emb, self.final = emb, self.final or final

    @property
    def n_frames(self) -> int | None:
        """Frames this stream will make in all: None until its speech is final."""
        return int(self.emb.shape[0]) if self.final else None

    @property
    def available(self) -> int:
        """Frames whose audio window is known now."""
        n = int(self.emb.shape[0])
        return n if self.final else max(0, n - self.window)

    @property
    def ready(self) -> bool:
        return not self.paused and self.frames_done < self.available

    @property
    def done(self) -> bool:
        return self.final and self.frames_done >= self.emb.shape[0]

    def _begin(self) -> tuple[torch.Tensor, torch.Tensor, int, tuple[torch.Tensor, ...]]:
        """Draw the frame's noise and return (x at its first step, its audio window [1, 2w+1, D], start, state)."""
        with self._lock:
            emb = self.emb
        idx = audio_window_indices(emb.shape[0], self.window, frames=[self.frames_done]).to(emb.device)
        self.noise_fn(self.frames_done, self.noise)
        warm = self.frames_done > 0 and self.plan.calls(True) < self.plan.steps
        start = self.plan.start(warm)
        x = warm_start(torch.empty_like(self.last), self.last, self.noise[0], self.tables, start) if warm \
            else self.noise[0].clone()
        return x, emb[idx], start, make_state(self.plan.spec, x)

    def _finish(self, x: torch.Tensor) -> Frame:
        self.last.copy_(x)
        self.ring.push(x)
        self.frames_done += 1
        return Frame(self, self.frames_done - 1, to_uint8_frames(x)[0])


class Batcher:
    """Makes one frame of every ready stream per :meth:`step`, one denoiser call per sampler step for all."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.unet_calls = 0
        self.last_batch = 0

    @torch.no_grad()
    def step(self, streams: Sequence[Stream]) -> list[Frame]:
        """One frame of each stream in ``streams`` that is ``ready``; the others are left as they are."""
        live = [s for s in streams if s.ready]
        if not live:
            return []
        begun = [s._begin() for s in live]
        xs = [b[0] for b in begun]
        audio = [b[1] for b in begun]
        starts = [b[2] for b in begun]
        states = [b[3] for b in begun]
        rounds = max(k + 1 for k in starts)
        self.last_batch = len(live)
        for r in range(rounds):
            # streams with fewer calls this frame join on the later rounds, so every stream ends on round -1
            rows = [j for j, k in enumerate(starts) if k + 1 >= rounds - r]
            ks = [starts[j] - (r - (rounds - starts[j] - 1)) for j in rows]
            out = self.denoiser(torch.cat([xs[j] for j in rows]),
                                torch.stack([live[j].tables.timesteps[k].float() for j, k in zip(rows, ks)]),
                                torch.cat([live[j].identity for j in rows]),
                                torch.cat([live[j].ring.flat for j in rows]),
                                torch.cat([audio[j] for j in rows]))
            self.unet_calls += 1
            for n, (j, k) in enumerate(zip(rows, ks)):
                s = live[j]
                i = starts[j] - k  # steps this stream has taken in this frame
                xs[j] = s.plan.spec.step(xs[j], out[n : n + 1], s.tables, k, s.noise[1 + k],
                                         s.plan.sampler.clip_denoised, states[j], i)
        return [s._finish(x) for s, x in zip(live, xs)]
