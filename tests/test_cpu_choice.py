"""--device auto on a CPU: the fastest engine that passed quality parity for this very model, else ONNX Runtime fp32."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from dheads.engine import cpu_choice
from dheads.engine.backends import open_denoiser
from dheads.engine.bundle import sha256_file
from dheads.engine.pipeline import default_engine_path

DEMO = default_engine_path()
HAS_OV = importlib.util.find_spec("openvino") is not None
OV_HERE, OV_WHY = HAS_OV, "openvino is not installed"


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def passed(monkeypatch, *engines):
    monkeypatch.setattr(cpu_choice, "PASSED", {sha256_file(DEMO / "unet.onnx"): cpu_choice.Measured(engines, "test")})


def test_a_model_never_measured_runs_on_onnxruntime_fp32(cpu_only, monkeypatch):
    monkeypatch.setattr(cpu_choice, "PASSED", {"0" * 64: cpu_choice.Measured((("openvino", "bf16"),), "another")})
    assert cpu_choice.choose(DEMO) == ("onnxruntime", "fp32")
    den, info = open_denoiser(DEMO, device="auto")
    assert (info.backend, info.precision) == ("onnxruntime", "fp32")


def test_an_engine_this_machine_cannot_run_falls_through(monkeypatch, tmp_path):
    for name in ("manifest.json", "unet.onnx"):
        shutil.copy(DEMO / name, tmp_path / name)
    monkeypatch.setattr(cpu_choice, "PASSED", {sha256_file(DEMO / "unet.onnx"): cpu_choice.Measured(
        (("onnxruntime", "int8"), ("onnxruntime", "fp32")), "test")})
    assert cpu_choice.unavailable(tmp_path, "onnxruntime", "int8") == "no unet_int8.onnx"
    assert cpu_choice.choose(tmp_path) == ("onnxruntime", "fp32")


@pytest.mark.skipif(not OV_HERE, reason=OV_WHY)
def test_auto_on_a_cpu_takes_the_first_passed_engine_it_can_run(cpu_only, monkeypatch):
    from dheads.engine.backends import openvino_ as ovb

    monkeypatch.setattr(ovb.CpuInfo, "of", classmethod(lambda cls, core: cls("Some CPU", ("FP32", "BF16", "INT8"))))
    passed(monkeypatch, ("openvino", "bf16"), ("onnxruntime", "fp32"))
    den, info = open_denoiser(DEMO, device="auto")
    assert (info.backend, info.precision) == ("openvino", "bf16") and info.description.startswith("openvino bf16")
    den, info = open_denoiser(DEMO, device="cpu")  # a named device keeps the plain default
    assert (info.backend, info.precision) == ("onnxruntime", "fp32")
    den, info = open_denoiser(DEMO, device="auto", backend="onnxruntime")  # so does a named backend
    assert info.backend == "onnxruntime"


@pytest.mark.skipif(not OV_HERE, reason=OV_WHY)
def test_a_cpu_without_bf16_gets_the_next_engine(cpu_only, monkeypatch):
    from dheads.engine.backends import openvino_ as ovb

    monkeypatch.setattr(ovb.CpuInfo, "of", classmethod(lambda cls, core: cls("Old CPU", ("FP32", "INT8"))))
    passed(monkeypatch, ("openvino", "bf16"), ("openvino", "fp32"))
    assert cpu_choice.unavailable(DEMO, "openvino", "bf16") == "the CPU lacks BF16"
    assert cpu_choice.choose(DEMO) == ("openvino", "fp32")
