"""Identity colour anchor: an option of our model designs that pins each frame's mean colour.

The noise-MSE loss barely rewards predicting the noise's spatial mean (its DC: variance 1/(H*W) of the
loss), yet the sampler multiplies an eps-DC error by ``sqrt(1/abar - 1)``, so a UNet that misses it sets
each frame's colour by chance at the noisy steps (see ``training/health.py``). A talking-head frame has
the identity frame's colour (same person, camera and light), so we need not learn it:

    mean_hw(eps) = (mean_hw(x_t) - sqrt(abar_t) mean_hw(identity)) / sqrt(1 - abar_t)

is the eps-DC for which the predicted x0 has exactly the identity's per-channel mean. The anchor replaces
the network's eps-DC with it (the spatial detail, and the variance channels, are the network's). A frame
whose content really changes the mean (an opened mouth: ~1-3 levels of 255 at 64x64) gets that change
spread over the whole frame instead.

The schedule's ``sqrt(abar)`` is a buffer of the model (it travels in the state_dict and the ONNX graph),
indexed by the original timestep the UNet is called with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..config import DiffusionConfig, ModelConfig

ANCHORS = ("none", "identity")


def anchor_for(cfg: ModelConfig, diffusion: DiffusionConfig | None) -> IdentityColorAnchor | None:
    """The anchor ``cfg.color_anchor`` names for a model sampled with ``diffusion`` (None for "none")."""
    if cfg.color_anchor not in ANCHORS:
        raise ValueError(f"model.color_anchor = {cfg.color_anchor!r}; choose one of {', '.join(ANCHORS)}")
    if cfg.color_anchor == "none":
        return None
    if diffusion is None:
        raise ValueError("a model with color_anchor needs its DiffusionConfig (the anchor uses the schedule)")
    from ..schedule import schedule_for

    return IdentityColorAnchor(torch.from_numpy(schedule_for(diffusion).alphas_cumprod.copy()))


class IdentityColorAnchor(nn.Module):
    """``[B, C, H, W]`` UNet output -> the same with channels 0..2 (eps) moved to the identity's mean."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("sqrt_abar", alphas_cumprod.double().sqrt().float())
        self.register_buffer("sqrt_one_minus_abar", (1.0 - alphas_cumprod.double()).sqrt().float())

    def forward(self, out: torch.Tensor, x_t: torch.Tensor, identity: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
        idx = timesteps.round().long().clamp(0, self.sqrt_abar.shape[0] - 1)
        a = self.sqrt_abar[idx].view(-1, 1, 1, 1)
        s = self.sqrt_one_minus_abar[idx].view(-1, 1, 1, 1)
        eps = out[:, :3].float()
        dc = (x_t.float().mean(dim=(2, 3), keepdim=True) - a * identity.float().mean(dim=(2, 3), keepdim=True)) / s
        eps = eps - eps.mean(dim=(2, 3), keepdim=True) + dc
        return torch.cat([eps.to(out.dtype), out[:, 3:]], dim=1)
