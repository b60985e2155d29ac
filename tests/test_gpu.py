"""GPU checks (marked ``gpu``; skipped where torch sees no CUDA device).

Run on a lent GPU with: ``pytest -m "gpu or tensorrt" tests/test_gpu.py`` (or ``make gpu-check``, which
also builds the plans and benchmarks every backend side by side).
"""

from __future__ import annotations

import pytest
import torch

from dheads.benchmarks.bench import strict_fp32
from dheads.engine.backends.base import UNET_INPUTS, BatchProfile, example_inputs
from dheads.engine.backends.pytorch import TorchDenoiser
from dheads.engine.config import CREMA, SMALL, SamplerConfig
from dheads.engine.generate import FrameLoop, LoopConfig, generate_frames
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


# --- Issue 32: every GPU backend through FrameLoop with graphs, batch switches, loop reuse, cuda:N.
# Run on a lent GPU by `make gpu-check` (benchmarks/gpu_check.py); none of these has run yet.

GPU_SAMPLER = SamplerConfig("dpmpp_2m", 8, warm_steps=3)  # a cold and a warm graph per loop
BACKENDS = ["pytorch", pytest.param("tensorrt", marks=pytest.mark.tensorrt), "onnxruntime"]


@pytest.fixture(scope="module")
def gpu_bundle(tmp_path_factory):
    """SMALL random weights exported fp32 for batch 1..2 (with a plan where TensorRT is installed)."""
    from dheads.engine.checkpoint import checkpoint_from_model, save_checkpoint
    from dheads.export.pipeline import export_bundle

    root = tmp_path_factory.mktemp("gpu_bundle")
    net = _model(SMALL)
    ckpt = save_checkpoint(root / "small.pt", checkpoint_from_model(net))
    export_bundle(ckpt, root / "bundle", precision="fp32", profile=BatchProfile(1, 1, 2), seed=0)
    return net, root / "bundle"


def _open(backend, gpu_bundle, device="cuda"):
    import copy

    from dheads.engine.backends import open_denoiser
    from dheads.engine.backends.onnxruntime_ import has_cuda_provider

    net, bundle = gpu_bundle
    if backend == "pytorch":
        return TorchDenoiser(copy.deepcopy(net), device=device)
    if backend == "onnxruntime" and not has_cuda_provider():
        pytest.skip("onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu)")
    return open_denoiser(bundle, backend=backend, device=device)[0]


def _video(b, seed, n=5):
    g = torch.Generator().manual_seed(seed)
    ident = torch.rand(b, 3, 32, 32, generator=g) * 2 - 1
    return ident, [torch.randn(n, 32, generator=g) for _ in range(b)]


def _frames_of(den, b, seed, graph, loop=None):
    ident, audio = _video(b, seed)
    cfg = LoopConfig(sampler=GPU_SAMPLER, batch=b, cuda_graph=graph)
    return torch.stack(list(generate_frames(den, ident.to(den.device), audio, config=cfg, seed=seed, loop=loop)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_equals_eager_at_batch_1_2_1(backend, gpu_bundle):
    """One denoiser; loops at batch 1, then 2, then the batch-1 loop again (its graphs replayed after the
    denoiser ran at batch 2): each video as eager makes it."""
    den = _open(backend, gpu_bundle)
    loops = {}
    for b in (1, 2, 1):
        loop = loops.setdefault(b, FrameLoop(den, LoopConfig(sampler=GPU_SAMPLER, batch=b)))
        graphed = _frames_of(den, b, seed=b, graph=True, loop=loop)
        eager = _frames_of(den, b, seed=b, graph=False)
        err = (graphed - eager).abs().max().item()
        assert err < 1e-5, (b, err)  # same kernels on the same buffers; a stale binding is an O(1) error
        assert loop.use_graph == den.graph_safe
    if backend == "tensorrt":
        assert den.contexts == 1 + 4  # the eager context + (batch 1, 2) x (cold, warm) graphs
        for loop in loops.values():
            for _, runner in loop._graphs.values():
                for name in (*UNET_INPUTS, "model_out"):
                    assert runner.ctx.context.get_tensor_address(name) % 256 == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_videos_through_one_cached_loop(backend, gpu_bundle):
    den = _open(backend, gpu_bundle)
    loop = FrameLoop(den, LoopConfig(sampler=GPU_SAMPLER, batch=1))
    for seed in (3, 4, 3):
        got = _frames_of(den, 1, seed, graph=True, loop=loop)
        want = _frames_of(den, 1, seed, graph=False)
        assert (got - want).abs().max().item() < 1e-5, seed


def test_cuda_onnxruntime_matches_cpu_onnxruntime(gpu_bundle):
    from dheads.engine.backends import open_denoiser

    cuda = _open("onnxruntime", gpu_bundle)
    cpu = open_denoiser(gpu_bundle[1], backend="onnxruntime", device="cpu")[0]
    for b in (1, 2):
        x = example_inputs(SMALL, b, generator=torch.Generator().manual_seed(b))
        args = [x[k] for k in UNET_INPUTS]
        ref = cpu(*args)
        got = cuda(*[a.cuda() for a in args]).cpu()
        assert ((got - ref).norm() / ref.norm()).item() < 1e-4  # fp32 both, cuDNN vs MLAS kernels
    assert cuda.session.get_providers()[0] == "CUDAExecutionProvider"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (--device cuda:1)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_device_cuda_1_is_honoured_in_the_loop(backend, gpu_bundle):
    """Everything on cuda:1 while cuda:0 stays the current device: the same frames as on cuda:0, and torch
    allocates nothing on cuda:0 meanwhile."""
    want = _frames_of(_open(backend, gpu_bundle, "cuda:0"), 1, seed=5, graph=True)
    torch.cuda.set_device(0)
    before = torch.cuda.memory_allocated(0)
    den = _open(backend, gpu_bundle, "cuda:1")
    got = _frames_of(den, 1, seed=5, graph=True)
    assert den.device == torch.device("cuda", 1) and torch.cuda.memory_allocated(0) == before
    assert (got - want).abs().max().item() < 1e-4  # another GPU of the same kind: same kernels expected


@pytest.mark.tensorrt
def test_tensorrt_eager_stream_is_its_own(gpu_bundle):
    """Eager calls run on the denoiser's stream, never the legacy default stream, handed off by events."""
    den = _open("tensorrt", gpu_bundle)
    assert den._stream.cuda_stream != 0
    x = example_inputs(SMALL, 2, device="cuda", generator=torch.Generator().manual_seed(0))
    out = den(*[x[k] for k in UNET_INPUTS])
    ref = TorchDenoiser(_model(SMALL), device="cuda")
    with strict_fp32():
        want = ref(*[x[k] for k in UNET_INPUTS]).float()
    assert ((out - want).norm() / want.norm()).item() < 1e-3  # read on the caller's stream without a sync
