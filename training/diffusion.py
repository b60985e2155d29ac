"""The forward process and the variational-bound terms for training (improved DDPM, Nichol & Dhariwal 2021).

Every coefficient comes from the engine's float64 :class:`~dheads.engine.schedule.Schedule` and is
cast once to a device tensor (``DiffusionTables``); nothing here re-derives the schedule formulas.
Timesteps ``t`` are ORIGINAL indices 0..T-1 of the (unrespaced) training schedule.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from dheads.engine.sampling import cast_columns
from dheads.engine.schedule import Schedule, schedule_for  # noqa: F401  (schedule_for: re-exported)

LOG2 = math.log(2.0)


class DiffusionTables(NamedTuple):
    """Per-timestep coefficients, each a [T] tensor: the :class:`Schedule` properties of the same names,
    computed in float64 there and cast once."""

    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    log_betas: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        return self.sqrt_alphas_cumprod.shape[0]


def make_tables(schedule: Schedule, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> DiffusionTables:
    """Cast the schedule's float64 quantities to ``dtype`` tensors on ``device``."""
    return DiffusionTables(**cast_columns({f: getattr(schedule, f) for f in DiffusionTables._fields}, device, dtype))


def extract(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``table[t]`` shaped ``[B, 1, ..., 1]`` to broadcast against an ``ndim``-d batch."""
    return table[t].view(-1, *([1] * (ndim - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, tables: DiffusionTables) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. Eq. 4)."""
    nd = x0.ndim
    return (extract(tables.sqrt_alphas_cumprod, t, nd) * x0
            + extract(tables.sqrt_one_minus_alphas_cumprod, t, nd) * noise)


def q_posterior(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, tables: DiffusionTables
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and clipped log-variance of q(x_{t-1} | x_t, x0) (Ho et al. Eq. 6-7)."""
    nd = x0.ndim
    mean = extract(tables.posterior_mean_coef1, t, nd) * x0 + extract(tables.posterior_mean_coef2, t, nd) * x_t
    return mean, extract(tables.posterior_log_variance_clipped, t, nd)


def p_mean_logvar(model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, tables: DiffusionTables,
                  clip_x0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and log-variance of p(x_{t-1} | x_t) from ``model_out = [eps | v]`` ([B, 6, H, W]).

    Learned-range variance (Nichol & Dhariwal Eq. 15): ``logvar = nu log beta + (1 - nu) log beta_tilde``
    with ``nu = (v + 1) / 2``; the mean is the posterior mean at the predicted x0, clamped to [-1, 1]
    with ``clip_x0`` (the authors' training code; improved-diffusion does not clamp in training).
    """
    eps, v = model_out.chunk(2, dim=1)
    nd = x_t.ndim
    x0 = (extract(tables.sqrt_recip_alphas_cumprod, t, nd) * x_t
          - extract(tables.sqrt_recipm1_alphas_cumprod, t, nd) * eps)
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    mean, _ = q_posterior(x0, x_t, t, tables)
    nu = (v + 1.0) * 0.5
    logvar = nu * extract(tables.log_betas, t, nd) + (1.0 - nu) * extract(tables.posterior_log_variance_clipped, t, nd)
    return mean, logvar


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
              ) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) ~ 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as improved-diffusion (error < 3e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
                                        ) -> torch.Tensor:
    """log P(x) of 8-bit data x in [-1, 1] under N(mean, e^{2 log_scale}) with bins of width 2/255.

    The edge bins extend to -inf (x = -1) and +inf (x = 1). Elementwise, in nats.
    """
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))),
    )
    return log_probs


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def vb_terms_bpd(model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 tables: DiffusionTables, clip_x0: bool = False) -> torch.Tensor:
    """The variational-bound term L_t per sample, in bits per dimension: [B].

    ``t > 0``: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)); ``t = 0``: -log p(x0|x1), the discretized
    Gaussian decoder NLL. Pass ``model_out`` with a DETACHED eps half so that only the variance
    output learns from this term (improved DDPM Section 3.1). ``clip_x0``: see ``p_mean_logvar``.
    """
    true_mean, true_logvar = q_posterior(x0, x_t, t, tables)
    mean, logvar = p_mean_logvar(model_out, x_t, t, tables, clip_x0)
    kl = mean_flat(normal_kl(true_mean, true_logvar, mean, logvar)) / LOG2
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)) / LOG2
    return torch.where(t == 0, nll, kl)


def sample_timesteps(batch: int, num_timesteps: int, generator: torch.Generator,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """t ~ U{0, ..., T-1}: [B] int64 drawn from ``generator`` (CPU) and moved to ``device``."""
    return torch.randint(0, num_timesteps, (batch,), generator=generator).to(device)
