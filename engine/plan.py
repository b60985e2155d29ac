"""The sampling plan: which original timesteps a frame visits and with which coefficients, from the artifact.

Built once from the engine's recorded :class:`DiffusionConfig` (T, schedule kind, default sampler and
steps) and an optional :class:`SamplerConfig` override. The frame loop, the reference loop, dh-bench
and training's preview all take their schedule from here; ``denoise_frame`` is the one loop contract
they share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import DiffusionConfig, SamplerConfig
from .sampling import SamplerSpec, StepTables, get_sampler, make_state, make_tables
from .schedule import Schedule, authors_float32_columns, respace, schedule_for


def default_sampler(diffusion: DiffusionConfig) -> SamplerConfig:
    """The sampler and step count an artifact records as its default."""
    return SamplerConfig(name=diffusion.sampler, steps=diffusion.sampling_steps, frame_noise=diffusion.frame_noise,
                         spacing=diffusion.spacing)


# Named sampler choices. "quality": the artifact's own default. "realtime": chosen from the frontier of the
# demo model (benchmarks/results/frontier_demo.md, README "Quality vs calls per frame"): no row under 100
# calls matched DDPM-100 within its seed spread; DPM-Solver++(2M) SDE at 10 calls came closest to the
# demo's default (DDPM 25: F-MSE 49.8 vs 42.7, OFM 0.21 vs 0.19) at 40% of its calls. Warm starts scored
# better F-MSE but grow visible streaks over seconds, which the metrics miss.
PRESETS: dict[str, SamplerConfig | None] = {
    "quality": None,
    "realtime": SamplerConfig(name="dpmpp_2m_sde", steps=10),
}


def choose_sampler(diffusion: DiffusionConfig, base: SamplerConfig | None = None, **choices) -> SamplerConfig:
    """``base`` (None: the artifact's recorded sampler) with the fields a user chose; a choice of None keeps
    base's. The one merge behind dh-run's flags and dh-serve's request fields, so a client that sets only
    ``steps`` keeps the engine's sampler, spacing, frame noise and warm start. ValueError (one line) for a
    value ``SamplerConfig`` refuses, or more steps than the model's diffusion timesteps."""
    base = base or default_sampler(diffusion)
    given = {k: v for k, v in choices.items() if v is not None}
    steps = given.get("steps")
    if steps is not None and steps > diffusion.num_timesteps:
        raise ValueError(f"steps must be at most {diffusion.num_timesteps} (the model's diffusion timesteps), "
                         f"got {steps}")
    return dataclasses.replace(base, **given)


def preset_sampler(name: str, diffusion: DiffusionConfig) -> SamplerConfig:
    """The sampler a preset names for an artifact (``quality``: its recorded default)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name] or default_sampler(diffusion)


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
    sampler = sampler or default_sampler(diffusion)
    if sampler.steps > diffusion.num_timesteps:
        raise ValueError(f"steps must be in 1..{diffusion.num_timesteps} for this model "
                         f"(trained with T = {diffusion.num_timesteps}), got {sampler.steps}")
    base = schedule_for(diffusion)
    return SamplingPlan(diffusion=diffusion, sampler=sampler, base=base, schedule=respace(base, sampler.steps, sampler.spacing))


ModelFn = Callable[[torch.Tensor, int], torch.Tensor]


def warm_start(x: torch.Tensor, prev: torch.Tensor, z: torch.Tensor, tables: StepTables, k: int) -> torch.Tensor:
    """``x_t = sqrt(abar_k) prev + sqrt(1 - abar_k) z``, written into ``x``: the previous frame, noised."""
    return x.copy_(tables.sqrt_abar[k] * prev + tables.sqrt_one_minus_abar[k] * z)


def denoise_frame(model: ModelFn, x: torch.Tensor, plan: SamplingPlan, tables: StepTables, noise: torch.Tensor,
                  state: tuple[torch.Tensor, ...], start: int) -> torch.Tensor:
    """The loop contract: ``for k = start..0: x = step(x, model(x, k), tables, k, noise[1 + k], clip, state, i)``.

    ``x``: x at respaced step ``start`` [B, 3, H, W]; ``noise``: the frame's [1 + n, B, 3, H, W] noise.
    """
    step, clip = plan.spec.step, plan.sampler.clip_denoised
    for i, k in enumerate(range(start, -1, -1)):
        x = step(x, model(x, k), tables, k, noise[1 + k], clip, state, i)
    return x


__all__ = ["PRESETS", "SamplingPlan", "choose_sampler", "default_sampler", "denoise_frame", "make_plan", "make_state", "preset_sampler",
           "warm_start"]
