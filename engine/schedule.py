"""The diffusion noise schedule as an immutable float64 value, and respacing.

guided-diffusion computes schedules in float64 "for accuracy"; the authors' sampler used float32,
which differs by up to 5e-4 relative. We compute here in float64 and cast once, at the edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .names import check_steps


@dataclass(frozen=True, eq=False)
class Schedule:
    """Per-step quantities of a (possibly respaced) schedule, all float64 arrays of length n.

    ``timesteps[k]`` is the ORIGINAL timestep (0..T-1) the UNet is called with at respaced index k.
    """

    betas: np.ndarray
    timesteps: np.ndarray

    def __post_init__(self) -> None:
        for a in (self.betas, self.timesteps):
            a.setflags(write=False)

    def __len__(self) -> int:
        return len(self.betas)

    @property
    def alphas(self) -> np.ndarray:
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(self.alphas)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.append(1.0, self.alphas_cumprod[:-1])

    @property
    def sqrt_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(self.alphas_cumprod)

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(1.0 - self.alphas_cumprod)

    @property
    def sqrt_alphas_cumprod_prev(self) -> np.ndarray:
        return np.sqrt(self.alphas_cumprod_prev)

    @property
    def sqrt_recip_alphas_cumprod(self) -> np.ndarray:
        """sqrt(1 / abar): the coefficient of x_t in x0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps."""
        return np.sqrt(1.0 / self.alphas_cumprod)

    @property
    def sqrt_recipm1_alphas_cumprod(self) -> np.ndarray:
        """sqrt(1 / abar - 1): the coefficient of eps in that x0."""
        return np.sqrt(1.0 / self.alphas_cumprod - 1.0)

    @property
    def log_betas(self) -> np.ndarray:
        return np.log(self.betas)

    @property
    def posterior_variance(self) -> np.ndarray:
        """beta_tilde = beta (1 - abar_prev) / (1 - abar)."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_log_variance_clipped(self) -> np.ndarray:
        """log beta_tilde with element 0 (where beta_tilde = 0) replaced by element 1."""
        v = self.posterior_variance
        return np.log(np.append(v[1], v[1:])) if len(v) > 1 else np.log(self.betas)

    @property
    def posterior_mean_coef1(self) -> np.ndarray:
        """Coefficient of x0 in the posterior mean: beta sqrt(abar_prev) / (1 - abar)."""
        return self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_mean_coef2(self) -> np.ndarray:
        """Coefficient of x_t in the posterior mean: (1 - abar_prev) sqrt(alpha) / (1 - abar)."""
        return (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine betas: ``beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)``."""

    def abar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    t = num_timesteps
    return np.array([min(1 - abar((i + 1) / t) / abar(i / t), max_beta) for i in range(t)], dtype=np.float64)


def cosine_schedule(num_timesteps: int = 1000) -> Schedule:
    """The 1000-step cosine schedule the model was trained with."""
    return Schedule(betas=cosine_betas(num_timesteps), timesteps=np.arange(num_timesteps, dtype=np.int64))


SCHEDULES = {"cosine": cosine_schedule}


def schedule_for(config) -> Schedule:
    """The training schedule a :class:`~dheads.engine.config.DiffusionConfig` names (its T and kind)."""
    if config.schedule not in SCHEDULES:
        raise ValueError(f"unknown diffusion schedule {config.schedule!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[config.schedule](config.num_timesteps)


def respaced_timesteps(num_timesteps: int, n: int) -> list[int]:
    """The authors' running-sum rule: ``stride = (T-1)/(n-1)``; ``t_k = round(cur)``, ``cur += stride``.

    0, 10, 20, ..., 989, 999 for n = 100. Not ``round(k * stride)``: the accumulated float sum differs
    from the product by one timestep for 278 of the counts 2..1000 (n = 21, k = 10: 499, not 500).
    """
    check_steps(n, num_timesteps)
    if n == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (n - 1)
    cur, out = 0.0, []
    for _ in range(n):
        out.append(round(cur))
        cur += stride
    return out


KARRAS_SIGMA_MAX = 80.0  # EDM's sigma_max; the cosine schedule's last step has sigma ~ 3e4 (beta clipped at 0.999)


def karras_timesteps(schedule: Schedule, n: int, rho: float = 7.0) -> list[int]:
    """Karras et al.'s placement (EDM, eq. 5) on a discrete schedule: the first step at T-1 (pure noise), the
    other ``n - 1`` at noise levels ``sigma = sqrt(1/abar - 1)`` uniform in ``sigma**(1/rho)`` from the first
    timestep's sigma to ``min(KARRAS_SIGMA_MAX, sigma[T-2])``, each mapped to the timestep of nearest log-sigma;
    ascending and distinct. Without the cap, rho = 7 would put most steps at t > 980 on the cosine schedule,
    where x_t is noise either way. Denser at low noise than the authors' uniform rule."""
    t_max = len(schedule) - 1
    check_steps(n, len(schedule))
    if n <= 2:
        return [0, t_max][2 - n:]
    log_sigma = np.log(schedule.sqrt_recipm1_alphas_cumprod)  # increasing in t
    lo = np.exp(log_sigma[0]) ** (1 / rho)
    hi = min(KARRAS_SIGMA_MAX, float(np.exp(log_sigma[-2]))) ** (1 / rho)
    targets = np.log((lo + np.linspace(0.0, 1.0, n - 1) * (hi - lo)) ** rho)
    ts = np.interp(targets, log_sigma, np.arange(len(schedule))).round().astype(int).tolist() + [t_max]
    ts[0] = 0
    for k in range(1, n):  # distinct: push up, never past the room the later steps need
        ts[k] = min(max(ts[k], ts[k - 1] + 1), t_max - (n - 1 - k))
    return ts


