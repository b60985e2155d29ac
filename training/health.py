"""Model-health check: can the UNet see colour? (issue: colour flicker of a mean-blind model).

A UNet whose normalisation erases each channel's spatial mean (GroupNorm with one channel per group)
cannot predict the spatial mean (the DC) of the noise. Missing it costs almost nothing in the noise
MSE (the DC of 64x64 Gaussian noise has variance 1/4096), but the sampler multiplies the eps error by
``sqrt(1/abar - 1)`` (15 at t = 957, 20,000 at t = 999), so at the noisy steps each frame's global
colour is set by the noise: the video flickers from frame to frame whatever the sampler.

Two measurements on real frames with their real conditioning (identity, motion frames, audio):

* ``dc_slope[t]``: the least-squares slope of the predicted noise's per-channel spatial mean against the
  true noise's, over every (sample, channel) pair. A model that sees colour scores about 1; a mean-blind
  one about 0.
* ``x0_color_error[t]``: the mean |per-channel spatial mean of the predicted x0 (clamped to [-1, 1], as the
  sampler does) - that of the true x0|, in levels of 255. At t = 999 x_t holds no trace of x0, so this is
  the colour the model infers from the identity and motion frames alone.

``check_health`` runs both at t = 999, 900 and 500 and compares them with ``HealthLimits``. The x0 colour
error is judged at t <= 900 only (``HealthLimits.max_color_t``): at t = 999 (SNR 2e-9) the predicted x0 is
about ``2e4 (x_t - eps)``, and the clamp saturates nearly every pixel for any eps model, so the clamped mean
measures the detail's error, not the colour (measured: a model whose x0 mean is exactly the identity's
before the clamp scores 20 levels there). It is still reported; the DC slope is judged at every t.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .diffusion import DiffusionTables, extract

log = logging.getLogger(__name__)

HEALTH_TIMESTEPS = (999, 900, 500)

# net(x_t, timesteps, identity, motion_frames=..., audio_emb=...) -> [B, 3 or 6, H, W]
UNetCall = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class HealthLimits:
    """Pass marks. The slope floor is far from both ends (mean-blind: ~0.01; healthy: ~1); the colour bound
    (levels of 255) is judged at timesteps up to ``max_color_t`` (see the module docstring for why not 999)."""

    min_dc_slope: float = 0.5
    max_x0_color_error: float = 12.0  # levels of 255
    max_color_t: int = 900


@dataclass(frozen=True)
class HealthReport:
    """Per-timestep measurements (keys are the timesteps as strings, for JSON), and the verdict."""

    dc_slope: dict[str, float]
    x0_color_error: dict[str, float]
    samples: int
    limits: HealthLimits = field(default_factory=HealthLimits)

    @property
    def failures(self) -> list[str]:
        out = [f"dc_slope at t={t} is {v:.3f} (< {self.limits.min_dc_slope})"
               for t, v in self.dc_slope.items() if not v >= self.limits.min_dc_slope]
        out += [f"x0 colour error at t={t} is {v:.1f} levels (> {self.limits.max_x0_color_error})"
                for t, v in self.x0_color_error.items()
                if int(t) <= self.limits.max_color_t and not v <= self.limits.max_x0_color_error]
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        slopes = " ".join(f"{t}:{v:.2f}" for t, v in self.dc_slope.items())
        colours = " ".join(f"{t}:{v:.1f}" for t, v in self.x0_color_error.items())
        return f"dc_slope {slopes}; x0 colour error (levels) {colours}"

    def to_dict(self) -> dict:
        return {"dc_slope": self.dc_slope, "x0_color_error": self.x0_color_error, "samples": self.samples,
                "passed": self.passed, "failures": self.failures, "limits": asdict(self.limits)}


def dc_slope(pred_eps: torch.Tensor, true_eps: torch.Tensor) -> float:
    """Slope of the least-squares line through (true, predicted) per-channel spatial means ([B, 3, H, W] each)."""
    x = true_eps.double().mean(dim=(2, 3)).flatten()
    y = pred_eps.double().mean(dim=(2, 3)).flatten()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


def color_error(pred_x0: torch.Tensor, true_x0: torch.Tensor) -> float:
    """Mean |difference of per-channel spatial means| of two [B, 3, H, W] batches in [-1, 1], in levels of 255."""
    d = pred_x0.double().mean(dim=(2, 3)) - true_x0.double().mean(dim=(2, 3))
    return float(d.abs().mean() * 127.5)


@torch.no_grad()
def measure(net: UNetCall, batch: dict[str, torch.Tensor], tables: DiffusionTables,
            timesteps: Sequence[int] = HEALTH_TIMESTEPS, seed: int = 0,
            limits: HealthLimits = HealthLimits()) -> HealthReport:
    """Run the two measurements on ``batch`` (``x0``, ``identity``, ``motion``, ``audio`` as FrameDataset
    gives them, stacked) with noise from ``seed``; the same seed gives the same report."""
    x0 = batch["x0"].float()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    slopes, colours = {}, {}
    for t_val in timesteps:
        t = torch.full((x0.shape[0],), int(t_val), dtype=torch.int64, device=x0.device)
        x_t = extract(tables.sqrt_alphas_cumprod, t, 4) * x0 + extract(tables.sqrt_one_minus_alphas_cumprod, t, 4) * noise
        out = net(x_t, t.float(), batch["identity"], motion_frames=batch["motion"], audio_emb=batch["audio"])
        eps = out[:, :3].float()
        pred_x0 = (extract(tables.sqrt_recip_alphas_cumprod, t, 4) * x_t
                   - extract(tables.sqrt_recipm1_alphas_cumprod, t, 4) * eps).clamp(-1.0, 1.0)
        slopes[str(t_val)] = dc_slope(eps, noise)
        colours[str(t_val)] = color_error(pred_x0, x0)
    return HealthReport(slopes, colours, int(x0.shape[0]), limits)


def health_batch(dataset, n: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` samples of a FrameDataset spread evenly over its clips and frames (a fixed, seeded choice)."""
    import numpy as np

    from .dataset import choose_identity

    rng = np.random.default_rng(seed)
    lengths = dataset.store.lengths
    specs = []
    for i in range(n):
        k = i % len(lengths)
        target = int(rng.integers(lengths[k]))
        specs.append((k, target, choose_identity(rng, lengths[k], target, "random")))
    items = [dataset[s] for s in specs]
    return {key: torch.stack([it[key] for it in items]) for key in ("x0", "identity", "motion", "audio")}


def append_report(path: Path, step: int, report: HealthReport) -> None:
    """One JSON line per checked checkpoint (``health.jsonl`` in the run folder)."""
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **report.to_dict()}) + "\n")


def log_report(report: HealthReport, where: str) -> None:
    """INFO when healthy; a loud WARNING naming every failed measurement otherwise."""
    if report.passed:
        log.info("model health OK at %s: %s", where, report.summary())
        return
    log.warning("MODEL HEALTH CHECK FAILED at %s: %s. The model does not control the frame's colour at the "
                "noisy steps; its videos will flicker. Measured: %s", where, "; ".join(report.failures),
                report.summary())
