"""How the authors' sampler runs, reproduced for timing: the baseline every speed-up is measured against.

guided-diffusion style: float32 numpy schedule arrays, each coefficient gathered with
``torch.from_numpy(arr).to(device)[t]`` (a host-device copy per coefficient per step), fresh tensors
every step, motion frames concatenated anew, eager fp32 UNet. Same maths as ``engine.sampling``.
"""

from __future__ import annotations

import numpy as np
import torch

from dheads.engine.model import DiffusedHeadsUNet
from dheads.engine.schedule import Schedule


def _extract(arr: np.ndarray, k: int, like: torch.Tensor) -> torch.Tensor:
    """guided-diffusion's ``_extract_into_tensor``: upload the whole array, index, broadcast."""
    res = torch.from_numpy(arr).to(device=like.device)[torch.tensor([k], device=like.device)].float()
    return res.view(-1, *([1] * (like.dim() - 1))).expand(like.shape)


def _arrays(s: Schedule) -> dict[str, np.ndarray]:
    """The schedule as the authors held it: float32 numpy arrays (hence their 5e-4 relative error)."""
    return {k: v.astype(np.float32) for k, v in dict(
        sqrt_recip=s.sqrt_recip_alphas_cumprod, sqrt_recipm1=s.sqrt_recipm1_alphas_cumprod, log_beta=s.log_betas,
        log_tilde=s.posterior_log_variance_clipped, c1=s.posterior_mean_coef1, c2=s.posterior_mean_coef2,
    ).items()}


@torch.no_grad()
def authors_frame(model: DiffusedHeadsUNet, schedule: Schedule, identity: torch.Tensor, motion: list[torch.Tensor],
                  audio_window: torch.Tensor, x_T: torch.Tensor) -> torch.Tensor:
    """One frame, DDPM, the authors' way. identity/x_T: [1,3,H,W]; audio_window: [1, 2w+1, D]."""
    arr = _arrays(schedule)
    x = x_T
    for k in reversed(range(len(schedule))):
        t = torch.tensor([int(schedule.timesteps[k])], device=x.device)
        out = model(x, t, identity, motion_frames=torch.cat(motion, dim=1), audio_emb=audio_window)
        eps, v = torch.split(out, 3, dim=1)
        x0 = (_extract(arr["sqrt_recip"], k, x) * x - _extract(arr["sqrt_recipm1"], k, x) * eps).clamp(-1, 1)
        mean = _extract(arr["c1"], k, x) * x0 + _extract(arr["c2"], k, x) * x
        frac = (v + 1) / 2
        logvar = frac * _extract(arr["log_beta"], k, x) + (1 - frac) * _extract(arr["log_tilde"], k, x)
        nonzero = float(k != 0)
        x = mean + nonzero * torch.exp(0.5 * logvar) * torch.randn_like(x)
    return x
