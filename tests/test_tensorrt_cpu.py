"""The TensorRT backend's bookkeeping on the CPU, over the engine stand-in of ``_trt_standin`` (not TensorRT).

What a real engine would do is left to tests/test_gpu.py; here: every address bound is 256-byte aligned
and owned by the backend, every return value is checked, and no two captured graphs share a context.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc

import pytest
import torch

from dheads.engine.backends.base import BackendError, BatchProfile, check_batches, graph_denoiser
from dheads.engine.backends.tensorrt_ import ALIGNMENT, aligned_empty
from dheads.engine.config import SMALL, SamplerConfig
from dheads.engine.generate import FrameLoop, LoopConfig, generate_frames

from _trt_standin import AnalyticDenoiser, standin_denoiser

GRAY = dataclasses.replace(SMALL, grayscale_motion=True)


def _inputs(b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ident = torch.rand(b, 3, 32, 32, generator=g) * 2 - 1
    audio = [torch.randn(5, 32, generator=g) for _ in range(b)]
    return ident, audio


def _frames(den, b: int, sampler, seed: int = 0, loop=None):
    ident, audio = _inputs(b, seed)
    cfg = LoopConfig(sampler=sampler, batch=b, cuda_graph=False)
    return torch.stack(list(generate_frames(den, ident, audio, config=cfg, seed=seed, loop=loop)))


@pytest.mark.parametrize("shape,dtype", [((7,), torch.float32), ((3, 5, 5), torch.float16), ((1,), torch.int64)])
def test_aligned_empty_starts_on_a_256_byte_boundary(shape, dtype):
    for _ in range(20):  # different allocator offsets
        t = aligned_empty(shape, dtype, torch.device("cpu"))
        assert t.data_ptr() % ALIGNMENT == 0 and t.shape == shape and t.dtype == dtype and t.is_contiguous()


@pytest.mark.parametrize("config", [SMALL, GRAY], ids=["rgb-motion", "grayscale-motion"])
def test_loop_on_the_standin_engine_gives_the_analytic_frames(config):
    """The loop passes views (a row of its timestep table, 4*k*b bytes in); the backend copies each into
    an aligned buffer of its own, so every step runs at its own t and every bound address is aligned."""
    den, engine = standin_denoiser(config)
    sampler = SamplerConfig("ddim", 6)
    got = _frames(den, 2, sampler)
    want = _frames(AnalyticDenoiser(config), 2, sampler)
    assert torch.equal(got, want)
    ctx = engine.contexts[0]
    assert len(engine.contexts) == 1 and len(ctx.executions) == 5 * 6  # 5 frames of 6 steps, one context
    assert ctx.address_calls and all(ptr % ALIGNMENT == 0 for _, ptr in ctx.address_calls)
    # bound once for the batch, not per call: a captured graph replays on the addresses it was captured with
    assert len(ctx.address_calls) == 6


def test_eager_calls_switch_batch_on_the_eager_context_only():
    den, engine = standin_denoiser(SMALL)
    runner = graph_denoiser(den)
    sampler = SamplerConfig("ddpm", 3)
    loop1 = FrameLoop(runner, LoopConfig(sampler=sampler, batch=1, cuda_graph=False))
    first = _frames(runner, 1, sampler, loop=loop1)
    eager, graph_ctx = engine.contexts[0], engine.contexts[1]
    shaped = list(graph_ctx.shape_calls)
    for b in (1, 2, 1):  # the batcher's pattern: the eager context is reshaped, the graph's never
        _frames(den, b, sampler, seed=b)
    assert [shape[0] for name, shape in eager.shape_calls if name == "x_t"] == [1, 2, 1]
    assert graph_ctx.shape_calls == shaped == [(s.name, s.concrete(1)) for s in den.inputs]
    assert torch.equal(_frames(runner, 1, sampler, loop=loop1), first)  # the same loop, a second video
    assert den.contexts == 2


def test_a_graph_denoiser_has_its_own_context_and_one_batch():
    den, engine = standin_denoiser(SMALL)
    a, b = graph_denoiser(den), graph_denoiser(den)
    assert a.ctx.context is not b.ctx.context and den._eager.context not in (a.ctx.context, b.ctx.context)
    x = [torch.zeros(s.concrete(2)) for s in den.inputs]
    a(*x)
    with pytest.raises(BackendError) as e:
        a(*[t[:1] for t in x])
    assert str(e.value) == ("standin.plan: this graph's TensorRT context runs batch 2, not 1; "
                            "take another for_graph()")
    del a, b, e  # (the traceback held a)
    gc.collect()
    assert den.contexts == 1  # a graph's context goes with the loop that held it


def test_every_captured_graph_gets_a_context_of_its_own(monkeypatch):
    """FrameLoop's capture path, driven on the CPU with torch.cuda's graph API replaced by recorders:
    loops at batch 1, 2 and 1 again, cold and warm graphs, never share a TensorRT context, each graph's
    context is shaped once, and the capture runs on the warm-up's stream in thread_local mode."""
    calls = []

    class Stream:
        def __init__(self, device=None):
            self.name = f"side{len([c for c in calls if c[0] == 'stream'])}"
            calls.append(("stream", self.name))

        def wait_stream(self, other):
            calls.append(("wait", self.name, getattr(other, "name", other)))

    class Graph:
        def replay(self):
            self.loop.denoise(self.warm, self.den)  # the recorded work, run again

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None, capture_error_mode="global"):
        calls.append(("capture", stream.name, capture_error_mode))
        yield

    @contextlib.contextmanager
    def on_stream(s):
        yield

    current = Stream()
    current.name = "caller"
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    from dheads.engine import generate

    real_capture = generate.FrameLoop._capture

    def capture(self, warm):
        g, den = real_capture(self, warm)
        g.loop, g.warm, g.den = self, warm, den
        return g, den

    monkeypatch.setattr(generate.FrameLoop, "_capture", capture)
    den, engine = standin_denoiser(SMALL)
    sampler = SamplerConfig("ddim", 4, warm_steps=2)
    loops = {}
    for b in (1, 2, 1):
        loop = loops.setdefault(b, FrameLoop(den, LoopConfig(sampler=sampler, batch=b)))
        loop.use_graph = True  # the CUDA path, on the CPU
        got = _frames(den, b, sampler, seed=b, loop=loop)
        assert torch.equal(got, _frames(AnalyticDenoiser(SMALL), b, sampler, seed=b))
    graphs = [g for loop in loops.values() for g in loop._graphs.values()]
    contexts = [den_.ctx.context for _, den_ in graphs]
    assert len(graphs) == 4 and len(set(map(id, contexts))) == 4  # (b1, cold), (b1, warm), (b2, cold), (b2, warm)
    assert den._eager.context not in contexts and not den._eager.context.executions
    for ctx in contexts:
        assert len({shape for name, shape in ctx.shape_calls if name == "x_t"}) == 1
        assert all(ptr % ALIGNMENT == 0 for _, ptr in ctx.address_calls)
    captures = [c for c in calls if c[0] == "capture"]
    assert captures == [("capture", "side1", "thread_local"), ("capture", "side2", "thread_local"),
                        ("capture", "side3", "thread_local"), ("capture", "side4", "thread_local")]
    # the side stream waits for the caller before its warm-up, and the caller for the side stream after capture
    assert calls[1:5] == [("stream", "side1"), ("wait", "side1", "caller"), ("capture", "side1", "thread_local"),
                          ("wait", "caller", "side1")]


