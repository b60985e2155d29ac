"""The reference frame loop: plain eager PyTorch, as the authors' sampler runs it.

Every faster path (fused loop, CUDA graphs, ONNX Runtime, TensorRT) is checked against this on
identical noise. It allocates freely and favours obviousness over speed.
"""

from __future__ import annotations

import torch

from .conditioning import audio_windows, motion_transform
from .config import SamplerConfig
from .model import DiffusedHeadsUNet
from .noise import NoiseFn, as_noise_fn
from .sampling import get_step, make_tables
from .schedule import cosine_schedule, respace


@torch.no_grad()
def generate_reference(model: DiffusedHeadsUNet, identity: torch.Tensor, audio_emb: torch.Tensor, *,
                       sampler: SamplerConfig = SamplerConfig(), num_timesteps: int = 1000, seed: int = 0,
                       noise: torch.Tensor | NoiseFn | None = None) -> torch.Tensor:
    """identity: [1, 3, H, W] in [-1, 1]; audio_emb: [N, D]. Returns frames [N, 3, H, W] in [-1, 1]."""
    cfg = model.config
    device = identity.device
    schedule = respace(cosine_schedule(num_timesteps), sampler.steps)
    tables = make_tables(schedule, device, eta=sampler.eta)
    step = get_step(sampler.name)
    windows = audio_windows(audio_emb, cfg.audio_window)
    noise_fn = as_noise_fn(noise, seed, device)
    motion = [motion_transform(identity, cfg.grayscale_motion)] * cfg.motion_frames
    frames = []
    for i in range(audio_emb.shape[0]):
        z = torch.empty(len(schedule) + 1, *identity.shape, device=device)
        noise_fn(i, z)
        x = z[0]
        for k in reversed(range(len(schedule))):
            t = tables.timesteps[k].expand(identity.shape[0])
            out = model(x, t, identity, motion_frames=torch.cat(motion, dim=1), audio_emb=windows[i][None])
            x = step(x, out, tables, k, z[1 + k], sampler.clip_denoised)
        frames.append(x)
        motion = motion[1:] + [motion_transform(x, cfg.grayscale_motion)]
    return torch.cat(frames)
