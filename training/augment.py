"""Training-time augmentation: mirrored samples and corrupted motion frames (drift-robust training).

At inference the motion frames are the model's own previous outputs, which carry its errors: grain, blur
and a small colour offset that, fed back frame after frame, grow into drift. Training on slightly
corrupted ground-truth motion frames teaches the model to take pose and mouth from the motion frames
but colour and detail from the identity frame. Per sample, with probability ``motion_corrupt_prob``:

* Gaussian noise of std ~ U(0, motion_noise) levels of 255, independent per pixel;
* a Gaussian blur of sigma ~ U(0, motion_blur) pixels (at the model's resolution);
* a colour offset ~ U(-motion_color, motion_color) levels of 255 per channel, the same for every
  motion frame of the sample (model drift is slow, so it is shared by consecutive frames);
* a local shading: a smooth brightness field (a ``SHADE_GRID`` x ``SHADE_GRID`` grid of N(0, 1) values,
  bicubically upsampled, scaled so its largest magnitude is ~ U(0, motion_shade) levels), added to every
  channel of every motion frame of the sample: the slow, local drift long rollouts show (a patch of the
  face, often the eyes, growing darker), which a uniform offset cannot imitate.

New faces (``sample_color``): every image of a sample (target, identity, motion frames, rollout frames)
gets the same per-channel gain ~ U(1 - sample_color, 1 + sample_color) and offset ~ U(-sample_color,
sample_color) / 2 on the [0, 1] scale, clamped: one colour transform per sample, so a few speakers look
like more skin tones, lightings and backgrounds, and nothing inside a sample changes relative to the rest.

Before the motion-frame corruption, with probability ``motion_rollout_prob``, a sample's motion frames are the model's own
rollout's frames at the same positions (``dh-train rollouts``; the batch's ``motion_rollout``), the
corruption then applying on top.

The maxima ramp linearly from 0 to their values over the first ``motion_corrupt_ramp`` steps.
``hflip``: the probability of mirroring a whole sample (target, identity, motion frames, lip box).

Other framings (``reframe``): with that probability a sample is zoomed by ~ U(1 - reframe_scale, 1 + reframe_scale)
about the image centre and shifted by ~ U(-reframe_shift, reframe_shift) of the side along each axis, every image of
the sample and its lip box alike (bicubic, edge pixels beyond the border, as ``dh-run``'s crop pads): a face framed
a little larger, smaller or off-centre than the prepared clips' one crop rule, as photos at run time are, so the
model takes the face from the identity frame rather than from a fixed place (the motion-frame mouth mask stays where
the network puts it).
Every draw comes from the generator passed in, so a step's augmentation is a pure function of its seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LEVEL = 2.0 / 255.0  # one level of 255 in the [-1, 1] image range
SHADE_GRID = 4  # the shading field's control points per side (blobs ~ a quarter of the face wide)


def ramp(step: int, ramp_steps: int) -> float:
    """Corruption strength at ``step``: linear from 0 to 1 over ``ramp_steps`` steps (1 when 0)."""
    return 1.0 if ramp_steps <= 0 else min(1.0, step / ramp_steps)


def _uniform(n: int, generator: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each sample of ``x`` [B, C, H, W] with its own Gaussian (sigma [B] pixels; 0 leaves it as it is).

    Separable, reflect-padded, one grouped convolution per axis.
    """
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3.0 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    s = sigma.double().clamp(min=1e-3).view(b, 1)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / s) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(x.dtype).to(x.device)  # [B, K]
    k = kernel.repeat_interleave(c, dim=0)  # [B*C, K]
    flat = x.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), k.view(b * c, 1, 1, -1), groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), k.view(b * c, 1, -1, 1), groups=b * c)
    return flat.view(b, c, h, w)


