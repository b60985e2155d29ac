"""open_denoiser on every artifact kind, the ONNX Runtime backend, and the TensorRT guards that run
without TensorRT (plan compatibility, typing per version, fp32 pins). TensorRT itself: test_export.py.

Agreement with TorchDenoiser is checked at the ORT_FP32 tolerance (see test_export.py): fp32 ONNX Runtime
and fp32 PyTorch differ only in summation order.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil

import onnx
import pytest
import torch

from dheads.engine.backends import BackendError, EngineInfo, open_denoiser
from dheads.engine.backends.base import example_inputs
from dheads.engine.backends.onnxruntime_ import OrtDenoiser
from dheads.engine.backends.pytorch import TorchDenoiser
from dheads.engine.backends.tensorrt_ import check_plan_compat
from dheads.engine.bundle import UNET_ONNX, UNET_ONNX_FP16, TensorRTRecord, read_manifest, write_manifest
from dheads.engine.config import LRW, SMALL
from dheads.export.to_tensorrt import TensorRTBuildError, choose_typing, fp32_tensor_names, onnx_for, version_tuple
from dheads.export.verify import ORT_FP32, measure

from _small_bundle import small_export, small_model

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    return small_export(request.config, tmp_path_factory)


@pytest.fixture(scope="module")
def bundle(exported):
    return exported[1].out_dir


@pytest.fixture(scope="module")
def reference():
    return TorchDenoiser(small_model())


def inputs(batch: int = 2, seed: int = 7):
    return list(example_inputs(SMALL, batch, generator=torch.Generator().manual_seed(seed)).values())


def assert_agrees(den, reference, batch: int = 2) -> None:
    args = inputs(batch)
    out, ref = den(*args), reference(*args)
    assert out.shape == ref.shape == (batch, 6, 32, 32) and out.dtype == torch.float32
    stats = measure(out, ref)
    assert stats.passes(ORT_FP32), stats


# --- open_denoiser: one call per artifact kind --------------------------------------------------------


def test_bundle_directory_opens_with_onnxruntime(bundle, reference):
    den, info = open_denoiser(bundle)
    assert den.name == "onnxruntime" and not den.graph_safe and isinstance(info, EngineInfo)
    assert info.backend == "onnxruntime" and info.precision == "fp32" and info.model == SMALL
    manifest = read_manifest(bundle)
    assert (info.audio, info.diffusion, info.manifest) == (manifest.audio, manifest.diffusion, manifest)
    assert "onnxruntime" in info.description and "small.pt" in info.description
    assert_agrees(den, reference)
    assert_agrees(den, reference, batch=3)


def test_onnx_file_opens_with_its_manifest(bundle, reference):
    den, info = open_denoiser(bundle / UNET_ONNX, intra_op_threads=1)
    assert den.name == "onnxruntime" and info.path == bundle / UNET_ONNX
    assert_agrees(den, reference)


def test_fp16_onnx_is_picked_for_fp16(bundle, reference):
    den, info = open_denoiser(bundle, backend="onnxruntime", precision="fp16")
    assert info.precision == "fp16" and den.path.name == UNET_ONNX_FP16
    stats = measure(den(*inputs()), reference(*inputs()))
    assert stats.rel < 5e-3, stats


def test_auto_device_runs_a_bundle_on_cpu_when_onnxruntime_has_no_cuda(bundle, reference, monkeypatch):
    """On a GPU machine with plain onnxruntime (no CUDA provider), device='auto' must not fail: it uses the CPU.
    An explicit device='cuda' still says what to install. (Here the GPU is pretended.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # open_denoiser resolves cuda to cuda:N
    den, info = open_denoiser(bundle, device="auto")
    assert den.name == "onnxruntime" and den.device == torch.device("cpu")
    assert_agrees(den, reference)
    with pytest.raises(BackendError, match="onnxruntime has no CUDA execution provider here; pip install "
                                          "onnxruntime-gpu"):
        open_denoiser(bundle, device="cuda")


def test_checkpoint_opens_with_pytorch(exported, reference):
    ckpt = exported[0]
    den, info = open_denoiser(ckpt)
    assert isinstance(den, TorchDenoiser) and info.backend == "pytorch" and info.manifest is None
    assert info.model == SMALL and info.audio.encoder == "sda"
    assert torch.equal(den(*inputs()), reference(*inputs()))


def test_checkpoint_opens_in_fp16_channels_last(exported, reference):
    den, info = open_denoiser(exported[0], precision="fp16")
    assert info.precision == "fp16" and den.dtype == torch.float16 and den.channels_last
    assert next(den.model.parameters()).dtype == torch.float16
    stats = measure(den(*inputs()), reference(*inputs()))
    assert 0 < stats.rel < 5e-3, stats  # fp16 weights and activations: ~4e-4


def test_checkpoint_opens_with_torch_compile(exported):
    """Construction is lazy (torch.compile compiles on the first call): the registry picks the class."""
    from dheads.engine.backends.pytorch import CompiledTorchDenoiser

    den, info = open_denoiser(exported[0], backend="torch-compile")
    assert isinstance(den, CompiledTorchDenoiser) and den.name == info.backend == "torch-compile"
    assert den.channels_last and den.dtype == torch.float32
    assert info.description.startswith("torch-compile fp32 on cpu: small.pt")


@pytest.mark.slow
def test_torch_compile_matches_eager_on_cpu(reference):
    """Inductor's fused CPU kernels against the eager module: fp32 rounding only (ORT_FP32 tolerance,
    rtol 1e-4 / atol 1e-5), at batch 1 and 2 (one compilation each)."""
    from dheads.engine.backends import torch_denoiser

    den = torch_denoiser("torch-compile", small_model())
    for batch in (1, 2):
        assert_agrees(den, reference, batch)


def test_precision_names_become_dtypes_in_one_place():
    from dheads.engine.backends import PRECISIONS, precision_dtype

    assert PRECISIONS == ("fp32", "fp16", "bf16", "int8")
    assert [precision_dtype(p) for p in PRECISIONS[:2]] == [torch.float32, torch.float16]
    with pytest.raises(BackendError, match=r"^precision must be one of fp32, fp16, bf16, int8, got 'fp8'$"):
        precision_dtype("fp8")
    with pytest.raises(BackendError, match=r"^precision bf16 runs on an exported bundle with --backend openvino; "
                                           r"PyTorch runs fp32 or fp16$"):
        precision_dtype("bf16")


@pytest.mark.parametrize("fields, message", [
    ({"precision": "fp8"}, "precision must be one of fp32, fp16, bf16, int8, got 'fp8'"),
    ({"device": "gpu"}, "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ({"device": "cuda:x"}, "device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    ({"threads": 0}, "threads must be None (auto) or a positive count, got 0"),
    ({"threads": True}, "threads must be None (auto) or a positive count, got True"),
])
def test_runtime_config_refuses_bad_fields_in_one_line(fields, message):
    from dheads.engine.config import RuntimeConfig

    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        RuntimeConfig(**fields)


def test_directory_holding_one_checkpoint_opens_it(exported, tmp_path):
    shutil.copy(exported[0], tmp_path / "model.pt")
    den, info = open_denoiser(tmp_path)
    assert den.name == "pytorch" and info.path == tmp_path / "model.pt"


def test_motion_frames_may_come_as_frames(bundle, reference):
    den, _ = open_denoiser(bundle)
    x, t, ident, motion, audio = inputs()
    five_d = motion.reshape(2, 2, 3, 32, 32)
    assert torch.equal(den(x, t, ident, five_d, audio), den(x, t, ident, motion, audio))


# --- open_denoiser: refusals, one line each -----------------------------------------------------------


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_missing_path(tmp_path):
    with pytest.raises(BackendError) as e:
        open_denoiser(tmp_path / "nothing.plan")
    assert "no such file" in one_line(e)


@pytest.mark.parametrize("name, content", [("notes.txt", b"hello\n"), ("weights.bin", bytes(range(256)) * 8)])
def test_unknown_file_type(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(BackendError) as e:
        open_denoiser(tmp_path / name)
    assert name in one_line(e) and ".plan" in one_line(e)


def test_onnx_without_manifest(bundle, tmp_path):
    shutil.copy(bundle / UNET_ONNX, tmp_path / UNET_ONNX)
    with pytest.raises(BackendError) as e:
        open_denoiser(tmp_path / UNET_ONNX)
    assert "manifest" in one_line(e)


def test_directory_without_manifest_or_checkpoint(tmp_path):
    with pytest.raises(BackendError) as e:
        open_denoiser(tmp_path)
    assert "not an export bundle" in one_line(e)


@pytest.mark.parametrize("backend", ["pytorch", "torch-compile"])
def test_bundle_cannot_run_with_pytorch(bundle, backend):
    with pytest.raises(BackendError) as e:
        open_denoiser(bundle, backend=backend)
    assert "checkpoint" in one_line(e) and "small.pt" in one_line(e)


def test_checkpoint_cannot_run_with_onnxruntime(exported):
    with pytest.raises(BackendError) as e:
        open_denoiser(exported[0], backend="onnxruntime")
    assert "dh-export" in one_line(e)


def test_onnx_cannot_run_with_tensorrt(bundle):
    with pytest.raises(BackendError) as e:
        open_denoiser(bundle / UNET_ONNX, backend="tensorrt", device="cuda")
    assert "plan" in one_line(e)


def test_unknown_backend_and_precision(bundle):
    with pytest.raises(BackendError, match="unknown backend"):
        open_denoiser(bundle, backend="tvm")
    with pytest.raises(BackendError, match="precision"):
        open_denoiser(bundle, precision="int8")


def test_model_config_mismatch_is_refused(bundle, exported):
    assert open_denoiser(bundle, model_config=SMALL)[1].model == SMALL
    for path in (bundle, exported[0]):
        with pytest.raises(BackendError) as e:
            open_denoiser(path, model_config=dataclasses.replace(SMALL, grayscale_motion=True))
        assert "grayscale_motion=False (asked True)" in one_line(e)
    with pytest.raises(BackendError):
        open_denoiser(bundle, model_config=LRW)


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here: the missing-TensorRT error cannot occur")
def test_plan_without_tensorrt_installed(bundle, tmp_path):
    fake = tmp_path / "bundle"
    shutil.copytree(bundle, fake)
    (fake / "unet.plan").write_bytes(b"not really a plan")
    manifest = read_manifest(fake)
    record = TensorRTRecord(version="10.8.0.43", gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0),
                            plan_sha256="0" * 64, typing="weak", onnx_file=UNET_ONNX, precision="fp16")
    write_manifest(fake, dataclasses.replace(manifest, tensorrt=record))
    with pytest.raises(BackendError) as e:
        open_denoiser(fake / "unet.plan", device="cuda")
    assert "TensorRT is not installed" in one_line(e) and "onnxruntime" in one_line(e)
    den, info = open_denoiser(fake, device="cpu")  # the same bundle still runs on ONNX Runtime
    assert info.backend == "onnxruntime"


def test_ort_denoiser_rejects_a_foreign_onnx(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "id.onnx"))
    with pytest.raises(BackendError, match="not the UNet"):
        OrtDenoiser(tmp_path / "id.onnx", SMALL)


# --- TensorRT guards that need no TensorRT ------------------------------------------------------------

RECORD = TensorRTRecord(version="10.8.0.43", gpu_name="NVIDIA A100-SXM4-80GB", compute_capability=(8, 0),
                        plan_sha256="0" * 64, typing="weak", onnx_file=UNET_ONNX, precision="fp16")


def test_plan_compat_accepts_the_same_gpu_and_version():
    check_plan_compat(RECORD, trt_version="10.8.0.43", gpu_name="NVIDIA A100-SXM4-80GB", compute_capability=(8, 0))


@pytest.mark.parametrize("kw, fragment", [
    ({"trt_version": "10.9.0.34"}, "built with TensorRT 10.8.0.43 but 10.9.0.34"),
    ({"compute_capability": (9, 0), "gpu_name": "NVIDIA H100 80GB HBM3"}, "sm_80"),
    ({"gpu_name": "NVIDIA A100-SXM4-40GB"}, "built on NVIDIA A100-SXM4-80GB"),
])
def test_plan_compat_refuses_another_gpu_or_tensorrt(kw, fragment):
    args = {"trt_version": "10.8.0.43", "gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": (8, 0), **kw}
    with pytest.raises(BackendError) as e:
        check_plan_compat(RECORD, where="unet.plan", **args)
    assert fragment in one_line(e) and "dh-export" in one_line(e)


def test_plan_compat_can_allow_a_sibling_gpu():
    check_plan_compat(RECORD, trt_version="10.8.0.43", gpu_name="NVIDIA A100-SXM4-40GB", compute_capability=(8, 0),
                      allow_other_gpu_name=True)
    with pytest.raises(BackendError, match="no TensorRT build"):
        check_plan_compat(None, trt_version="10.8", gpu_name="x", compute_capability=(8, 0))


@pytest.mark.parametrize("version, typing", [("10.0.1.6", "weak"), ("10.11.0.33", "weak"),
                                             ("10.12.0.36", "strong"), ("10.15.1.29", "strong"),
                                             ("11.0.0.1", "strong")])
def test_network_typing_per_tensorrt_version(version, typing):
    assert choose_typing(version_tuple(version)) == typing
    assert onnx_for("fp16", typing) == (UNET_ONNX_FP16 if typing == "strong" else UNET_ONNX)
    assert onnx_for("fp32", typing) == UNET_ONNX


def test_weak_typing_is_refused_on_tensorrt_11():
    assert choose_typing((10, 13, 0), "weak") == "weak"
    with pytest.raises(TensorRTBuildError, match="removed weak typing"):
        choose_typing((11, 1, 0), "weak")


def test_weak_fp16_build_pins_norms_softmax_and_time_embedding(bundle):
    graph = onnx.load(str(bundle / UNET_ONNX), load_external_data=False).graph
    names = fp32_tensor_names(bundle / UNET_ONNX)
    by_op = {}
    for node in graph.node:
        by_op.setdefault(node.op_type, []).append(set(node.output) <= names)
    for op in ("InstanceNormalization", "Softmax", "Cos", "Sin"):
        assert by_op[op] and all(by_op[op]), op
    assert not any(by_op["Conv"])  # convolutions stay free to run in fp16
