"""The backend seam: each backend says which artifacts it ``accepts`` and ``open``s them with one ``Runtime``
(the device resolved once, at the edge); every backend returns float32; specs live in their own module, so the
TensorRT backend does not import the bundle module to know its tensors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _small_bundle import small_export
from dheads.engine.backends import Artifact, BackendError, Runtime, exported_backend, open_denoiser
from dheads.engine.backends import pytorch as torch_backend
from dheads.engine.backends.base import example_inputs, resolve_device
from dheads.engine.bundle import read_manifest
from dheads.engine.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    ckpt, result = small_export(request.config, tmp_path_factory)
    return ckpt, result.out_dir


def test_which_backend_accepts_which_artifact(exported, tmp_path):
    ckpt, bundle = exported
    man = read_manifest(bundle)
    kinds = {"bundle": Artifact(bundle, "bundle", bundle, man), "onnx": Artifact(bundle / "unet.onnx", "onnx", bundle, man),
             "plan": Artifact(bundle / "unet.plan", "plan", bundle, man),
             "checkpoint": Artifact(Path(ckpt), "checkpoint", checkpoint=load_checkpoint(ckpt))}
    got = {name: sorted(k for k, a in kinds.items() if exported_backend(name).accepts(a))
           for name in ("onnxruntime", "openvino", "tensorrt")}
    got["pytorch"] = sorted(k for k, a in kinds.items() if torch_backend.accepts(a))
    assert got == {"onnxruntime": ["bundle", "onnx"], "openvino": ["bundle", "onnx"], "tensorrt": ["bundle", "plan"],
                   "pytorch": ["checkpoint"]}
    assert exported_backend("tensorrt").refusal(kinds["onnx"]) == (
        f"{bundle / 'unet.onnx'}: the tensorrt backend runs a plan; build one with `dh-export` on a GPU machine with "
        "TensorRT, or use backend='onnxruntime'")
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "unet.plan").write_bytes(b"a plan")
    with pytest.raises(BackendError) as e:
        open_denoiser(copy / "unet.plan", backend="onnxruntime")
    assert str(e.value) == (f"{copy / 'unet.plan'}: a TensorRT plan runs only with backend='tensorrt'; pass the "
                            "bundle directory or its .onnx for onnxruntime")
    with pytest.raises(BackendError, match=r"^'pytorch' does not run an exported engine"):
        exported_backend("pytorch")


def test_every_backend_returns_float32(exported):
    ckpt, bundle = exported
    feeds = example_inputs(load_checkpoint(ckpt).model, 2, generator=torch.Generator().manual_seed(0))
    args = [feeds[k] for k in ("x_t", "timesteps", "identity", "motion_frames", "audio_emb")]
    opened = [open_denoiser(bundle, backend="onnxruntime", precision=p) for p in ("fp32", "fp16")]
    opened += [open_denoiser(ckpt, backend="pytorch", precision=p) for p in ("fp32", "fp16")]
    ref = opened[2][0](*args)
    for den, info in opened:
        out = den(*args)
        assert out.dtype == torch.float32, (info.description, out.dtype)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-2 if info.precision == "fp16" else 1e-4)


def test_the_device_is_resolved_once_at_the_edge(exported, monkeypatch):
    _, bundle = exported
    assert resolve_device("cpu") == torch.device("cpu")
    den, _ = open_denoiser(bundle, backend="onnxruntime", device="cpu")
    assert den.device == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("cuda") == torch.device("cuda")  # nothing to resolve it against
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    want = torch.device("cuda", torch.cuda.current_device())
    assert resolve_device("cuda") == want and resolve_device("cuda:1") == torch.device("cuda", 1)
    rt = Runtime(resolve_device("cuda"))
    assert rt.device.index is not None


def test_bundle_and_specs_sit_below_the_backends():
    """No import cycle between the bundle reader and the backends: the I/O specs live in ``engine/specs.py``,
    the bundle reader needs neither the backends package nor torch, and the backends import it at module
    level (no function-level import hides a cycle)."""
    code = ("import sys, dheads.engine.bundle, dheads.engine.specs; "
            "print(sorted(m for m in ('dheads.engine.backends', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    import ast
    import inspect

    from dheads.engine.backends import artifact, onnxruntime_

    for module in (artifact, onnxruntime_):
        nested = [n for n in ast.walk(ast.parse(inspect.getsource(module))) if isinstance(n, ast.FunctionDef)
                  for i in ast.walk(n) if isinstance(i, ast.ImportFrom) and i.module == "bundle"]
        assert nested == [], module.__name__
