"""The reference frame loop: plain eager PyTorch, as the authors' sampler runs it.

Every faster path (fused loop, CUDA graphs, ONNX Runtime, TensorRT) is checked against this on
identical noise. It allocates freely and favours obviousness over speed; it shares the sampling plan
and the step-loop contract (``plan.denoise_frame``) with the fast loop.
"""

from __future__ import annotations

import torch

from .conditioning import audio_windows, motion_transform
from .config import DiffusionConfig, SamplerConfig
from .model import DiffusedHeadsUNet
from .noise import NoiseFn, as_noise_fn
from .plan import denoise_frame, make_plan, make_state, warm_start


@torch.no_grad()
def generate_reference(model: DiffusedHeadsUNet, identity: torch.Tensor, audio_emb: torch.Tensor, *,
                       sampler: SamplerConfig | None = None, diffusion: DiffusionConfig = DiffusionConfig(),
                       seed: int = 0, noise: torch.Tensor | NoiseFn | None = None) -> torch.Tensor:
    """identity: [1, 3, H, W] in [-1, 1]; audio_emb: [N, D]. Returns frames [N, 3, H, W] in [-1, 1].

    ``diffusion``: the artifact's config (T, schedule); ``sampler`` None = its default sampler and steps.
    """
    cfg = model.config
    device = identity.device
    plan = make_plan(diffusion, sampler)
    tables = plan.tables(device)
    windows = audio_windows(audio_emb, cfg.audio_window)
    noise_fn = as_noise_fn(noise, seed, device, corr=plan.sampler.noise_corr)
    motion = [motion_transform(identity, cfg.grayscale_motion)] * cfg.motion_frames
    frames: list[torch.Tensor] = []
    for i in range(audio_emb.shape[0]):
        z = torch.empty(plan.steps + 1, *identity.shape, device=device)
        noise_fn(i, z)
        warm = bool(frames) and plan.calls(True) < plan.steps
        start = plan.start(warm)
        x = warm_start(torch.empty_like(identity), frames[-1], z[0], tables, start) if warm else z[0]

        def unet(x: torch.Tensor, k: int) -> torch.Tensor:
            t = tables.timesteps[k].expand(identity.shape[0])
            return model(x, t, identity, motion_frames=torch.cat(motion, dim=1), audio_emb=windows[i][None])

        x = denoise_frame(unet, x, plan, tables, z, make_state(plan.spec, identity), start)
        frames.append(x)
        motion = motion[1:] + [motion_transform(x, cfg.grayscale_motion)]
    return torch.cat(frames)