def shade_field(b: int, h: int, w: int, amplitude: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[B, 1, H, W] smooth fields: a ``SHADE_GRID``-square N(0, 1) grid upsampled bicubically to H x W, each
    scaled so its largest magnitude is ``amplitude[b]`` (levels of 255, as image units)."""
    grid = torch.randn(b, 1, SHADE_GRID, SHADE_GRID, generator=generator, dtype=torch.float64)
    field = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True)
    peak = field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
    return field / peak * amplitude.view(b, 1, 1, 1) * LEVEL


def corrupt_motion(motion: torch.Tensor, frames: int, *, noise: float, blur: float, color: float, prob: float,
                   generator: torch.Generator, shade: float = 0.0) -> torch.Tensor:
    """Corrupted copy of ``motion`` [B, M*c, H, W] (M = ``frames`` motion frames); levels of 255, pixels."""
    b, mc, h, w = motion.shape
    c = mc // frames
    hit = (_uniform(b, generator) < prob).to(motion.dtype).to(motion.device)
    out = motion
    if blur > 0:
        sigma = _uniform(b, generator, 0.0, blur) * hit.double().cpu()
        out = gaussian_blur(out, sigma)
    if color > 0:
        offset = _uniform(b * c, generator, -color, color).view(b, 1, c, 1, 1).to(motion.dtype).to(motion.device)
        out = (out.view(b, frames, c, h, w) + offset * LEVEL * hit.view(b, 1, 1, 1, 1)).view(b, mc, h, w)
    if shade > 0:
        field = shade_field(b, h, w, _uniform(b, generator, 0.0, shade) * hit.double().cpu(), generator)
        out = out + field.to(motion.dtype).to(motion.device)  # broadcast over every frame and channel
    if noise > 0:
        std = (_uniform(b, generator, 0.0, noise).to(motion.dtype).to(motion.device) * hit * LEVEL).view(b, 1, 1, 1)
        z = torch.randn(motion.shape, generator=generator, dtype=motion.dtype).to(motion.device)
        out = out + std * z
    return out


IMAGE_KEYS = ("x0", "identity", "motion", "motion_rollout")


def recolor_sample(batch: dict[str, torch.Tensor], amount: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every image of each sample through one random per-channel affine colour map (module doc)."""
    b = batch["x0"].shape[0]
    c = batch["x0"].shape[1]
    dev, dtype = batch["x0"].device, batch["x0"].dtype
    gain = _uniform(b * c, generator, 1 - amount, 1 + amount).view(b, 1, c, 1, 1).to(dtype).to(dev)
    bias = _uniform(b * c, generator, -amount / 2, amount / 2).view(b, 1, c, 1, 1).to(dtype).to(dev)
    out = dict(batch)
    for key in IMAGE_KEYS:
        if key in batch:
            x = batch[key]
            y = ((x.view(b, -1, c, *x.shape[2:]) + 1) / 2 * gain + bias).clamp(0, 1) * 2 - 1
            out[key] = y.view_as(x)
    return out


def hflip_sample(batch: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mirror the samples where ``mask`` [B] is true: images along W, lip boxes ``(x0, y0, x1, y1)`` to
    ``(W - x1, y0, W - x0, y1)``."""
    out = dict(batch)
    m4 = mask.view(-1, 1, 1, 1)
    for key in ("x0", "identity", "motion"):
        out[key] = torch.where(m4, batch[key].flip(-1), batch[key])
    box = batch["lip_box"]
    width = batch["x0"].shape[-1]
    mirrored = torch.stack([width - box[:, 2], box[:, 1], width - box[:, 0], box[:, 3]], dim=1)
    out["lip_box"] = torch.where(mask.view(-1, 1), mirrored, box)
    return out


def reframe_sample(batch: dict[str, torch.Tensor], scale: float, shift: float, prob: float,
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Zoom and shift every image and the lip box of the samples drawn with probability ``prob`` (module doc)."""
    b, _, h, w = batch["x0"].shape
    dev, dtype = batch["x0"].device, batch["x0"].dtype
    hit = _uniform(b, generator) < prob
    zoom = torch.where(hit, _uniform(b, generator, 1 - scale, 1 + scale), torch.ones(b))
    off = torch.where(hit[:, None], _uniform(2 * b, generator, -shift, shift).view(b, 2), torch.zeros(b, 2))
    # output point p (normalized, -1..1) shows input point p / zoom - 2 * off: content moves by +2*off, grows by zoom
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom.double()
    theta[:, :, 2] = -2 * off.double()
    grid = F.affine_grid(theta.to(dtype), [b, 1, h, w], align_corners=False).to(dev)
    out = dict(batch)
    for key in IMAGE_KEYS:
        if key in batch:
            moved = F.grid_sample(batch[key], grid, mode="bicubic", padding_mode="border", align_corners=False)
            out[key] = torch.where(hit.to(dev).view(-1, 1, 1, 1), moved.clamp(-1, 1), batch[key])
    if "lip_box" in batch:
        out["lip_box"] = _reframed_box(batch["lip_box"], zoom, off, (h, w))
    return out


def _reframed_box(box: torch.Tensor, zoom: torch.Tensor, off: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Lip boxes ``(x0, y0, x1, y1)`` in pixels (end exclusive) after ``reframe_sample``'s zoom and shift, widened to
    whole pixels and clamped to the image."""
    h, w = hw
    size = torch.tensor([w, h, w, h], dtype=torch.float64)
    norm = box.double() / size * 2 - 1  # pixel edges -> -1..1
    moved = zoom.double()[:, None] * (norm + 2 * off.double().repeat(1, 2))
    px = (moved + 1) / 2 * size
    lo = torch.floor(px[:, :2]).clamp_min(0)
    hi = torch.minimum(torch.ceil(px[:, 2:]), size[2:])
    return torch.cat([lo, hi], dim=1).to(box.dtype)


def augment(batch: dict[str, torch.Tensor], data_cfg, motion_frames: int, step: int,
            generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The batch after ``data_cfg``'s mirroring and motion-frame corruption at ``step`` (a new dict).

    ``data_cfg``: a ``training.config.DataConfig``. With every probability and maximum 0, the batch is
    returned unchanged (and no random number is drawn).
    """
    out = batch
    if data_cfg.reframe > 0 and (data_cfg.reframe_scale > 0 or data_cfg.reframe_shift > 0):
        out = reframe_sample(out, data_cfg.reframe_scale, data_cfg.reframe_shift, data_cfg.reframe, generator)
    if data_cfg.sample_color > 0:
        out = recolor_sample(out, data_cfg.sample_color, generator)
    if "motion_rollout" in out:
        out = dict(out)
        rolled = out.pop("motion_rollout")
        if data_cfg.motion_rollout_prob > 0:
            hit = (_uniform(rolled.shape[0], generator) < data_cfg.motion_rollout_prob).to(rolled.device)
            out["motion"] = torch.where(hit.view(-1, 1, 1, 1), rolled, out["motion"])
    if data_cfg.hflip > 0:
        b = batch["x0"].shape[0]
        out = hflip_sample(out, (_uniform(b, generator) < data_cfg.hflip).to(batch["x0"].device))
    s = ramp(step, data_cfg.motion_corrupt_ramp)
    if data_cfg.motion_corrupt_prob > 0 and s > 0 and (data_cfg.motion_noise or data_cfg.motion_blur
                                                        or data_cfg.motion_color or data_cfg.motion_shade):
        out = dict(out)
        out["motion"] = corrupt_motion(out["motion"], motion_frames, noise=s * data_cfg.motion_noise,
                                       blur=s * data_cfg.motion_blur, color=s * data_cfg.motion_color,
                                       prob=data_cfg.motion_corrupt_prob, generator=generator,
                                       shade=s * data_cfg.motion_shade)
    return out
