"""The training objective (paper Section 4.4): ``L = L_simple + lambda_vlb L_vlb + lambda_lip L_lip``.

* ``L_simple``: MSE between the true and predicted noise, mean over every element.
* ``L_vlb``: the variational-bound term L_t in bits/dim (``diffusion.vb_terms_bpd``) computed with a
  DETACHED eps, so it trains only the variance output v; mean over the batch. The predicted x0 inside
  it is clamped to [-1, 1] as in the authors' code (``loss.vlb_clip_x0``). This is
  improved-diffusion's per-sample ``vb`` term (no T multiplier), which that code adds with weight 1.
* ``L_dc`` (ours, off in the paper's recipe): ``dc_loss``, the noise's per-channel mean, weighted
  ``lambda_dc``.
* ``L_lip``: the same noise MSE restricted to a box around the lips, padded ``lip_pad`` pixels at
  128x128 (scaled to the model resolution): per sample the mean over the box's pixels and channels,
  then the mean over the batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .config import LossConfig
from .diffusion import DiffusionTables, mean_flat, vb_terms_bpd


class LossTerms(NamedTuple):
    """The weighted total and its unweighted parts, each a scalar tensor."""

    loss: torch.Tensor
    mse: torch.Tensor
    vlb: torch.Tensor
    lip: torch.Tensor
    dc: torch.Tensor


def dc_loss(eps: torch.Tensor, noise: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
    """The error of the noise's per-channel spatial mean (its DC), weighted like one whole image.

    ``H*W * (mean(eps) - mean(noise))^2`` per sample and channel, times ``noise_level`` [B] (``1 - abar_t``:
    the DC matters at the noisy steps, where the sampler multiplies it by ``sqrt(1/abar - 1)``, and is
    not knowable at the clean ones), then the mean. In L_simple the DC is one of H*W components: 2e-4
    of the loss at 64x64, which is why a model can ignore it and flicker.
    """
    hw = eps.shape[2] * eps.shape[3]
    err = (eps.mean(dim=(2, 3)) - noise.mean(dim=(2, 3))) ** 2 * hw  # [B, C]
    return (err.mean(dim=1) * noise_level).mean()


def pad_box(box: tuple[float, float, float, float] | torch.Tensor, pad: float, size: int
            ) -> tuple[int, int, int, int]:
    """Integer pixel box ``(x0, y0, x1, y1)``, end exclusive, covering the float box ``box`` grown by
    ``pad`` pixels on each side and clipped to a ``size`` x ``size`` image.

    ``box`` is the lips' landmark extent in pixel coordinates (pixel j covers [j, j + 1)).
    """
    bx0, by0, bx1, by1 = (float(v) for v in box)
    x0, y0 = math.floor(bx0 - pad), math.floor(by0 - pad)
    x1, y1 = math.ceil(bx1 + pad), math.ceil(by1 + pad)
    clip = lambda v: min(max(v, 0), size)  # noqa: E731
    return clip(x0), clip(y0), clip(x1), clip(y1)


def lip_pad_pixels(cfg: LossConfig, image_size: int) -> float:
    """``cfg.lip_pad`` (given at ``cfg.lip_pad_at`` pixels) at the model's resolution."""
    return cfg.lip_pad * image_size / cfg.lip_pad_at


def box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, 4] int boxes ``(x0, y0, x1, y1)``, end exclusive -> [B, 1, H, W] float mask of 0/1."""
    ys = torch.arange(height, device=boxes.device).view(1, height, 1)
    xs = torch.arange(width, device=boxes.device).view(1, 1, width)
    b = boxes.view(-1, 4, 1, 1)
    inside = (xs >= b[:, 0]) & (xs < b[:, 2]) & (ys >= b[:, 1]) & (ys < b[:, 3])
    return inside.unsqueeze(1).float()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean of (pred - target)^2 over the mask's pixels and all channels, then batch mean
    (weighted by ``weight`` [B] when given).

    A sample with an empty mask contributes 0.
    """
    sq = (pred - target) ** 2 * mask
    count = mask.sum(dim=(1, 2, 3)) * pred.shape[1]
    each = sq.sum(dim=(1, 2, 3)) / count.clamp(min=1.0)
    return (each if weight is None else weight * each).mean()


def diffusion_losses(model_out: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor, tables: DiffusionTables, lip_mask: torch.Tensor | None,
                     cfg: LossConfig) -> LossTerms:
    """The terms and their weighted sum (``dc`` is 0 unless ``cfg.lambda_dc > 0``).

    model_out: [B, 6, H, W] (eps, v) or [B, 3, H, W] (eps only: no L_vlb); noise, x0, x_t: [B, 3, H, W];
    t: [B] int64; lip_mask: [B, 1, H, W] or None (no L_lip).
    """
    model_out = model_out.float()
    eps = model_out[:, :3]
    mse = mean_flat((noise - eps) ** 2).mean()
    zero = mse.new_zeros(())
    if model_out.shape[1] == 6 and cfg.lambda_vlb > 0:
        frozen = torch.cat([eps.detach(), model_out[:, 3:]], dim=1)
        vlb = vb_terms_bpd(frozen, x0, x_t, t, tables, cfg.vlb_clip_x0).mean()
    else:
        vlb = zero
    lip = masked_mse(eps, noise, lip_mask) if lip_mask is not None and cfg.lambda_lip > 0 else zero
    dc = dc_loss(eps, noise, 1.0 - tables.sqrt_alphas_cumprod[t] ** 2) if cfg.lambda_dc > 0 else zero
    loss = mse + cfg.lambda_vlb * vlb + cfg.lambda_lip * lip + cfg.lambda_dc * dc
    return LossTerms(loss, mse, vlb, lip, dc)
