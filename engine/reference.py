"""The reference frame loop: plain eager PyTorch, as the authors' sampler runs it.

Every faster path (fused loop, CUDA graphs, ONNX Runtime, TensorRT) is checked against this on
identical noise. It calls the model itself, one frame after another, and favours obviousness over speed;
what crosses frames (motion ring, noise, last frame, frame count) is the ``generate.FrameState`` the fast
loop and the batcher drive, and a frame runs the one step loop ``plan.denoise_frame``.
"""

from __future__ import annotations

import torch

from .conditioning import audio_windows
from .config import DiffusionConfig, SamplerConfig
from .generate import FrameState
from .model import DiffusedHeadsUNet
from .noise import NoiseFn
from .plan import make_plan


@torch.no_grad()
def generate_reference(model: DiffusedHeadsUNet, identity: torch.Tensor, audio_emb: torch.Tensor, *,
                       sampler: SamplerConfig | None = None, diffusion: DiffusionConfig = DiffusionConfig(),
                       seed: int = 0, noise: torch.Tensor | NoiseFn | None = None) -> torch.Tensor:
    """identity: [1, 3, H, W] in [-1, 1]; audio_emb: [N, D]. Returns frames [N, 3, H, W] in [-1, 1].

    ``diffusion``: the artifact's config (T, schedule); ``sampler`` None = its default sampler and steps.
    """
    cfg = model.config
    video = FrameState(make_plan(diffusion, sampler), cfg, identity.shape[0], identity.device)
    video.start(identity, seed=seed, noise=noise)
    windows = audio_windows(audio_emb, cfg.audio_window)
    frames: list[torch.Tensor] = []
    for i in range(audio_emb.shape[0]):
        video.draw_noise()
        x, start = video.begin()

        def unet(x: torch.Tensor, k: int) -> torch.Tensor:
            t = video.tables.timesteps[k].expand(identity.shape[0])
            return model(x, t, identity, motion_frames=video.ring.flat, audio_emb=windows[i][None])

        frames.append(video.denoise(unet, x, start).clone())
        video.finish(frames[-1])
    return torch.cat(frames)
