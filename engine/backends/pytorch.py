"""PyTorch backend: eager fp32 (the reference numerics) or fp16 + channels-last on GPU; float32 out either way."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..model import DiffusedHeadsUNet
from .artifact import Artifact, Runtime
from .base import precision_dtype


def accepts(artifact: Artifact) -> bool:
    """PyTorch runs a checkpoint's module (a bundle holds no PyTorch weights)."""
    return artifact.kind == "checkpoint"


def open(artifact: Artifact, runtime: Runtime, *, compiled: bool = False) -> tuple[TorchDenoiser, str]:  # noqa: A001
    """The checkpoint's UNet (its EMA weights) in a ``TorchDenoiser`` (``compiled``: ``CompiledTorchDenoiser``)
    on ``runtime.device`` in ``runtime.precision`` (fp32 or fp16), and that precision."""
    cls, dtype = CompiledTorchDenoiser if compiled else TorchDenoiser, precision_dtype(runtime.precision)
    return cls(artifact.checkpoint.build(), device=runtime.device, dtype=dtype), runtime.precision


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
        self.forward = self.model  # what a call runs (the compiled module in CompiledTorchDenoiser)
        self.graph_safe = self.device.type == "cuda"

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor, identity: torch.Tensor,
                 motion_frames: torch.Tensor, audio_emb: torch.Tensor) -> torch.Tensor:
        d = self.dtype
        out = self.forward(x_t.to(d), timesteps, identity.to(d), motion_frames=motion_frames.to(d),
                           audio_emb=audio_emb.to(d))
        return out if out.dtype == torch.float32 else out.float()  # float32 out of every backend


class CompiledTorchDenoiser(TorchDenoiser):
    """The same UNet through ``torch.compile`` (Inductor), channels-last: what GPU users compare TensorRT
    against (about 1.4x over eager for Stable Diffusion UNets).

    Compiled for static shapes (``dynamic=False``): the first call at each batch size compiles (seconds
    to minutes; needs a C++ compiler on the CPU, Triton on CUDA). Numerics are
    eager's up to fp32 rounding of fused kernels (tested on CPU). On CUDA it is marked graph-safe like
    the eager backend (the loop's warm-up frame runs before capture, so compilation never happens inside
    a CUDA graph); that path has not run on a GPU in this project yet.
    """

    name = "torch-compile"

    def __init__(self, model: DiffusedHeadsUNet, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, mode: str | None = None):
        super().__init__(model, device=device, dtype=dtype, channels_last=True)
        self.mode = mode
        self.forward = torch.compile(self.model, dynamic=False, mode=mode)
