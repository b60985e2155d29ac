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
