"""GPU checks (marked ``gpu``; skipped where torch sees no CUDA device).

Run on a lent GPU with: ``pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from dheads.benchmarks.bench import strict_fp32
from dheads.engine.backends.base import UNET_INPUTS, example_inputs
from dheads.engine.backends.pytorch import TorchDenoiser
from dheads.engine.config import CREMA, SMALL, SamplerConfig
from dheads.engine.generate import LoopConfig, generate_frames
from dheads.engine.model import random_unet
from dheads.engine.reference import generate_reference

pytestmark = pytest.mark.gpu


def _model(cfg, seed=0):
    return random_unet(cfg, seed=seed)


def _run(den, ident, audio, noise, sampler, graph):
    cfg = LoopConfig(sampler=sampler, cuda_graph=graph)
    return torch.cat(list(generate_frames(den, ident, audio, config=cfg, noise=noise)))


@pytest.mark.parametrize("sampler", [SamplerConfig("ddpm", 20), SamplerConfig("unipc", 20),
                                     SamplerConfig("dpmpp_2m", 20, warm_steps=5)])
def test_cuda_graph_replay_equals_eager(sampler):
    """Multistep state buffers and the warm-start graph (a second capture) replay like eager."""
    net = _model(SMALL)
    den = TorchDenoiser(net, device="cuda")
    g = torch.Generator().manual_seed(0)
    ident, audio = torch.rand(1, 3, 32, 32, generator=g).cuda() * 2 - 1, torch.randn(6, 32, generator=g)
    noise = torch.randn(6, 21, 1, 3, 32, 32, generator=g)
    eager = _run(den, ident, audio, noise, sampler, graph=False)
    graphed = _run(den, ident, audio, noise, sampler, graph=True)
    # The same kernels replayed on the same buffers: expected bit-exact. The bound leaves room only for
    # cuBLAS/cuDNN picking another reduction order on the capture stream; a graph bug (a stale buffer,
    # a step out of order) is an O(1) error.
    err = (eager - graphed).abs().max().item()
    assert err < 1e-5, err


def test_gpu_fp32_matches_cpu_reference():
    net = _model(SMALL)
    sampler = SamplerConfig("ddim", 10)
    g = torch.Generator().manual_seed(1)
    ident, audio = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.randn(4, 32, generator=g)
    noise = torch.randn(4, 11, 1, 3, 32, 32, generator=g)
    ref = generate_reference(net, ident, audio, sampler=sampler, noise=noise)
    with strict_fp32():  # no TF32 in cuDNN convolutions (PyTorch's default allows it)
        got = _run(TorchDenoiser(net, device="cuda"), ident.cuda(), audio, noise, sampler, graph=True).cpu()
    assert (got - ref).abs().max().item() < 1e-3  # fp32 on both, different kernels; DDIM eta 0 is stable


def test_fp16_per_step_error_is_small():
    """One UNet call at full size: fp16 + channels-last vs strict fp32, relative L2 error of the output."""
    net = _model(CREMA)
    fp32 = TorchDenoiser(net, device="cuda")
    x = example_inputs(CREMA, 2, device="cuda", generator=torch.Generator().manual_seed(0))
    args = [x[k] for k in UNET_INPUTS]
    with strict_fp32():
        ref = fp32(*args).float()
    fp16 = TorchDenoiser(_model(CREMA), device="cuda", dtype=torch.float16, channels_last=True)
    got = fp16(*args).float()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel  # fp16 operands, fp32 accumulation: 1e-3..1e-2 expected