def trailing_timesteps(schedule: Schedule, n: int) -> list[int]:
    """Lin et al.'s "trailing" placement (WACV 2024, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", Table 2): ``round(arange(T, 0, -T/n)) - 1``, i.e. ``round(T - k T/n) - 1`` for k < n, ascending;
    249, 499, 749, 999 for n = 4.

    The authors' uniform rule ends on t = 0, where x is already clean (sigma/alpha = 0.006 on the cosine
    schedule): that step's UNet call changes nothing, and the step before it has to jump from T/(n-1) to 0.
    Trailing steps end at T/n - 1 instead, so every call denoises; the last one's x0 is the frame. At 4
    steps on the demo model: F-MSE 22.9 against uniform's 161.8 (docs/running.md, "Sampling")."""
    t = len(schedule)
    check_steps(n, t)
    # their arange, rounding ties as it does (n = 48: 187.4999 -> 186), but only its first n values: its float
    # stop can yield an (n+1)-th near 0 (n = 61: -1)
    return sorted(int(v) - 1 for v in np.round(np.arange(t, 0, -t / n))[:n])


SPACINGS = {"uniform": lambda schedule, n: respaced_timesteps(len(schedule), n), "karras": karras_timesteps,
            "trailing": trailing_timesteps}


def respace(schedule: Schedule, n: int, spacing: str = "uniform") -> Schedule:
    """A new schedule over ``n`` of the original steps: ``beta_k = 1 - abar[t_k] / abar[t_{k-1}]``.

    ``spacing``: which ``n`` (``SPACINGS``): the authors' uniform running sum, or ``karras``."""
    use = SPACINGS[spacing](schedule, n)
    abar = schedule.alphas_cumprod
    prev = np.append(1.0, abar[use][:-1])
    betas = 1.0 - abar[use] / prev
    return Schedule(betas=betas, timesteps=schedule.timesteps[use].copy())


def authors_float32_columns(base: Schedule, n: int) -> dict[str, np.ndarray]:
    """The respaced step coefficients computed the authors' way, in float32 throughout.

    Their code turns the float64 betas into a float32 tensor, takes cumprod and sqrt in float32, respaces
    from the float32 ``abar`` and recomputes every derived table in float32. Cancellation makes this
    differ from the float64 tables (17% in ``sqrt(1/abar)`` at the noisiest of 10 steps); use it to
    reproduce their sampler bit for bit, not for quality.
    """
    import torch

    f = torch.float32
    abar_full = torch.cumprod(1.0 - torch.tensor(np.array(base.betas), dtype=torch.float64).to(f), dim=0)
    use = respaced_timesteps(len(base), n)
    last, new = torch.tensor(1.0, dtype=f), []
    for t in use:
        new.append(1.0 - abar_full[t] / last)
        last = abar_full[t]
    betas = torch.stack(new)
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, dim=0)
    abar_prev = torch.cat([torch.ones(1, dtype=f), abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    clipped = torch.cat([post_var[1:2], post_var[1:]]) if n > 1 else betas
    cols = dict(
        betas=betas, alphas_cumprod=abar, alphas_cumprod_prev=abar_prev,
        sqrt_recip_alphas_cumprod=torch.sqrt(1.0 / abar), sqrt_recipm1_alphas_cumprod=torch.sqrt(1.0 / abar - 1),
        log_betas=torch.log(betas), posterior_log_variance_clipped=torch.log(clipped),
        posterior_mean_coef1=betas * torch.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * torch.sqrt(alphas) / (1.0 - abar),
    )
    return {k: v.numpy() for k, v in cols.items()}
