"""Checks that stop a GPU run at start-up rather than mid-run, tested on the CPU (issue 32).

ONNX Runtime asked for CUDA but running on its CPU provider; dh-bench and dh-serve asking a TensorRT plan
for batches its profile lacks; the grayscale motion ring copying a host constant every frame.
"""

from __future__ import annotations

import pytest
import torch

from dheads.engine import conditioning
from dheads.engine.backends import BackendError, BatchProfile, onnxruntime_
from dheads.engine.bundle import read_manifest
from dheads.engine.config import SMALL
from dheads.engine.pipeline import default_engine_path

from _trt_standin import standin_denoiser


def test_cuda_asked_but_session_runs_on_cpu_is_one_line_error(monkeypatch):
    """The CPU wheel behaves as onnxruntime-gpu does when its CUDA provider fails to load: it warns and
    makes a CPU session. The backend must refuse it rather than bind CUDA pointers to it."""
    monkeypatch.setattr(onnxruntime_, "has_cuda_provider", lambda: True)  # as onnxruntime-gpu reports
    monkeypatch.setattr(onnxruntime_, "own_stream", lambda device: (None, 1))  # no CUDA stream on this machine
    bundle = default_engine_path()
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        with pytest.raises(BackendError) as e:
            onnxruntime_.OrtDenoiser(bundle / "unet.onnx", read_manifest(bundle).model, device="cuda:0")
    assert str(e.value) == (f"{bundle / 'unet.onnx'}: CUDA asked for but ONNX Runtime's CUDA execution provider "
                            "did not load (the session runs on CPUExecutionProvider); install an onnxruntime-gpu "
                            f"built for torch's CUDA ({torch.version.cuda or 'none'}), or use device='cpu'")


def test_dh_bench_exports_the_batches_it_runs_and_checks_them(monkeypatch, tmp_path):
    """dh-bench --batch 4 used to export the default profile 1..1 and fail at batch 4."""
    from dheads.benchmarks.bench import open_backend
    from dheads.engine import backends
    from dheads.engine.model import random_unet
    from dheads.export import pipeline

    exported = {}
    monkeypatch.setattr(pipeline, "export_bundle", lambda ckpt, out, **kw: exported.update(kw))
    # a plan whose profile stops short of the batch, however it came to be: refused before any timing
    monkeypatch.setattr(backends, "open_denoiser",
                        lambda *a, **kw: (standin_denoiser(SMALL, BatchProfile(1, 1, 1))[0], None))
    with pytest.raises(BackendError) as e:
        open_backend("tensorrt", random_unet(SMALL), "fp32", torch.device("cpu"), tmp_path, batch=4)
    assert exported["profile"] == BatchProfile(1, 1, 4) and exported["tensorrt"] is True
    assert str(e.value) == ("standin.plan: the engine was exported for batch 1..1 but --batch 4 runs batches 1..4; "
                            "re-export with `dh-export --batch 1:1:4` or lower it")


def test_dh_serve_refuses_max_streams_beyond_the_plan_at_start(tmp_path):
    from types import SimpleNamespace

    from dheads.serve.config import ServeConfig
    from dheads.serve.worker import EngineWorker

    head = SimpleNamespace(denoiser=standin_denoiser(SMALL, BatchProfile(1, 1, 1))[0])
    worker = EngineWorker(ServeConfig(max_streams=8, threads=1, video_dir=str(tmp_path)), head=head)
    with pytest.raises(BackendError) as e:
        worker.start()
    assert str(e.value) == ("standin.plan: the engine was exported for batch 1..1 but --max-streams 8 runs batches "
                            "1..8; re-export with `dh-export --batch 1:1:8` or lower it")
    assert worker.batcher is None and not worker.ready


def test_grayscale_motion_ring_makes_its_weights_once(monkeypatch):
    made = []
    real = conditioning.luma_weights
    monkeypatch.setattr(conditioning, "luma_weights", lambda *a, **kw: made.append(a) or real(*a, **kw))
    ring = conditioning.MotionRing(2, 3, 1, 8, grayscale=True)
    frame = torch.rand(2, 3, 8, 8)
    ring.reset(frame)
    for _ in range(4):
        ring.push(frame)
    assert len(made) == 1  # at construction, not per frame
    want = (frame * torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert torch.equal(ring.buffer[:, -1], want)
    assert torch.equal(conditioning.motion_transform(frame, True), want)  # without weights: the same values



def test_gpu_check_reads_test_outcomes_from_junit(tmp_path):
    from dheads.benchmarks.gpu_check import _outcomes

    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="a"/>'
                   '<testcase classname="t" name="b"><failure message="x"/></testcase>'
                   '<testcase classname="t" name="c"><skipped message="no GPU"/></testcase>'
                   '<testcase classname="t" name="d"><error message="y"/></testcase></testsuite></testsuites>')
    assert _outcomes(xml) == {"passed": ["t::a"], "failed": ["t::b", "t::d"], "skipped": ["t::c"]}
