"""Sampler steps: small functions ``(x_t, model_out, tables, k, noise, clip, state, i) -> x_{k-1}``.

``tables`` holds every per-step coefficient as a device tensor, cast once from the float64 schedule,
so a step does no host work, no host-device copy and no allocation beyond its arithmetic. ``state`` is
a tuple of tensors shaped like ``x_t``, preallocated once per loop (multistep solvers keep earlier x0
predictions there, written in place), and ``i`` counts the steps already taken in this frame (a Python
int, fixed per captured graph), so a whole frame stays one CUDA graph. ``SAMPLERS`` maps the sampler names of
``engine/names.py`` (with their help text and state counts) to their step functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from . import names
from .schedule import Schedule


class StepTables(NamedTuple):
    """Per-step coefficients, each a [n] tensor on the sampling device (timesteps: int64).

    ``dpm_*`` hold the DPM-Solver++ / UniPC coefficients in ``lambda = log(alpha / sigma)``
    (``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``), step k going from t_k to t_{k-1}; ``dpm_sde_*``
    those of the SDE variant.
    """

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
    sqrt_abar: torch.Tensor
    sqrt_one_minus_abar: torch.Tensor
    dpm_sigma_ratio: torch.Tensor
    dpm_coef: torch.Tensor
    dpm_half_inv_r: torch.Tensor
    dpm_sde_ratio: torch.Tensor
    dpm_sde_coef: torch.Tensor
    dpm_sde_noise: torch.Tensor
    unic_rho_d1: torch.Tensor
    unic_rho_t: torch.Tensor


def _dpm_columns(abar: np.ndarray, abar_prev: np.ndarray) -> dict[str, np.ndarray]:
    """Exponential-integrator coefficients (Lu et al. 2022 DPM-Solver++, Zhao et al. 2023 UniPC-bh2).

    ``h_k = lambda_{k-1} - lambda_k``; step k: ``x_{k-1} = (sigma_{k-1}/sigma_k) x_k + alpha_{k-1} (1 - e^-h_k) D``
    with ``D = x0_k + (x0_k - x0_{k+1}) / (2 r_k)``, ``r_k = h_{k+1} / h_k`` (2M). The UniC corrector of
    x_k (after its model call) uses ``rho_d1`` on ``x0_{k+2} - x0_{k+1}`` and ``rho_t`` on ``x0_k - x0_{k+1}``.
    Entries that a final step (abar_prev = 1, lambda = inf) would need are 0: that step returns x0.
    """
    n = len(abar)
    lam = 0.5 * np.log(abar / (1 - abar))
    with np.errstate(divide="ignore"):
        lam_prev = np.where(abar_prev < 1, 0.5 * np.log(abar_prev / np.maximum(1 - abar_prev, 1e-300)), np.inf)
    h = lam_prev - lam
    ratio = np.where(abar_prev < 1, np.sqrt(np.maximum(1 - abar_prev, 0) / (1 - abar)), 0.0)
    coef = np.sqrt(abar_prev) * -np.expm1(-h)
    half_inv_r = np.zeros(n)
    rho_d1, rho_t = np.zeros(n), np.zeros(n)
    for k in range(1, n - 1):  # r_k needs h_{k+1}; k = 0 is the final (x0) step
        half_inv_r[k] = h[k] / (2 * h[k + 1])
    for k in range(0, n - 2):  # corrector of x_k: last step went k+1 -> k with h_{k+1}; history x0_{k+2}
        hh = -h[k + 1]
        b_h = np.expm1(hh)
        phi = np.expm1(hh) / hh - 1
        b1 = phi / b_h
        b2 = (phi / hh - 0.5) * 2 / b_h
        rk = -h[k + 2] / h[k + 1]  # (lambda_{k+2} - lambda_{k+1}) / h_{k+1}
        r1, r2 = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array([b1, b2]))
        rho_d1[k], rho_t[k] = r1 / rk, r2  # D1 = (x0_{k+2} - x0_{k+1}) / rk
    live = abar_prev < 1
    decay = np.where(live, np.exp(-np.where(live, h, 0.0)), 0.0)  # e^-h; the SDE step scales x_k by ratio e^-h
    grow = np.where(live, -np.expm1(-2 * np.where(live, h, 0.0)), 0.0)  # 1 - e^-2h
    return dict(dpm_sigma_ratio=ratio, dpm_coef=np.where(live, coef, 0.0), dpm_half_inv_r=half_inv_r,
                dpm_sde_ratio=ratio * decay, dpm_sde_coef=np.sqrt(abar_prev) * grow,
                dpm_sde_noise=np.where(live, np.sqrt(np.maximum(1 - abar_prev, 0)) * np.sqrt(grow), 0.0),
                unic_rho_d1=rho_d1, unic_rho_t=rho_t)


def make_tables(schedule: Schedule, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                eta: float = 0.0, authors: dict[str, np.ndarray] | None = None) -> StepTables:
    """Compute every coefficient in float64 and cast once to ``dtype`` on ``device``.

    ``authors``: :func:`~dheads.engine.schedule.authors_float32_columns` of the same plan; the DDPM/DDIM
    coefficients are then taken from those float32 tables (the authors' sampler, bit for bit).
    """
    s = schedule
    abar, abar_prev = s.alphas_cumprod, s.alphas_cumprod_prev
    cols = dict(
        sqrt_recip_abar=s.sqrt_recip_alphas_cumprod,
        sqrt_recipm1_abar=s.sqrt_recipm1_alphas_cumprod,
        log_beta=s.log_betas,
        log_beta_tilde=s.posterior_log_variance_clipped,
        mean_coef_x0=s.posterior_mean_coef1,
        mean_coef_xt=s.posterior_mean_coef2,
    )
    if authors is not None:
        cols.update(sqrt_recip_abar=authors["sqrt_recip_alphas_cumprod"],
                    sqrt_recipm1_abar=authors["sqrt_recipm1_alphas_cumprod"], log_beta=authors["log_betas"],
                    log_beta_tilde=authors["posterior_log_variance_clipped"],
                    mean_coef_x0=authors["posterior_mean_coef1"], mean_coef_xt=authors["posterior_mean_coef2"])
        abar, abar_prev = authors["alphas_cumprod"].astype(np.float64), authors["alphas_cumprod_prev"].astype(np.float64)
    sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
    cols.update(
        sqrt_abar_prev=np.sqrt(abar_prev),
        ddim_sigma=sigma,
        ddim_eps_coef=np.sqrt(np.maximum(1 - abar_prev - sigma**2, 0.0)),
        sqrt_abar=np.sqrt(abar),
        sqrt_one_minus_abar=np.sqrt(1 - abar),
        **_dpm_columns(abar, abar_prev),
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
              noise: torch.Tensor | None, clip: bool = True, state: tuple = (), i: int = 0) -> torch.Tensor:
    """Ancestral DDPM step with learned-range variance (Nichol & Dhariwal Eq. 15); no noise at k = 0.

    ``logvar = nu log(beta) + (1 - nu) log(beta_tilde_clipped)`` with ``nu = (v + 1) / 2``;
    ``mean = coef_x0 x0 + coef_xt x_t``. Without a variance output, ``logvar = log(beta)``, as the authors'
    code does.
    """
    eps, v = _split(model_out, x_t)
    x0 = predict_x0(x_t, eps, tables, k, clip)
    mean = tables.mean_coef_x0[k] * x0 + tables.mean_coef_xt[k] * x_t
    if k == 0 or noise is None:
        return mean
    if v is None:
        logvar = tables.log_beta[k]
    else:
        nu = (v + 1) * 0.5
        logvar = nu * tables.log_beta[k] + (1 - nu) * tables.log_beta_tilde[k]
    return mean + torch.exp(0.5 * logvar) * noise


def ddim_step(x_t: torch.Tensor, model_out: torch.Tensor, tables: StepTables, k: int,
              noise: torch.Tensor | None, clip: bool = True, state: tuple = (), i: int = 0) -> torch.Tensor:
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


def _dpm_2m_data(x0: torch.Tensor, tables: StepTables, k: int, state: tuple, i: int) -> torch.Tensor:
    """2M's data term ``D = x0 + (x0 - x0_prev) / (2 r)`` (``x0`` alone on a frame's first step); stores
    ``x0`` in ``state = (x0_prev,)`` for the next step."""
    (x0_prev,) = state
    d = x0 if i == 0 else x0 + tables.dpm_half_inv_r[k] * (x0 - x0_prev)
    x0_prev.copy_(x0)
    return d


def dpmpp_2m_step(x_t: torch.Tensor, model_out: torch.Tensor, tables: StepTables, k: int,
                  noise: torch.Tensor | None, clip: bool = True, state: tuple = (), i: int = 0) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): data-prediction multistep, first order on a frame's first step.

    ``x_{k-1} = (sigma_{k-1}/sigma_k) x_k + alpha_{k-1}(1 - e^-h) D``; ``D = x0 + (x0 - x0_prev) / (2r)``.
    ``state = (x0_prev,)``; the final step (k = 0) returns x0.
    """
    eps, _ = _split(model_out, x_t)
    x0 = predict_x0(x_t, eps, tables, k, clip)
    if k == 0:
        return x0
    return tables.dpm_sigma_ratio[k] * x_t + tables.dpm_coef[k] * _dpm_2m_data(x0, tables, k, state, i)


