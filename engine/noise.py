"""Noise for the frame loop: seeded, or provided by the caller for step-for-step comparisons.

Layout for frame i: one tensor ``[1 + n_steps, B, 3, H, W]``; row 0 is the initial x_T and row
``1 + k`` the z added at respaced step k (row 1, for k = 0, is never used: the last step adds none).
Seeded noise draws these rows for frame 0, then frame 1, ... from one generator on the sampling
device, so the same seed on the same device gives the same video.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NoiseFn = Callable[[int, torch.Tensor], None]  # (frame index, out buffer) -> fills out in place


class SeededNoise:
    """Fills a frame's noise buffer from a ``torch.Generator`` seeded once per video; ``repeat``: reseeded
    every frame, so every frame gets frame 0's noise (``SamplerConfig(frame_noise="repeat")``)."""

    def __init__(self, seed: int, device: torch.device | str = "cpu", repeat: bool = False):
        self.seed, self.repeat = seed, repeat
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, frame: int, out: torch.Tensor) -> None:
        if self.repeat:
            self.generator.manual_seed(self.seed)
        torch.randn(out.shape, generator=self.generator, out=out, device=out.device, dtype=out.dtype)


class PerStreamNoise:
    """Stream b of a batch gets exactly the noise ``SeededNoise(seeds[b])`` gives a batch of one, so a
    video made in a batch is the video made alone with its seed (up to batched-kernel rounding)."""

    def __init__(self, seeds: list[int], device: torch.device | str = "cpu", repeat: bool = False):
        self.streams = [SeededNoise(s, device, repeat) for s in seeds]
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


def as_noise_fn(noise: torch.Tensor | NoiseFn | None, seed: int, device, repeat: bool = False) -> NoiseFn:
    """The caller's noise, else ``SeededNoise(seed)`` (``repeat``: the same noise every frame)."""
    if noise is None:
        return SeededNoise(seed, device, repeat)
    if isinstance(noise, torch.Tensor):
        return TensorNoise(noise)
    return noise
