"""The sampling plan: which original timesteps a frame visits and with which coefficients, from the artifact.

Built once from the engine's recorded :class:`DiffusionConfig` (T, schedule kind, and ``sampling``: its
default :class:`SamplerConfig`) and an optional :class:`SamplerConfig` chosen over it. The frame loop, the reference loop, dh-bench
and training's preview all take their schedule from here; ``denoise_frame`` is the one loop contract
they share.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

from . import names
from .config import DiffusionConfig, SamplerConfig
from .sampling import SamplerSpec, StepTables, get_sampler, make_state, make_tables
from .schedule import Schedule, authors_float32_columns, respace, schedule_for


def default_sampler(diffusion: DiffusionConfig) -> SamplerConfig:
    """The sampler an artifact records as its default: ``diffusion.sampling``, all of it (warm start, eta and
    tables included). Kept as a name for callers written before ``DiffusionConfig`` carried it."""
    return diffusion.sampling


# Named sampler choices (their names: engine/names.py PRESETS). "quality": the artifact's own default.
# "realtime": chosen from the frontier of the demo model (benchmarks/results/frontier_demo.md, docs/benchmarks.md "Quality
# vs calls per frame"): no row under 100 calls matched DDPM-100 within its seed spread; DPM-Solver++(2M) SDE at
# 10 calls came closest to the demo's default (DDPM 25: F-MSE 49.8 vs 42.7, OFM 0.21 vs 0.19) at 40% of its
# calls. Warm starts scored better F-MSE but grow visible streaks over seconds, which the metrics miss.
PRESETS: dict[str, SamplerConfig | None] = {
    "quality": None,
    "realtime": SamplerConfig(name="dpmpp_2m_sde", steps=10),
}
assert tuple(PRESETS) == names.PRESETS, "engine/names.py PRESETS and plan.PRESETS disagree"


def preset_sampler(name: str, diffusion: DiffusionConfig) -> SamplerConfig:
    """The sampler a preset names for an artifact (``quality``: its recorded default)."""
    return PRESETS[names.check_preset(name)] or diffusion.sampling


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """A respaced schedule (float64) for one sampler, and where a frame starts on it."""

    diffusion: DiffusionConfig
    sampler: SamplerConfig
    base: Schedule
    schedule: Schedule

    @property
    def steps(self) -> int:
        return len(self.schedule)

    @property
    def spec(self) -> SamplerSpec:
        return get_sampler(self.sampler.name)

    def start(self, warm: bool) -> int:
        """Respaced index a frame's first step runs at: n-1 from pure noise, ``warm_steps - 1`` warm."""
        w = self.sampler.warm_steps
        return w - 1 if warm and 0 < w < self.steps else self.steps - 1

    def calls(self, warm: bool = False) -> int:
        """UNet calls per frame."""
        return self.start(warm) + 1

    def tables(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> StepTables:
        authors = authors_float32_columns(self.base, self.steps) if self.sampler.tables == "authors" else None
        return make_tables(self.schedule, device, dtype, eta=self.sampler.eta, authors=authors)


def make_plan(diffusion: DiffusionConfig = DiffusionConfig(), sampler: SamplerConfig | None = None) -> SamplingPlan:
    """The plan for an artifact's ``diffusion`` config; ``sampler`` None = the artifact's default."""
    sampler = sampler or diffusion.sampling
    names.check_steps(sampler.steps, diffusion.num_timesteps)
    base = schedule_for(diffusion)
    return SamplingPlan(diffusion=diffusion, sampler=sampler, base=base, schedule=respace(base, sampler.steps, sampler.spacing))


ModelFn = Callable[[torch.Tensor, int], torch.Tensor]


def warm_start(x: torch.Tensor, prev: torch.Tensor, z: torch.Tensor, tables: StepTables, k: int) -> torch.Tensor:
    """``x_t = sqrt(abar_k) prev + sqrt(1 - abar_k) z``, written into ``x``: the previous frame, noised."""
    return x.copy_(tables.sqrt_abar[k] * prev + tables.sqrt_one_minus_abar[k] * z)


FrameSteps = Generator[tuple[torch.Tensor, int], torch.Tensor, torch.Tensor]


def frame_steps(x: torch.Tensor, plan: SamplingPlan, tables: StepTables, noise: torch.Tensor,
                state: tuple[torch.Tensor, ...], start: int) -> FrameSteps:
    """The one step loop of a frame, for k = start..0: yields ``(x, k)``, is sent the model's output for it,
    and steps ``x = step(x, out, tables, k, noise[1 + k], clip, state, i)``; returns the frame (StopIteration).

    ``x``: x at respaced step ``start`` [B, 3, H, W]; ``noise``: the frame's [1 + n, B, 3, H, W] noise. The
    caller makes the model calls, so one caller can batch the calls of several streams (``Batcher``).
    """
    step, clip = plan.spec.step, plan.sampler.clip_denoised
    for i, k in enumerate(range(start, -1, -1)):
        out = yield x, k
        x = step(x, out, tables, k, noise[1 + k], clip, state, i)
    return x


def denoise_frame(model: ModelFn, x: torch.Tensor, plan: SamplingPlan, tables: StepTables, noise: torch.Tensor,
                  state: tuple[torch.Tensor, ...], start: int) -> torch.Tensor:
    """``frame_steps`` driven by one model: ``for k = start..0: x = step(x, model(x, k), ...)``; the frame."""
    steps = frame_steps(x, plan, tables, noise, state, start)
    x, k = next(steps)
    try:
        while True:
            x, k = steps.send(model(x, k))
    except StopIteration as done:
        return done.value


__all__ = ["PRESETS", "SamplingPlan", "default_sampler", "denoise_frame", "frame_steps", "make_plan", "make_state", "preset_sampler",
           "warm_start"]
