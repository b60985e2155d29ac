"""Continuous batching: live streams that join and leave at frame boundaries share one UNet call per step.

A :class:`Stream` owns its audio embeddings ``[N, D]`` (which may grow while speech arrives), its sampling
plan, and one ``generate.FrameState`` of batch 1: what crosses its frames (identity ``[1, 3, S, S]``, motion
ring, seeded noise, last frame, frame index), the same state ``FrameLoop`` and the reference loop drive.
:meth:`Batcher.step` makes one frame of every stream that is ready: each stream runs the one step loop of a
frame (``plan.frame_steps``), and for respaced step ``r`` of the frame the batcher concatenates the ``x`` of
the streams still running (each at its own timestep, so streams with different step counts or warm starts
batch together), calls the denoiser once, and sends each stream its row. Rows never mix: a stream's frames
are those it makes alone, up to batched-kernel rounding of the UNet (``tests/test_batcher.py`` states the
tolerance). The batch changes size from step to step, so this loop allocates per step and captures no CUDA
graph (``FrameLoop`` remains the fixed-batch, graph-safe path)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .backends.base import Denoiser
from .conditioning import audio_window_indices
from .config import DiffusionConfig, SamplerConfig
from .generate import FrameState
from .image import to_uint8_frames
from .plan import FrameSteps, SamplingPlan, make_plan


@dataclass(frozen=True)
class Frame:
    """One finished frame of one stream: its index in the stream and uint8 pixels ``[S, S, 3]``."""

    stream: Stream
    index: int
    rgb: np.ndarray


class Stream:
    """One video's stream. Feed embeddings with :meth:`feed`; ``final`` once the speech is whole. What crosses
    its frames (identity, motion ring, seeded noise, last frame, frame count) is one ``FrameState`` of batch 1
    (``video``), the state ``FrameLoop`` and the reference loop drive too.

    Frame i needs embeddings ``i - w .. i + w`` (``w`` = the model's audio window, clamped at the ends), so
    while speech is still arriving frame i waits for row ``i + w``; once ``final``, every row is known.
    """

    def __init__(self, denoiser: Denoiser, identity: torch.Tensor, *, diffusion: DiffusionConfig = DiffusionConfig(),
                 sampler: SamplerConfig | None = None, seed: int = 0, audio_emb: torch.Tensor | None = None,
                 final: bool = True, name: str = ""):
        cfg, dev = denoiser.config, denoiser.device
        self.name, self.window = name, cfg.audio_window
        self.plan: SamplingPlan = make_plan(diffusion, sampler)
        self.video = FrameState(self.plan, cfg, 1, dev)
        self.video.start(identity.to(dev, torch.float32).reshape(1, 3, cfg.image_size, cfg.image_size), seed=seed)
        self.identity, self.tables = self.video.identity, self.video.tables
        self.emb = torch.empty(0, cfg.audio_dim, device=dev)
        self.final = False
        self.paused = False  # set by the consumer (backpressure): a paused stream sits out frames
        self._lock = threading.Lock()
        if audio_emb is not None or final:
            self.feed(audio_emb if audio_emb is not None else self.emb, final=final)

    @property
    def frames_done(self) -> int:
        return self.video.frames_done

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

    def _begin(self) -> tuple[FrameSteps, torch.Tensor, int]:
        """Draw the frame's noise; return (its step loop, its audio window [1, 2w+1, D], its first step)."""
        with self._lock:
            emb = self.emb
        idx = audio_window_indices(emb.shape[0], self.window, frames=[self.frames_done]).to(emb.device)
        self.video.draw_noise()
        x, start = self.video.begin()
        return self.video.steps(x, start), emb[idx], start

    def _finish(self, x: torch.Tensor) -> Frame:
        self.video.finish(x)
        return Frame(self, self.frames_done - 1, to_uint8_frames(self.video.frame)[0])


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
        steps = [b[0] for b in begun]
        audio = [b[1] for b in begun]
        starts = [b[2] for b in begun]
        at = [next(g) for g in steps]  # each stream's (x, respaced step k) waiting for its model output
        made: list[torch.Tensor | None] = [None] * len(live)
        rounds = max(k + 1 for k in starts)
        self.last_batch = len(live)
        for r in range(rounds):
            # streams with fewer calls this frame join on the later rounds, so every stream ends on round -1
            rows = [j for j, k in enumerate(starts) if k + 1 >= rounds - r]
            out = self.denoiser(torch.cat([at[j][0] for j in rows]),
                                torch.stack([live[j].tables.timesteps[at[j][1]].float() for j in rows]),
                                torch.cat([live[j].identity for j in rows]),
                                torch.cat([live[j].video.ring.flat for j in rows]),
                                torch.cat([audio[j] for j in rows]))
            self.unet_calls += 1
            for n, j in enumerate(rows):  # each stream's own step (plan.frame_steps) on its row
                try:
                    at[j] = steps[j].send(out[n : n + 1])
                except StopIteration as done:
                    made[j] = done.value
        return [s._finish(x) for s, x in zip(live, made)]