def dpmpp_2m_sde_step(x_t: torch.Tensor, model_out: torch.Tensor, tables: StepTables, k: int,
                      noise: torch.Tensor | None, clip: bool = True, state: tuple = (), i: int = 0) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, the SDE solver with the 2M midpoint correction):
    ``x_{k-1} = (sigma_{k-1}/sigma_k) e^-h x_k + alpha_{k-1}(1 - e^-2h) D + sigma_{k-1} sqrt(1 - e^-2h) z``,
    ``D`` as in 2M. ``state = (x0_prev,)``; the final step (k = 0) returns x0.
    """
    eps, _ = _split(model_out, x_t)
    x0 = predict_x0(x_t, eps, tables, k, clip)
    if k == 0:
        return x0
    x_prev = tables.dpm_sde_ratio[k] * x_t + tables.dpm_sde_coef[k] * _dpm_2m_data(x0, tables, k, state, i)
    return x_prev if noise is None else x_prev + tables.dpm_sde_noise[k] * noise


def unipc_step(x_t: torch.Tensor, model_out: torch.Tensor, tables: StepTables, k: int,
               noise: torch.Tensor | None, clip: bool = True, state: tuple = (), i: int = 0) -> torch.Tensor:
    """UniPC-bh2, order 2 (Zhao et al. 2023): the UniC corrector refines x_k with the model call just made
    (no extra call), then the UniP-2 predictor (= the 2M update) steps from the corrected x_k.

    ``state = (x_last, x0_1, x0_2)``: the sample the last step started from and the last two x0.
    """
    x_last, x0_1, x0_2 = state
    eps, _ = _split(model_out, x_t)
    x0 = predict_x0(x_t, eps, tables, k, clip)
    if k == 0:
        return x0
    if i >= 1:  # UniC: order 1 after one step, 2 after two
        j = k + 1
        corr = x0_1 + (0.5 if i == 1 else tables.unic_rho_t[k]) * (x0 - x0_1)
        if i >= 2:
            corr = corr + tables.unic_rho_d1[k] * (x0_2 - x0_1)
        x_t = tables.dpm_sigma_ratio[j] * x_last + tables.dpm_coef[j] * corr
    d = x0 if i == 0 else x0 + tables.dpm_half_inv_r[k] * (x0 - x0_1)
    x_prev = tables.dpm_sigma_ratio[k] * x_t + tables.dpm_coef[k] * d
    x_last.copy_(x_t)
    x0_2.copy_(x0_1)
    x0_1.copy_(x0)
    return x_prev


StepFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its step, how many ``x``-shaped state buffers it keeps, and its help line."""

    name: str
    step: StepFn
    state: int
    help: str


