"""Sampler steps: small pure functions ``(x_t, model_out, tables, k, noise) -> x_{k-1}``.

``tables`` holds every per-step coefficient as a device tensor, cast once from the float64 schedule,
so a step does no host work, no host-device copy and no allocation beyond its arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from .schedule import Schedule


class StepTables(NamedTuple):
    """Per-step coefficients, each a [n] tensor on the sampling device (timesteps: int64)."""

    timesteps: torch.Tensor
    sqrt_recip_abar: torch.Tensor
    sqrt_recipm1_abar: torch.Tensor
    log_beta: torch.Tensor
    log_beta_tilde: torch.Tensor
    mean_coef_x0: torch.Tensor
    mean_coef_xt: torch.Tensor
    sqrt_abar_prev: torch.Tensor
    ddim_sigma: torch.Tensor
    ddim_eps_coef: torch.Tensor


def make_tables(schedule: Schedule, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                eta: float = 0.0) -> StepTables:
    """Compute every coefficient in float64 and cast once to ``dtype`` on ``device``."""
    s = schedule
    abar, abar_prev = s.alphas_cumprod, s.alphas_cumprod_prev
    sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
    cols = dict(
        sqrt_recip_abar=s.sqrt_recip_alphas_cumprod,
        sqrt_recipm1_abar=s.sqrt_recipm1_alphas_cumprod,
        log_beta=s.log_betas,
        log_beta_tilde=s.posterior_log_variance_clipped,
        mean_coef_x0=s.posterior_mean_coef1,
        mean_coef_xt=s.posterior_mean_coef2,
        sqrt_abar_prev=s.sqrt_alphas_cumprod_prev,
        ddim_sigma=sigma,
        ddim_eps_coef=np.sqrt(np.maximum(1 - abar_prev - sigma**2, 0.0)),
    )
    t = torch.tensor(np.array(s.timesteps), dtype=torch.int64, device=device)
    return StepTables(timesteps=t, **cast_columns(cols, device, dtype))


def cast_columns(cols: dict[str, np.ndarray], device: torch.device | str, dtype: torch.dtype
                 ) -> dict[str, torch.Tensor]:
    """float64 schedule arrays -> ``dtype`` tensors on ``device``: the one cast, at the edge."""
    return {k: torch.as_tensor(v, dtype=dtype, device=device) for k, v in cols.items()}


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, tables: StepTables, k: int, clip: bool = True) -> torch.Tensor:
    """x0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps, clamped to [-1, 1]."""
    x0 = tables.sqrt_recip_abar[k] * x_t - tables.sqrt_recipm1_abar[k] * eps
    return x0.clamp(-1.0, 1.0) if clip else x0


def _split(model_out: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = model_out.to(like.dtype)
    if out.shape[1] == 2 * like.shape[1]:
        eps, v = out.chunk(2, dim=1)
        return eps, v
    return out, None


def ddpm_step(x_t: torch.Tensor, model_out: torch.Tensor, tables: StepTables, k: int,
              noise: torch.Tensor | None, clip: bool = True) -> torch.Tensor:
    """Ancestral DDPM step with learned-range variance (Nichol & Dhariwal Eq. 15); no noise at k = 0.

    ``logvar = nu log(beta) + (1 - nu) log(beta_tilde_clipped)`` with ``nu = (v + 1) / 2``;
    ``mean = coef_x0 x0 + coef_xt x_t``. Without a variance output, ``logvar = log(beta_tilde_clipped)``.
    """
    eps, v = _split(model_out, x_t)
    x0 = predict_x0(x_t, eps, tables, k, clip)
    mean = tables.mean_coef_x0[k] * x0 + tables.mean_coef_xt[k] * x_t
    if k == 0 or noise is None:
        return mean
    if v is None:
        logvar = tables.log_beta_tilde[k]
    else:
        nu = (v + 1) * 0.5
        logvar = nu * tables.log_beta[k] + (1 - nu) * tables.log_beta_tilde[k]
    return mean + torch.exp(0.5 * logvar) * noise


def ddim_step(x_t: torch.Tensor, model_out: torch.Tensor, tables: StepTables, k: int,
              noise: torch.Tensor | None, clip: bool = True) -> torch.Tensor:
    """DDIM step (Song et al. Eq. 12) with eps re-derived from the clamped x0; eta lives in ``tables``.

    ``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z`` (no z at k = 0).
    """
    eps, _ = _split(model_out, x_t)
    x0 = predict_x0(x_t, eps, tables, k, clip)
    eps = (tables.sqrt_recip_abar[k] * x_t - x0) / tables.sqrt_recipm1_abar[k]
    x_prev = tables.sqrt_abar_prev[k] * x0 + tables.ddim_eps_coef[k] * eps
    if k == 0 or noise is None:
        return x_prev
    return x_prev + tables.ddim_sigma[k] * noise


StepFn = Callable[..., torch.Tensor]
SAMPLERS: dict[str, StepFn] = {"ddpm": ddpm_step, "ddim": ddim_step}


def get_step(name: str) -> StepFn:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]
