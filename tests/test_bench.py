"""dh-bench end to end on CPU: every backend row, the reference row, parity and the written files."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dheads.benchmarks.bench import parity, reference_output, strict_fp32
from dheads.benchmarks.cli import app
from dheads.engine.backends.pytorch import TorchDenoiser
from dheads.engine.config import SMALL
from dheads.engine.model import random_unet


def test_dh_bench_writes_rows_beside_the_reference(tmp_path):
    args = ["--model", "small", "--device", "cpu", "--backends", "pytorch,onnxruntime", "--steps", "3",
            "--frames", "1", "--batch", "2", "--repeats", "1", "--out", str(tmp_path), "--name", "t"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["machine"]["device"] == "cpu" and result["config"]["steps"] == 3
    rows = {r["backend"]: r for r in result["results"]}
    assert set(rows) == {"pytorch", "onnxruntime"}
    assert rows["pytorch"]["parity_vs_fp32"]["max_abs"] == 0.0  # the same eager fp32 module on CPU
    assert 0 < rows["onnxruntime"]["parity_vs_fp32"]["rel_l2"] < 1e-5  # another runtime: fp32 rounding only
    for r in rows.values():
        assert r["loop_b1"]["frame"]["n"] == 1 and r["loop_b1"]["cuda_graph"] is False
        assert r["loop_b2"]["fps"] > 0 and r["speedup_vs_reference"] > 0
    assert result["reference"]["frame"]["median_ms"] > 0
    table = (tmp_path / "t.md").read_text().splitlines()
    assert len([line for line in table if line.startswith(("| pytorch", "| onnxruntime"))]) == 2
    assert table[-1].startswith("| reference (authors' loop) | fp32 |")


def test_parity_sees_a_different_model():
    model = random_unet(SMALL, seed=0)
    ref = reference_output(model, torch.device("cpu"))
    other = TorchDenoiser(random_unet(SMALL, seed=1))
    assert parity(other, ref)["rel_l2"] > 0.1


def test_strict_fp32_restores_the_tf32_flags():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with strict_fp32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def test_dh_bench_parity_only_checks_pytorch_fp16_on_cpu(tmp_path):
    args = ["--model", "small", "--device", "cpu", "--precisions", "fp32,fp16", "--no-timing", "--out", str(tmp_path)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "small_cpu_parity.json").read_text())
    errs = {r["precision"]: r["parity_vs_fp32"]["rel_l2"] for r in result["results"]}
    assert "loop_b1" not in result["results"][0] and "reference" not in result
    assert errs["fp32"] == 0.0
    assert 1e-5 < errs["fp16"] < 5e-3, errs  # fp16 weights and activations: ~4e-4 measured
    assert "| pytorch | fp16 |" in (tmp_path / "small_cpu_parity.md").read_text()


def test_dh_bench_user_errors_are_one_line_exit_2(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        res = CliRunner().invoke(app, ["--backends", "pytorch,tensorrt", "--out", str(tmp_path)])
        assert res.exit_code == 2
        assert res.stderr.strip() == ("dh-bench: error: TensorRT is not installed (pip install tensorrt); benchmark "
                                      "--backends pytorch,onnxruntime instead")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = CliRunner().invoke(app, ["--device", "cuda", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert res.stderr.strip() == "dh-bench: error: device 'cuda' asked for, but torch sees no CUDA GPU; use --device cpu"
    res = CliRunner().invoke(app, ["--backends", "torch", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "Invalid value for --backends: torch given; use a comma list" in res.output
    assert list(tmp_path.iterdir()) == []


def test_overhead_is_measured_in_the_same_loop(monkeypatch):
    """A denoiser that sleeps 20 ms per call: the interleaved split puts ~all of the frame inside it."""
    import time as _time

    from dheads.benchmarks.bench import BenchConfig, bench_overhead

    den = TorchDenoiser(random_unet(SMALL, seed=0))
    inner = den.model

    class Slow(torch.nn.Module):
        def forward(self, *a, **k):
            _time.sleep(0.02)
            return inner(*a, **k)

    calls = []
    den.model = den.forward = Slow()  # forward is what a call runs
    den.model.register_forward_pre_hook(lambda *_: calls.append(1))
    row = bench_overhead(den, BenchConfig(steps=3, frames=1))
    assert len(calls) == 2 * 3  # the warm-up frame and the timed one, 3 calls each
    assert row["inside_unet_ms"] >= 3 * 20 and row["total_ms"] >= row["inside_unet_ms"]
    assert 0 <= row["outside_unet_fraction"] < 0.25
    assert row["outside_unet_fraction"] == pytest.approx(1 - row["inside_unet_ms"] / row["total_ms"])


def test_dh_bench_by_default_writes_nothing_prints_a_full_width_table_and_no_info(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--model", "small", "--device", "cpu", "--steps", "2", "--frames", "1", "--batch", "1", "--repeats", "1",
            "--no-reference", "--threads", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert list(tmp_path.iterdir()) == []  # no results/ folder, nothing overwritten
    rows = [line for line in res.stdout.splitlines() if line.startswith("| pytorch | fp32 |")]
    assert len(rows) == 1 and len(rows[0]) > 80 and rows[0].endswith("| torch 1, ORT 1 |"), res.stdout
    assert "INFO" not in res.stderr


def test_dh_bench_demo_bundle_on_onnxruntime(tmp_path):
    args = ["--model", "demo", "--backends", "onnxruntime", "--device", "cpu", "--steps", "2", "--frames", "1",
            "--batch", "1", "--repeats", "1", "--out", str(tmp_path), "--name", "d"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "d.json").read_text())["results"][0]
    assert row["backend"] == "onnxruntime" and row["overhead_b1"]["frames"] == 1
    assert 0 <= row["outside_unet_fraction"] < 1
    res = CliRunner().invoke(app, ["--model", "demo", "--backends", "pytorch", "--device", "cpu"])
    assert res.exit_code == 2
    assert res.stderr.strip() == ("dh-bench: error: --model demo is the packaged fp32 ONNX bundle: use --backends "
                                  "onnxruntime --precisions fp32, with timing")


def test_compare_engines_parses_backend_precision_pairs():
    from dheads.benchmarks.cpu_engines import parse_engines

    assert parse_engines("onnxruntime:fp32, openvino:bf16") == (("onnxruntime", "fp32"), ("openvino", "bf16"))
    for bad in ("openvino:fp16", "tensorrt:fp32", "onnxruntime", ""):
        with pytest.raises(ValueError):
            parse_engines(bad)


def test_dh_bench_compare_renders_interleaved_and_records_machine_and_load(tmp_path):
    """Two CPU engines on the demo, 2 frames each after the first: the JSON's shape, not its speed. An engine that
    cannot open here (int8: a copy of the demo without its unet_int8.onnx) is listed as skipped with its one-line
    reason."""
    import shutil

    from dheads.engine.pipeline import default_engine_path

    bundle = tmp_path / "demo"
    bundle.mkdir()
    for name in ("manifest.json", "unet.onnx"):
        shutil.copy(default_engine_path() / name, bundle / name)
    args = ["--compare", "onnxruntime:fp32,onnxruntime:int8,onnxruntime:fp32", "--engine", str(bundle), "--frames", "2",
            "--repeats", "2", "--threads", "1", "--out", str(tmp_path), "--name", "c"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "c.json").read_text())
    assert {"load1", "load5", "load15", "runnable_others"} <= set(result["load_before"]) == set(result["load_after"])
    assert result["machine"]["usable_cores"] >= 1 and result["threads"]["engine"] == 1
    rows = result["results"]
    assert [r["engine"] for r in rows] == ["onnxruntime fp32", "onnxruntime fp32"]
    assert "unet_int8.onnx" in result["skipped"]["onnxruntime int8"]
    for r in rows:
        assert r["frame"]["n"] == 2 and r["call"]["n"] == 2 and r["first_frame_ms"] > 0
        assert r["fps"] == pytest.approx(1000 / r["frame"]["median_ms"])
        assert r["real_time_factor"] == pytest.approx(r["frame"]["median_ms"] / 1000 * 25)
        assert r["time_to_first_frame_s"] > r["open_s"] and r["vs_onnxruntime_fp32"]["rel_l2"] == 0.0
        assert r["warm_first_frame_s"] == pytest.approx(result["warm_prepare_s"] + r["first_frame_ms"] / 1000)
    assert (tmp_path / "c.md").read_text().count("| onnxruntime fp32 |") == 2
