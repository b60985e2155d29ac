"""Noise for the frame loop: seeded, or provided by the caller for step-for-step comparisons.

Layout for frame i: one tensor ``[1 + n_steps, B, 3, H, W]``; row 0 is the initial x_T and row
``1 + k`` the z added at respaced step k (row 1, for k = 0, is never used: the last step adds none).
Seeded noise draws these rows for frame 0, then frame 1, ... from one generator on the sampling
device, so the same seed on the same device gives the same video.

Across frames the noise is ``fresh`` (independent, the authors' way), ``repeat`` (every frame frame 0's)
or correlated: ``frame_noise = "0.8"`` gives frame i ``sqrt(0.8) s + sqrt(0.2) z_i``, with ``s`` one
draw shared by the whole video and ``z_i`` the frame's own. Every frame's noise is still exactly N(0, I),
so each frame is sampled as before given its conditioning; only the correlation between frames'
noise, here 0.8, changes (the grain that fresh noise redraws every frame is largely kept).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# The frame-noise parser and the seed bound live in engine/names.py (torch-free: CLIs check flags before
# torch loads); re-exported here.
from .names import FRAME_NOISE, MAX_SEED, noise_correlation  # noqa: F401

NoiseFn = Callable[[int, torch.Tensor], None]  # (frame index, out buffer) -> fills out in place


class SeededNoise:
    """Fills a frame's noise buffer from a ``torch.Generator`` seeded once per video. ``corr`` (module doc,
    ``noise_correlation``): 0 fresh; 1 reseeded every frame, so every frame gets frame 0's noise; between,
    the generator's first draw is the shared part (kept in a buffer made on the first call) and each frame
    then draws its own part from the same generator."""

    def __init__(self, seed: int, device: torch.device | str = "cpu", corr: float = 0.0):
        if not 0.0 <= corr <= 1.0:
            raise ValueError(f"noise correlation must be in [0, 1], got {corr}")
        self.seed, self.corr = seed, corr
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self._shared: torch.Tensor | None = None

    def __call__(self, frame: int, out: torch.Tensor) -> None:
        if self.corr == 1.0:
            self.generator.manual_seed(self.seed)
        if self.corr in (0.0, 1.0):
            torch.randn(out.shape, generator=self.generator, out=out, device=out.device, dtype=out.dtype)
            return
        if self._shared is None or self._shared.shape != out.shape:
            self._shared = torch.randn(out.shape, generator=self.generator, device=out.device, dtype=out.dtype)
        torch.randn(out.shape, generator=self.generator, out=out, device=out.device, dtype=out.dtype)
        out.mul_((1.0 - self.corr) ** 0.5).add_(self._shared, alpha=self.corr ** 0.5)


class PerStreamNoise:
    """Stream b of a batch gets exactly the noise ``SeededNoise(seeds[b])`` gives a batch of one, so a
    video made in a batch is the video made alone with its seed (up to batched-kernel rounding)."""

    def __init__(self, seeds: list[int], device: torch.device | str = "cpu", corr: float = 0.0):
        self.streams = [SeededNoise(s, device, corr) for s in seeds]
        self._one: torch.Tensor | None = None  # [1 + n_steps, 1, 3, H, W] scratch, made on first use

    def __call__(self, frame: int, out: torch.Tensor) -> None:
        if out.shape[1] != len(self.streams):
            raise ValueError(f"noise for {len(self.streams)} streams, buffer holds {out.shape[1]}")
        if len(self.streams) == 1 and out.is_contiguous():  # a batch of one: fill in place, no scratch copy
            self.streams[0](frame, out)
            return
        if self._one is None:
            self._one = torch.empty_like(out[:, :1], memory_format=torch.contiguous_format)
        for b, stream in enumerate(self.streams):
            stream(frame, self._one)
            out[:, b : b + 1].copy_(self._one)


class TensorNoise:
    """Caller-provided noise: ``noise[i]`` is frame i's ``[1 + n_steps, B, 3, H, W]`` tensor."""

    def __init__(self, noise: torch.Tensor):
        self.noise = noise

    def __call__(self, frame: int, out: torch.Tensor) -> None:
        out.copy_(self.noise[frame], non_blocking=True)


def as_noise_fn(noise: torch.Tensor | NoiseFn | None, seed: int | Sequence[int], device,
                corr: float = 0.0) -> NoiseFn:
    """A video's noise, the one place a frame loop's seeded noise is made: the caller's ``noise`` (a tensor
    ``[N, 1 + n_steps, B, 3, H, W]`` or a function), else ``seed`` (an int: ``SeededNoise`` over the whole
    batch; one seed per stream: ``PerStreamNoise``, each stream as alone), frames' noise correlated ``corr``."""
    if noise is None:
        if isinstance(seed, Sequence):
            return PerStreamNoise(list(seed), device, corr)
        return SeededNoise(seed, device, corr)
    if isinstance(noise, torch.Tensor):
        return TensorNoise(noise)
    return noise
