"""The OpenVINO backend on the shipped demo bundle: parity with ONNX Runtime fp32, bf16 within its looser bound,
the compiled-model cache key, the thread policy, and the one-line refusals.

Tolerances, on one UNet call of the demo (model_out, all 6 channels), inputs in the ranges real frames have:
* f32: OpenVINO and ONNX Runtime differ only in summation order and fused kernels: max abs <= 1e-4
  (measured 3e-6 on 2026-12-07, OpenVINO 2026.4.1).
* bf16: 8 mantissa bits in convolutions and matmuls (accumulation and norms stay f32): relative L2 <= 0.03
  and max abs <= 0.15 (measured max abs 0.02-0.03, relative L2 ~0.01).
"""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'diffused-heads[openvino]')")

from dheads.engine.backends import BackendError, open_denoiser  # noqa: E402
from dheads.engine.backends import openvino_ as ovb  # noqa: E402
from dheads.engine.backends.base import example_inputs  # noqa: E402
from dheads.engine.bundle import read_manifest  # noqa: E402
from dheads.engine.pipeline import default_engine_path  # noqa: E402

DEMO = default_engine_path()
F32_MAX_ABS = 1e-4
BF16_REL_L2, BF16_MAX_ABS = 0.03, 0.15


@pytest.fixture(scope="module")
def demo_inputs():
    cfg = read_manifest(DEMO).model
    x = example_inputs(cfg, 2, generator=torch.Generator().manual_seed(3))
    x["x_t"] = torch.randn(x["x_t"].shape, generator=torch.Generator().manual_seed(4))  # x_t is noise-like
    return list(x.values())


@pytest.fixture(scope="module")
def ort_out(demo_inputs):
    den, _ = open_denoiser(DEMO, backend="onnxruntime", device="cpu", intra_op_threads=1)
    return den(*demo_inputs)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_f32_matches_onnxruntime(demo_inputs, ort_out):
    den, info = open_denoiser(DEMO, backend="openvino", device="cpu", precision="fp32", intra_op_threads=1)
    assert den.name == info.backend == "openvino" and info.precision == "fp32" and den.device == torch.device("cpu")
    assert den.settings["INFERENCE_PRECISION_HINT"] == "f32"  # the CPU plugin's default is bf16 where it can
    out = den(*demo_inputs)
    assert out.dtype == torch.float32 and out.shape == ort_out.shape == (2, 6, 64, 64)
    assert (out - ort_out).abs().max().item() <= F32_MAX_ABS
    one = den(*[t[:1] for t in demo_inputs])  # batch 1 is a model compiled of its own
    assert (one - ort_out[:1]).abs().max().item() <= F32_MAX_ABS


def test_bf16_within_its_bound_where_the_cpu_has_it(demo_inputs, ort_out):
    cpu = ovb.CpuInfo.of(ovb.core())
    if "BF16" not in cpu.capabilities:
        pytest.skip(f"{cpu.name}: OpenVINO reports no BF16 ({', '.join(cpu.capabilities)})")
    den, info = open_denoiser(DEMO, backend="openvino", device="cpu", precision="bf16", intra_op_threads=1)
    out = den(*demo_inputs)
    assert info.precision == "bf16" and out.dtype == torch.float32
    err = rel_l2(out, ort_out)
    assert 0 < err <= BF16_REL_L2, err  # 0 would mean bf16 was not used at all
    assert (out - ort_out).abs().max().item() <= BF16_MAX_ABS


def test_cache_key_names_model_version_cpu_and_precision():
    cpu = ovb.CpuInfo("AMD EPYC", ("FP32", "BF16", "INT8"))
    base = ovb.cache_key("a" * 64, "2026.4.1", cpu, "bf16")
    assert base == ovb.cache_key("a" * 64, "2026.4.1", ovb.CpuInfo("AMD EPYC", ("INT8", "BF16", "FP32")), "bf16")
    others = {ovb.cache_key("b" * 64, "2026.4.1", cpu, "bf16"), ovb.cache_key("a" * 64, "2026.5.0", cpu, "bf16"),
              ovb.cache_key("a" * 64, "2026.4.1", dataclasses.replace(cpu, name="Intel Xeon"), "bf16"),
              ovb.cache_key("a" * 64, "2026.4.1", dataclasses.replace(cpu, capabilities=("FP32",)), "bf16"),
              ovb.cache_key("a" * 64, "2026.4.1", cpu, "fp32")}
    assert len(others) == 5 and base not in others


