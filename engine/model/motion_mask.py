"""Motion-frame mouth mask: an option of our model designs that makes the mouth follow the audio.

Measured on the demo model (``runs/eval/audio_sens.py`` in the session notes): the motion frames (the two
previous frames) predict the next frame's mouth so well that a small model trained on a few clips learns
to copy it and ignores the audio. Swapping the audio window for another clip's changed its eps inside the
lip box by 0.4% of the eps error, no more than outside it, so generated mouths stay as the identity's.

``model.motion_mask = (x0, y0, x1, y1)`` (fractions of the frame, the mouth-and-chin region of the
training framing) blanks that box in every motion frame (sets it to 0, mid-grey in [-1, 1]) inside the
UNet, in training and at run time alike: the mouth's shape can come only from the audio and the identity
frame, while the rest of the face keeps its motion frames. Parameter-free, no buffer: the box is cut from
the config's numbers, so export, ONNX Runtime and the frame loop run it unchanged. Ours only; the released
layouts have none.

With ``model.motion_mask_feather = f > 0`` the box has a soft edge: a pixel's weight in the motion frames is
``1 - wx * wy``, where ``wx = clip(d_x / (f * size) + 1/2, 0, 1)`` and ``d_x`` is the pixel centre's distance inside
the box's x-extent (negative outside), likewise ``wy``: the box fades in over ``f * size`` pixels centred on its
edges. A hard box teaches the network an edge that it then draws on the output as a seam (the demo-quality
issue); a soft one has no edge to draw. Its weights are a non-persistent buffer: no state_dict entry.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def mask_box(box: Sequence[float], size: int) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` fractions -> pixel bounds at ``size`` (``()`` -> None); ``ValueError`` if malformed."""
    if not box:
        return None
    if len(box) != 4 or not all(0.0 <= float(v) <= 1.0 for v in box) or not (box[0] < box[2] and box[1] < box[3]):
        raise ValueError(f"model.motion_mask = {tuple(box)}; give (x0, y0, x1, y1) as fractions of the frame "
                         f"with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, or () for none")
    x0, y0, x1, y1 = (int(round(float(v) * size)) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"model.motion_mask = {tuple(box)} covers no pixel at {size} px")
    return x0, y0, x1, y1


def apply_mask(motion: torch.Tensor, px: tuple[int, int, int, int]) -> torch.Tensor:
    """``motion`` ``[B, C, H, W]`` with ``px``'s box set to 0 in every channel (a new tensor)."""
    x0, y0, x1, y1 = px
    h, w = int(motion.shape[-2]), int(motion.shape[-1])  # static: only the batch varies in an export
    keep = torch.ones((1, 1, h, w), dtype=motion.dtype, device=motion.device)
    keep[..., y0:y1, x0:x1] = 0.0
    return motion * keep


def soft_keep(box: Sequence[float], size: int, feather: float) -> torch.Tensor:
    """``[1, 1, size, size]`` float32 weights of the motion frames under a box with a soft edge ``feather`` wide
    (a fraction of the frame; see the module text): 0 deep inside the box, 1 far outside it."""
    if feather <= 0:
        raise ValueError(f"model.motion_mask_feather must be > 0 for a soft mask, got {feather}")
    mask_box(box, size)  # the same checks as a hard box
    x0, y0, x1, y1 = (float(v) * size for v in box)
    width = float(feather) * size
    centres = torch.arange(size, dtype=torch.float64) + 0.5

    def inside(lo: float, hi: float) -> torch.Tensor:
        return (torch.minimum(centres - lo, hi - centres) / width + 0.5).clamp(0.0, 1.0)

    keep = 1.0 - inside(y0, y1)[:, None] * inside(x0, x1)[None, :]
    return keep.float().view(1, 1, size, size)
