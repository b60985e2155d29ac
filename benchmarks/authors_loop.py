"""How the authors' sampler runs, reproduced for timing: the baseline every speed-up is measured against.

guided-diffusion style: float32 numpy schedule arrays, each coefficient gathered with
``torch.from_numpy(arr).to(device)[t]`` (a host-device copy per coefficient per step), fresh tensors
every step, motion frames concatenated anew, eager fp32 UNet, float32 tables built their way. Same maths
as ``engine.sampling``'s DDPM step with ``SamplerConfig(tables="authors")``.
"""

from __future__ import annotations

import numpy as np
import torch

from dheads.engine.model import DiffusedHeadsUNet
from dheads.engine.schedule import Schedule, authors_float32_columns, respaced_timesteps


def _extract(arr: np.ndarray, k: int, like: torch.Tensor) -> torch.Tensor:
    """guided-diffusion's ``_extract_into_tensor``: upload the whole array, index, broadcast."""
    res = torch.from_numpy(arr).to(device=like.device)[torch.tensor([k], device=like.device)].float()
    return res.view(-1, *([1] * (like.dim() - 1))).expand(like.shape)


def _arrays(base: Schedule, n: int) -> dict[str, np.ndarray]:
    """The respaced tables as the authors computed them: float32 throughout (``authors_float32_columns``)."""
    c = authors_float32_columns(base, n)
    return dict(sqrt_recip=c["sqrt_recip_alphas_cumprod"], sqrt_recipm1=c["sqrt_recipm1_alphas_cumprod"],
                log_beta=c["log_betas"], log_tilde=c["posterior_log_variance_clipped"],
                c1=c["posterior_mean_coef1"], c2=c["posterior_mean_coef2"])


@torch.no_grad()
def authors_frame(model: DiffusedHeadsUNet, base: Schedule, n: int, identity: torch.Tensor,
                  motion: list[torch.Tensor], audio_window: torch.Tensor, x_T: torch.Tensor,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """One frame, DDPM at ``n`` respaced steps of ``base``, the authors' way.

    identity/x_T: [1,3,H,W]; audio_window: [1, 2w+1, D]; ``noise``: [1 + n, 1, 3, H, W] as the engine
    lays it out (row 1 + k at step k), else ``randn_like`` per step as theirs draws it.
    """
    arr = _arrays(base, n)
    use = respaced_timesteps(len(base), n)
    x = x_T
    for k in reversed(range(n)):
        t = torch.tensor([use[k]], device=x.device)
        out = model(x, t, identity, motion_frames=torch.cat(motion, dim=1), audio_emb=audio_window)
        eps, v = torch.split(out, 3, dim=1)
        x0 = (_extract(arr["sqrt_recip"], k, x) * x - _extract(arr["sqrt_recipm1"], k, x) * eps).clamp(-1, 1)
        mean = _extract(arr["c1"], k, x) * x0 + _extract(arr["c2"], k, x) * x
        frac = (v + 1) / 2
        logvar = frac * _extract(arr["log_beta"], k, x) + (1 - frac) * _extract(arr["log_tilde"], k, x)
        nonzero = float(k != 0)
        z = torch.randn_like(x) if noise is None else noise[1 + k]
        x = mean + nonzero * torch.exp(0.5 * logvar) * z
    return x