# The names, state counts and help lines are engine/names.py's (torch-free, so CLIs check names before torch
# loads); this registry adds the step functions, one for every name there.
_STEPS: dict[str, StepFn] = {"ddpm": ddpm_step, "ddim": ddim_step, "dpmpp_2m": dpmpp_2m_step,
                             "dpmpp_2m_sde": dpmpp_2m_sde_step, "unipc": unipc_step}
assert tuple(_STEPS) == tuple(names.SAMPLERS), "engine/names.py SAMPLERS and the step functions disagree"
SAMPLERS: dict[str, SamplerSpec] = {n: SamplerSpec(n, _STEPS[n], s.state, s.help) for n, s in names.SAMPLERS.items()}


def sampler_help() -> str:
    """One line naming every registered sampler, for CLI help."""
    return "; ".join(f"{s.name}: {s.help}" for s in SAMPLERS.values())


def get_sampler(name: str) -> SamplerSpec:
    return SAMPLERS[names.check_sampler(name)]


def get_step(name: str) -> StepFn:
    return get_sampler(name).step


def make_state(spec: SamplerSpec, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The sampler's preallocated per-frame state: ``spec.state`` zeroed tensors shaped like ``like``."""
    return tuple(torch.zeros_like(like) for _ in range(spec.state))