def test_compiled_model_is_cached_under_its_key(tmp_path, monkeypatch):
    monkeypatch.setenv("DHEADS_CACHE", str(tmp_path))
    den, _ = open_denoiser(DEMO, backend="openvino", device="cpu", intra_op_threads=1)
    from dheads.engine.bundle import sha256_file

    ov = ovb.import_openvino()
    assert den.key == ovb.cache_key(sha256_file(DEMO / "unet.onnx"), ov.__version__, den.cpu, "fp32")
    assert den.cache_dir == tmp_path / "openvino" / den.key
    note = (den.cache_dir / "key.json").read_text()
    assert '"precision": "fp32"' in note and den.key in note
    blobs = sorted(p.name for p in den.cache_dir.glob("*.blob"))
    assert blobs, "OpenVINO wrote no compiled blob into the key's folder"
    again, _ = open_denoiser(DEMO, backend="openvino", device="cpu", intra_op_threads=1)
    assert again.cache_dir == den.cache_dir and sorted(p.name for p in den.cache_dir.glob("*.blob")) == blobs


def test_one_core_per_process(tmp_path, monkeypatch):
    """Every denoiser and the capability check share the process's one ov.Core: a second Core made and queried
    beside the first corrupted the heap (a later, unrelated malloc died of SIGSEGV; openvino_.py's docstring)."""
    monkeypatch.setenv("DHEADS_CACHE", str(tmp_path))
    a, _ = open_denoiser(DEMO, backend="openvino", device="cpu", intra_op_threads=1)
    b, _ = open_denoiser(DEMO, backend="openvino", device="cpu", precision="bf16" if "BF16" in a.cpu.capabilities
                         else "fp32", intra_op_threads=1)
    assert a.core is b.core is ovb.core()


def test_a_batch_gives_what_each_sample_gives_alone(demo_inputs):
    """Each row as alone, bit for bit (dh-serve batches streams; render_batch promises each video as alone)."""
    den, _ = open_denoiser(DEMO, backend="openvino", device="cpu", precision="int8" if (DEMO / "unet_int8.onnx").is_file()
                           else "fp32", intra_op_threads=1)
    both = den(*demo_inputs)
    assert all(torch.equal(both[i:i + 1], den(*[t[i:i + 1] for t in demo_inputs])) for i in range(2))


def test_calls_from_several_threads_give_what_each_gives_alone(demo_inputs):
    """dh-serve calls one denoiser from its threads: OpenVINO's infer request is not thread-safe, so calls take
    turns (without that, outputs of concurrent calls mixed and served videos differed run to run)."""
    import threading

    den, _ = open_denoiser(DEMO, backend="openvino", device="cpu", intra_op_threads=1)
    inputs = [[t[i:i + 1] for t in demo_inputs] for i in range(2)]
    alone = [den(*x) for x in inputs]
    got: dict[tuple[int, int], torch.Tensor] = {}

    def work(k: int) -> None:
        for r in range(4):
            got[k, r] = den(*inputs[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got[k, r], alone[k]) for k in range(2) for r in range(4))


def test_thread_policy_reaches_openvino():
    den, _ = open_denoiser(DEMO, backend="openvino", device="cpu", intra_op_threads=1)
    compiled = den._request(1).get_compiled_model()
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    assert str(compiled.get_property("NUM_STREAMS")) == "1"


def one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bf16_unavailable_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(ovb.CpuInfo, "of", classmethod(lambda cls, core: cls("Old CPU", ("FP32", "INT8"))))
    with pytest.raises(BackendError) as e:
        open_denoiser(DEMO, backend="openvino", device="cpu", precision="bf16")
    assert one_line(e) == ("precision bf16 is unavailable on this CPU (Old CPU: OpenVINO reports FP32, INT8); "
                           "use --precision fp32")


@pytest.mark.parametrize("backend, precision, message", [
    ("openvino", "fp16", "the openvino backend runs fp32, bf16, int8, not fp16"),
    ("onnxruntime", "bf16", "the onnxruntime backend runs fp32, fp16, int8, not bf16; use --backend openvino"),
    ("pytorch", "int8", "the pytorch backend runs fp32, fp16, not int8"),
])
def test_precision_a_backend_cannot_run(backend, precision, message):
    with pytest.raises(BackendError) as e:
        open_denoiser(DEMO, backend=backend, device="cpu", precision=precision)
    assert one_line(e) == message


def test_int8_needs_the_int8_file(tmp_path):
    import shutil

    for name in ("manifest.json", "unet.onnx"):
        shutil.copy(DEMO / name, tmp_path / name)
    with pytest.raises(BackendError) as e:
        open_denoiser(tmp_path, backend="openvino", device="cpu", precision="int8")
    assert one_line(e).startswith(f"{tmp_path}: the bundle has no unet_int8.onnx; make one with `dh-export")


def test_openvino_runs_on_the_cpu_only():
    with pytest.raises(BackendError) as e:
        open_denoiser(DEMO, backend="openvino", device="cuda:0" if torch.cuda.is_available() else "meta",
                      precision="fp32")
    assert "openvino backend runs on the CPU" in one_line(e)


def test_missing_openvino_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(BackendError) as e:
        open_denoiser(DEMO, backend="openvino", device="cpu")
    assert one_line(e) == ("openvino is not installed; pip install 'diffused-heads[openvino]' "
                           "(or use --backend onnxruntime)")
