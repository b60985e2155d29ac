"""dh-export on the small config: ONNX parity, manifest round-trip, clean graphs, TorchScript input,
one-line errors that leave nothing behind, and (where installed) TensorRT plans.

Tolerance of the fp32 checks (``ORT_FP32``: max abs <= 1e-5 + 1e-4 * max|torch|): fp32 ONNX Runtime and
fp32 PyTorch differ only by summation order; measured ~2e-7 relative here and ~1e-6 on the full CREMA
UNet, so 1e-4 has two orders of headroom yet fails any real export error (>= 1e-3).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch
from typer.testing import CliRunner

from dheads.engine.backends.base import BatchProfile, example_inputs
from dheads.engine.bundle import (UNET_ONNX, UNET_ONNX_FP16, Manifest, read_manifest, sha256_file,
                                  write_manifest)
from dheads.engine.config import CREMA, SMALL, AudioConfig, SamplerConfig
from dheads.engine.model import DiffusedHeadsUNet
from dheads.engine.plan import default_sampler
from dheads.export import cli, pipeline
from dheads.export.to_onnx import FORBIDDEN_OPS, all_nodes, check_unet_graph
from dheads.export.verify import ORT_FP32, ParityError, ParityReport, ParityStats, verify_onnx

from _small_bundle import PROFILE, small_export, small_model


@pytest.fixture(scope="module")
def model() -> DiffusedHeadsUNet:
    return small_model()


@pytest.fixture(scope="module")
def ckpt(request, tmp_path_factory) -> Path:
    return small_export(request.config, tmp_path_factory)[0]


@pytest.fixture(scope="module")
def export(request, tmp_path_factory):
    """One fp16 export (writes unet.onnx and unet_fp16.onnx), batch profile 1..3."""
    return small_export(request.config, tmp_path_factory)[1]


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def run_cli(*args: str):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def error_lines(result) -> list[str]:
    text = result.stderr if hasattr(result, "stderr") else result.output
    return [line for line in text.splitlines() if line.strip()]


# --- parity -------------------------------------------------------------------------------------------


def test_ort_parity_every_output_within_tolerance(export):
    reports = {r.engine: r for r in export.reports}
    fp32 = reports[f"onnxruntime:{UNET_ONNX}"]
    fp16 = reports[f"onnxruntime:{UNET_ONNX_FP16}"]
    for report in (fp32, fp16):
        assert report.passed, report.summary()
        assert set(report.stats) == {"model_out[eps]", "model_out[v]"}
        assert report.batches == (1, 3)  # both ends of the profile
    for stats in fp32.stats.values():
        assert stats.finite and stats.rel < 1e-5, stats  # measured ~2e-7
    for stats in fp16.stats.values():
        assert stats.rel < 5e-3, stats  # measured ~4e-4


def test_ort_parity_on_fresh_inputs_and_batches(export, model):
    report = verify_onnx(export.out_dir / UNET_ONNX, model, BatchProfile(2, 2, 2), seed=1234)
    assert report.passed and report.batches == (2,), report.summary()


def test_verification_catches_wrong_weights(export):
    report = verify_onnx(export.out_dir / UNET_ONNX, small_model(seed=1), PROFILE, seed=0)
    assert not report.passed
    with pytest.raises(ParityError, match="parity check failed"):
        report.raise_if_failed()


# --- manifest -----------------------------------------------------------------------------------------


def test_manifest_round_trips(export, tmp_path):
    manifest = read_manifest(export.out_dir)
    assert manifest == export.manifest
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path / "manifest.json") == manifest
    assert manifest.model == SMALL and manifest.profile == PROFILE and manifest.precision == "fp16"
    assert [s.name for s in manifest.inputs] == ["x_t", "timesteps", "identity", "motion_frames", "audio_emb"]
    assert manifest.audio == AudioConfig(encoder="sda", dim=SMALL.audio_dim)
    assert manifest.audio_encoder.kind == "record" and manifest.tensorrt is None
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest.tools)


def test_manifest_lists_every_file_with_its_hash(export, ckpt):
    manifest = export.manifest
    assert manifest.source_sha256 == sha256_file(ckpt) and manifest.source_kind == "dheads"
    names = {f.name for f in manifest.files}
    assert names == {UNET_ONNX, UNET_ONNX_FP16}
    assert set(entries(export.out_dir)) == names | {"manifest.json"}
    for f in manifest.files:
        assert sha256_file(export.out_dir / f.name) == f.sha256
        assert (export.out_dir / f.name).stat().st_size == f.bytes


# --- graphs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [UNET_ONNX, UNET_ONNX_FP16])
def test_graph_has_no_loop_if_sequence_ops(export, name):
    graph = onnx.load(str(export.out_dir / name))
    ops = {n.op_type for n in all_nodes(graph)}
    assert not ops & FORBIDDEN_OPS
    assert {"Conv", "InstanceNormalization", "Softmax", "Gemm"} <= ops
    check_unet_graph(export.out_dir / name, SMALL)
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input]
    assert all(d[0] == "batch" for d in dims) and dims[0][1:] == [3, 32, 32]


def test_node_walk_finds_ops_inside_subgraphs():
    from onnx import TensorProto, helper

    body = helper.make_graph([helper.make_node("Loop", ["n", "c"], ["o"])], "body", [], [
        helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    ops = [n.op_type for n in all_nodes(helper.make_model(graph))]
    assert ops.count("Loop") == 2 and "If" in ops


def test_fp16_graph_keeps_norms_softmax_and_time_embedding_in_fp32(export):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(export.out_dir / UNET_ONNX_FP16)))
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    fp32, fp16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    checked = 0
    for node in model.graph.node:
        if node.op_type in ("InstanceNormalization", "Softmax", "Cos", "Sin"):
            assert types[node.input[0]] == fp32 and types[node.output[0]] == fp32, node.name
            checked += 1
        if node.op_type == "Conv":
            assert types[node.input[1]] == fp16, node.name  # the weights really are fp16
    assert checked == 35 + 4 + 2  # every GroupNorm, attention softmax, cos and sin
    assert all(i.type.tensor_type.elem_type == fp32 for i in model.graph.input)


def test_torchscript_checkpoint_exports_the_same_graph(export, model, tmp_path):
    args = example_inputs(SMALL, 2, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example_kwarg_inputs={"x": args["x_t"], "timesteps": args["timesteps"],
                                 "x_cond": args["identity"], "motion_frames": args["motion_frames"],
                                 "audio_emb": args["audio_emb"]})
        torch.jit.save(traced, str(tmp_path / "small_script.pt"))
    result = run_cli(tmp_path / "small_script.pt", "-o", tmp_path / "ts", "--precision", "fp32",
                     "--batch", "1:2:3", "--no-tensorrt", "--seed", "0", "--image-size", "32")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "ts")
    assert manifest.source_kind == "torchscript" and manifest.model == SMALL  # image size is not in the weights
    eager = onnx.load(str(export.out_dir / UNET_ONNX))
    script = onnx.load(str(tmp_path / "ts" / UNET_ONNX))
    assert [n.op_type for n in eager.graph.node] == [n.op_type for n in script.graph.node]
    init_e = {i.name: onnx.numpy_helper.to_array(i) for i in eager.graph.initializer}
    init_s = {i.name: onnx.numpy_helper.to_array(i) for i in script.graph.initializer}
    assert init_e.keys() == init_s.keys()
    for name, value in init_e.items():
        assert value.dtype == init_s[name].dtype and (value == init_s[name]).all(), name


# --- bad inputs: one line, exit 2, nothing left behind -------------------------------------------------


def _assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("dh-export: error: "), lines
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_checkpoint_is_one_line(tmp_path):
    result = run_cli(tmp_path / "nope.pt", "-o", tmp_path / "out")
    _assert_one_line_error(result, 2, "nope.pt", "no such file")
    assert entries(tmp_path) == []


@pytest.mark.parametrize("content", [b"this is a text file, not a checkpoint\n", os.urandom(4096)],
                         ids=["text", "random-bytes"])
def test_not_a_checkpoint_is_one_line(tmp_path, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    result = run_cli(bad, "-o", tmp_path / "out")
    _assert_one_line_error(result, 2, "bad.pt")
    assert entries(tmp_path) == ["bad.pt"]


def test_output_under_a_regular_file_is_one_line(tmp_path, ckpt):
    (tmp_path / "file").write_text("x")
    result = run_cli(ckpt, "-o", tmp_path / "file" / "out")
    _assert_one_line_error(result, 2, "not a directory")
    assert entries(tmp_path) == ["file"]


def test_unwritable_output_directory_is_one_line(tmp_path, ckpt):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: chmod 0o500 does not stop writes (covered by the regular-file case)")
        result = run_cli(ckpt, "-o", locked / "out")
        _assert_one_line_error(result, 2, "not writable")
        assert entries(locked) == []
    finally:
        locked.chmod(0o700)


def test_existing_output_needs_overwrite(tmp_path, ckpt):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run_cli(ckpt, "-o", tmp_path / "out")
    _assert_one_line_error(result, 2, "already exists")
    result = run_cli(ckpt, "-o", tmp_path / "out", "--overwrite")
    _assert_one_line_error(result, 2, "not an export bundle")
    assert entries(tmp_path) == ["out"] and entries(tmp_path / "out") == ["keep.txt"]


@pytest.mark.parametrize("args, fragment", [(["--opset", "17"], "opset 17"), (["--precision", "bf16"], "bf16"),
                                            (["--calibrate", "x.mpg"], "--calibrate is only for --precision int8"),
                                            (["--frame-noise", "1.5"], "--frame-noise must be one of fresh, repeat "
                                                                       "or a correlation between 0 and 1 (e.g. 0.8), "
                                                                       "got '1.5'")])
def test_unsupported_options_are_one_line(tmp_path, ckpt, args, fragment):
    result = run_cli(ckpt, "-o", tmp_path / "out", *args)
    _assert_one_line_error(result, 2, fragment)
    assert entries(tmp_path) == []


def test_frame_noise_option_sets_the_bundles_default_and_nothing_else(tmp_path, ckpt, export):
    result = run_cli(ckpt, "-o", tmp_path / "b", "--precision", "fp32", "--batch", "1:2:3", "--no-tensorrt",
                     "--seed", "0", "--frame-noise", "0.8")
    assert result.exit_code == 0, result.output
    got, base = read_manifest(tmp_path / "b"), read_manifest(export.out_dir)
    assert got.diffusion.frame_noise == "0.8" and base.diffusion.frame_noise == "fresh"
    assert replace(got.diffusion, frame_noise="fresh") == base.diffusion and got.model == base.model
    assert default_sampler(got.diffusion).noise_corr == 0.8  # what dh-run samples with by default


def test_steps_and_spacing_options_set_the_bundles_default_sampling(tmp_path, ckpt, export):
    result = run_cli(ckpt, "-o", tmp_path / "b", "--precision", "fp32", "--batch", "1:2:3", "--no-tensorrt",
                     "--seed", "0", "--steps", "4", "--spacing", "trailing", "--frame-noise", "0.9")
    assert result.exit_code == 0, result.output
    got, base = read_manifest(tmp_path / "b"), read_manifest(export.out_dir)
    assert replace(got.diffusion, sampling_steps=base.diffusion.sampling_steps, spacing="uniform",
                   frame_noise="fresh") == base.diffusion
    assert default_sampler(got.diffusion) == SamplerConfig(base.diffusion.sampler, 4, spacing="trailing",
                                                           frame_noise="0.9")  # what dh-run samples with
    for args, line in ((("--steps", "0"), "--steps must be at least 1, got 0"),
                       (("--steps", "1001"), "--steps must be at most 1000 (the model's diffusion timesteps), got 1001"),
                       (("--spacing", "even"), "--spacing must be one of uniform, karras, trailing, got 'even'")):
        bad = run_cli(ckpt, "-o", tmp_path / "c", "--precision", "fp32", "--no-tensorrt", *args)
        assert bad.exit_code == 2 and error_lines(bad) == [f"dh-export: error: {line}"], bad.output
        assert not (tmp_path / "c").exists()


def test_failed_parity_exits_1_and_leaves_nothing(tmp_path, ckpt, monkeypatch):
    def fake_export(model, path, **kw):
        Path(path).write_bytes(b"half-written")

    def fake_verify(path, model, profile, **kw):
        bad = ParityStats(max_abs=1.0, rel=0.5, ref_max=2.0, mean_abs=0.1, finite=True)
        return ParityReport(engine="onnxruntime:unet.onnx", tolerance=ORT_FP32, stats={"model_out[eps]": bad},
                            batches=(1,), seed=0)

    monkeypatch.setattr(pipeline, "export_unet_onnx", fake_export)
    monkeypatch.setattr(pipeline, "verify_onnx", fake_verify)
    result = run_cli(ckpt, "-o", tmp_path / "out", "--no-tensorrt")
    _assert_one_line_error(result, 1, "parity check failed", "rel 0.5")
    assert entries(tmp_path) == []


def test_batch_option_parsing():
    assert cli.parse_batch("4") == BatchProfile(4, 4, 4)
    assert cli.parse_batch("1:2:8") == BatchProfile(1, 2, 8)
    for bad in ("0", "3:2:1", "a", "1:2"):
        with pytest.raises(Exception):
            cli.parse_batch(bad)


# --- audio encoder ------------------------------------------------------------------------------------


def test_sda_encoder_exports_as_a_verified_window_step(tmp_path):
    sda = pytest.importorskip("dheads.engine.encoders.sda")
    from dheads.export.audio import audio_record

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(sda.SDAEncoder().eval()), str(tmp_path / "audio_encoder.pt"))
    record = audio_record(tmp_path / "audio_encoder.pt", AudioConfig(), CREMA, tmp_path, seed=0)
    assert record.kind == "onnx" and record.file == "audio_encoder.onnx"
    assert [s.name for s in record.inputs] == ["window", "state"]
    for stats in record.options["parity"]["outputs"].values():
        assert stats["rel"] < 1e-5, stats
    ops = {n.op_type for n in all_nodes(onnx.load(str(tmp_path / "audio_encoder.onnx")))}
    assert "GRU" in ops and not ops & FORBIDDEN_OPS


def test_audio_encoder_for_a_whisper_model_is_refused(tmp_path):
    from dheads.export.audio import audio_record
    from dheads.export.errors import ExportError

    (tmp_path / "enc.pt").write_bytes(b"x")
    with pytest.raises(ExportError, match="whisper"):
        audio_record(tmp_path / "enc.pt", AudioConfig(encoder="whisper", dim=384), SMALL, tmp_path)
    assert audio_record(None, AudioConfig(encoder="whisper", dim=384), SMALL, tmp_path).kind == "record"


# --- TensorRT (skipped where `import tensorrt` fails) -------------------------------------------------


def needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but torch sees no CUDA GPU")


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_tensorrt_plan_builds_and_matches_pytorch(tmp_path, ckpt, precision):
    from dheads.export.verify import FP16, TRT_FP32

    needs_cuda()
    manifest = pipeline.export_bundle(ckpt, tmp_path / "b", precision=precision, profile=PROFILE, seed=0,
                                      tensorrt=True, timing_cache=tmp_path / "timing.cache")
    rec = manifest.tensorrt
    assert rec is not None and rec.precision == precision and (tmp_path / "b" / "unet.plan").is_file()
    assert (tmp_path / "b" / "timing.cache").is_file() and (tmp_path / "timing.cache").is_file()
    assert rec.plan_sha256 == sha256_file(tmp_path / "b" / "unet.plan")
    assert rec.gpu_name == torch.cuda.get_device_name() and rec.compute_capability == torch.cuda.get_device_capability()
    report = manifest.verification["tensorrt:unet.plan"]
    tol = FP16 if precision == "fp16" else TRT_FP32
    assert report["passed"] and report["tolerance"]["rtol"] == tol.rtol
    assert read_manifest(tmp_path / "b") == manifest


@pytest.mark.tensorrt
def test_tensorrt_plan_for_another_gpu_is_refused(tmp_path, ckpt):
    import dataclasses

    from dheads.engine.backends import BackendError, open_denoiser

    needs_cuda()
    manifest = pipeline.export_bundle(ckpt, tmp_path / "b", precision="fp16", profile=PROFILE, seed=0, tensorrt=True,
                                      timing_cache=tmp_path / "timing.cache")
    for change in ({"compute_capability": (1, 0)}, {"version": "0.0.1"}, {"gpu_name": "Some Other GPU"}):
        write_manifest(tmp_path / "b", dataclasses.replace(manifest, tensorrt=dataclasses.replace(manifest.tensorrt,
                                                                                                  **change)))
        with pytest.raises(BackendError, match="dh-export"):
            open_denoiser(tmp_path / "b" / "unet.plan", device="cuda")