@pytest.mark.parametrize("fail,message", [
    ("create_execution_context", "standin.plan: TensorRT cannot create an execution context (3 MiB of GPU memory; "
                                 "is the GPU full?)"),
    ("set_input_shape", "standin.plan: TensorRT refused shape (1, 3, 32, 32) for x_t"),
    ("set_tensor_address", "standin.plan: TensorRT refused the address of x_t"),
    ("execute_async_v3", "standin.plan: TensorRT execution failed (see the TensorRT log above)"),
])
def test_every_tensorrt_return_value_is_checked(fail, message):
    den, engine = standin_denoiser(SMALL)
    engine.fail = fail
    x = [torch.zeros(s.concrete(1)) for s in den.inputs]
    with pytest.raises(BackendError) as e:
        graph_denoiser(den)(*x)
    assert str(e.value) == message


def test_a_misaligned_buffer_is_refused_before_tensorrt_sees_it(monkeypatch):
    from dheads.engine.backends import tensorrt_

    monkeypatch.setattr(tensorrt_, "aligned_empty", lambda shape, dtype, device: torch.empty(
        int(torch.tensor(shape).prod()) + 1, dtype=dtype)[1:].view(shape))  # 4 bytes past an allocation
    den, engine = standin_denoiser(SMALL)
    with pytest.raises(BackendError, match=r"standin.plan: x_t at 0x[0-9a-f]+ is not 256-byte aligned$"):
        den(*[torch.zeros(s.concrete(1)) for s in den.inputs])
    assert engine.contexts[0].address_calls == []


def test_batch_outside_the_profile_is_one_line():
    den, _ = standin_denoiser(SMALL, BatchProfile(1, 1, 2))
    with pytest.raises(BackendError) as e:
        den(*[torch.zeros(s.concrete(3)) for s in den.inputs])
    assert str(e.value) == "standin.plan: batch 3 is outside the plan's profile 1..2; re-export with --batch"


def test_device_memory_counts_every_live_context():
    den, engine = standin_denoiser(SMALL)
    runners = [graph_denoiser(den) for _ in range(3)]
    assert den.contexts == 4 and den.device_memory_bytes == 4 * engine.device_memory_size_v2
    del runners
    assert den.device_memory_bytes == engine.device_memory_size_v2


def test_check_batches_names_the_setting_and_the_fix():
    den, _ = standin_denoiser(SMALL, BatchProfile(1, 1, 1))
    check_batches(den, 1, "--max-streams 1")
    with pytest.raises(BackendError) as e:
        check_batches(den, 8, "--max-streams 8")
    assert str(e.value) == ("standin.plan: the engine was exported for batch 1..1 but --max-streams 8 runs batches "
                            "1..8; re-export with `dh-export --batch 1:1:8` or lower it")
    check_batches(AnalyticDenoiser(SMALL), 64, "--max-streams 64")  # no profile: any batch
