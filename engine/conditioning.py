"""Per-frame conditioning: audio windows and the motion-frame ring.

Rules (the authors' loop): the audio window of frame i is embeddings i-w..i+w clamped to
[0, n_frames-1]; motion frames start as copies of the identity frame (after the motion transform)
and after each frame the oldest is dropped and the new frame appended (oldest first).
"""

from __future__ import annotations

import torch

# ITU-R 601 luma, as torchvision's rgb_to_grayscale (the authors' transform for the LRW layout).
_LUMA = (0.2989, 0.587, 0.114)


def audio_window_indices(n_frames: int, window: int = 2, frames: torch.Tensor | None = None) -> torch.Tensor:
    """[len(frames), 2w+1] int64: the row of frame i is clamp(i-w..i+w, 0, n_frames-1); frames: all by default."""
    frames = torch.arange(n_frames) if frames is None else torch.as_tensor(frames, dtype=torch.int64)
    offsets = torch.arange(-window, window + 1)
    return (frames[:, None] + offsets[None]).clamp_(0, n_frames - 1)


def audio_windows(emb: torch.Tensor, window: int = 2) -> torch.Tensor:
    """[N, D] per-frame embeddings -> [N, 2w+1, D] windows (gathered once, on emb's device)."""
    idx = audio_window_indices(emb.shape[0], window).to(emb.device)
    return emb[idx]


def luma_weights(device=None, dtype=torch.float32) -> torch.Tensor:
    """[1, 3, 1, 1] luma weights on ``device``: make them once; a per-frame ``new_tensor`` is a host copy."""
    return torch.tensor(_LUMA, dtype=dtype).view(1, 3, 1, 1).to(device)


def motion_transform(frame: torch.Tensor, grayscale: bool, luma: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luma if ``grayscale`` else unchanged. ``luma``: ``luma_weights`` on
    frame's device (None: made here, a host-to-device copy)."""
    if not grayscale:
        return frame
    w = luma if luma is not None else luma_weights(frame.device, frame.dtype)
    return (frame * w).sum(dim=1, keepdim=True)


class MotionRing:
    """Preallocated motion frames [B, M, c, H, W], oldest first, updated in place (CUDA-graph safe)."""

    def __init__(self, batch: int, frames: int, channels: int, size: int, *, device=None, dtype=torch.float32,
                 grayscale: bool = False):
        self.grayscale = grayscale
        self.buffer = torch.zeros(batch, frames, channels, size, size, device=device, dtype=dtype)
        self.luma = luma_weights(device, dtype) if grayscale else None  # on the device once, not per frame

    def reset(self, identity: torch.Tensor) -> None:
        """Fill every slot with the (transformed) identity frame [B, 3, H, W]."""
        self.buffer.copy_(motion_transform(identity, self.grayscale, self.luma).unsqueeze(1).expand_as(self.buffer))

    def push(self, frame: torch.Tensor) -> None:
        """Drop the oldest slot, append ``frame`` [B, 3, H, W] as the newest."""
        for j in range(self.buffer.shape[1] - 1):
            self.buffer[:, j].copy_(self.buffer[:, j + 1])
        self.buffer[:, -1].copy_(motion_transform(frame, self.grayscale, self.luma))

    @property
    def flat(self) -> torch.Tensor:
        """[B, M*c, H, W] view, the UNet's ``motion_frames`` input."""
        b, m, c, h, w = self.buffer.shape
        return self.buffer.view(b, m * c, h, w)
