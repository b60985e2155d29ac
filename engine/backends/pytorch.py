"""PyTorch backend: eager fp32 (the reference numerics) or fp16 + channels-last on GPU."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..model import DiffusedHeadsUNet


class TorchDenoiser:
    """Runs the eager UNet. On CUDA it is graph-safe (no host sync), so the loop may capture it.

    The module is moved and cast in place (``nn.Module.to``): pass a copy to keep the original.
    ``channels_last`` defaults to on for CUDA and for fp16/bf16 (CPU half-precision convolutions
    are only fast in that layout: a CREMA call took 41 s channels-last, over 5 min contiguous).
    """

    name = "pytorch"

    def __init__(self, model: DiffusedHeadsUNet, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, channels_last: bool | None = None):
        self.device = torch.device(device)
        self.dtype = dtype
        self.config: ModelConfig = model.config
        if channels_last is None:
            channels_last = self.device.type == "cuda" or dtype != torch.float32
        self.channels_last = channels_last
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device=self.device, dtype=dtype, memory_format=fmt).eval()
        self.graph_safe = self.device.type == "cuda"

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor, identity: torch.Tensor,
                 motion_frames: torch.Tensor, audio_emb: torch.Tensor) -> torch.Tensor:
        d = self.dtype
        return self.model(x_t.to(d), timesteps, identity.to(d), motion_frames=motion_frames.to(d),
                          audio_emb=audio_emb.to(d))
