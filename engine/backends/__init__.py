"""Open any engine artifact as a Denoiser: a TensorRT plan, an export bundle, an ONNX file or a checkpoint.

``open_denoiser(path)`` picks the backend from what ``path`` is; ``backend=`` overrides it where the
artifact allows (a bundle runs with onnxruntime, openvino or tensorrt; a checkpoint only with pytorch).
Heavy libraries (onnxruntime, openvino, tensorrt) are imported only when their backend is opened.

Each backend module has ``accepts(artifact)`` and ``open(artifact, runtime)`` (``artifact.py``: what the path
is, recognised once here; how to run it, the device resolved once here). The registry below names them.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
import torch

from ..bundle import MANIFEST, BundleError, Manifest, read_manifest
from ..config import AudioConfig, DiffusionConfig, ModelConfig
from .artifact import Artifact, Runtime
from .base import (PRECISIONS, BackendError, BatchProfile, Denoiser, TensorSpec, check_precision, example_inputs,
                   precision_dtype, resolve_device, unet_io_spec)

__all__ = ["BACKENDS", "BACKEND_PRECISIONS", "PRECISIONS", "Artifact", "BackendError", "BatchProfile", "Denoiser",
           "EngineInfo", "Runtime", "TensorSpec", "example_inputs", "exported_backend", "open_denoiser", "pick_device",
           "precision_dtype", "torch_denoiser", "unet_io_spec"]

log = logging.getLogger(__name__)

# The registry: which backends run a checkpoint's module (name -> the Denoiser class, imported when used),
# and which run an exported artifact (opened by _open_exported). BACKENDS is every name, in this order.
TORCH_BACKENDS = {"pytorch": "TorchDenoiser", "torch-compile": "CompiledTorchDenoiser"}
EXPORTED_BACKENDS = ("onnxruntime", "tensorrt", "openvino")
BACKENDS = (*TORCH_BACKENDS, *EXPORTED_BACKENDS)
# Which precisions each backend computes in (config.PRECISIONS names them all). A TensorRT plan computes in
# the precision it was built with; bf16 needs a CPU whose OpenVINO reports BF16 (checked when opened).
BACKEND_PRECISIONS = {"pytorch": ("fp32", "fp16"), "torch-compile": ("fp32", "fp16"),
                      "onnxruntime": ("fp32", "fp16", "int8"), "tensorrt": ("fp32", "fp16"),
                      "openvino": ("fp32", "bf16", "int8")}
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


@dataclass(frozen=True)
class EngineInfo:
    """What an opened engine is: the configs it carries and a one-line description.

    ``precision`` is what the engine computes in (a TensorRT plan's is fixed at export);
    ``manifest`` is the bundle's manifest, None for a checkpoint.
    """

    model: ModelConfig
    audio: AudioConfig
    diffusion: DiffusionConfig
    description: str
    backend: str
    precision: str
    path: Path
    manifest: Manifest | None = None


def open_denoiser(path: str | os.PathLike, *, backend: str | None = None, device: torch.device | str = "cpu",
                  precision: str = "fp32", model_config: ModelConfig | None = None,
                  intra_op_threads: int | None = None) -> tuple[Denoiser, EngineInfo]:
    """Open ``path`` as a Denoiser on ``device``.

    ``path``: a ``.plan`` (manifest beside it), an export bundle directory, a ``.onnx`` (manifest beside
    it), a checkpoint ``load_checkpoint`` accepts, or a directory holding exactly one checkpoint.
    ``backend``: ``"pytorch" | "onnxruntime" | "tensorrt"``; None picks from the artifact (a bundle
    with a plan runs on TensorRT when it is installed and ``device`` is CUDA, else on ONNX Runtime).
    ``device``: ``"auto"`` takes CUDA where torch sees a GPU, except for ONNX Runtime without its CUDA
    execution provider (plain ``onnxruntime``), which then runs on the CPU; on the CPU, a bundle with no
    ``backend`` and precision fp32 runs on the fastest engine that passed quality parity for its model
    (``engine.cpu_choice``; ONNX Runtime fp32 where none did).
    ``precision``: ``"fp32" | "fp16"`` for pytorch and onnxruntime (fp16 uses ``unet_fp16.onnx``), ``"int8"``
    for onnxruntime and openvino (``unet_int8.onnx``), ``"bf16"`` for openvino (``BACKEND_PRECISIONS``); a plan
    computes in the precision it was built with (logged when it differs). ``model_config``: when given,
    the engine must have been made for exactly this config. Raises BackendError (one line).
    """
    path = Path(path)
    if backend is not None and backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    check_precision(precision)
    if backend is not None and precision not in BACKEND_PRECISIONS[backend]:
        raise BackendError(f"the {backend} backend runs {', '.join(BACKEND_PRECISIONS[backend])}, not {precision}"
                           + ("; use --backend openvino" if precision == "bf16" else ""))
    auto = str(device) == "auto"
    device = resolve_device(pick_device("auto") if auto else device)  # decided here, once
    if not path.exists():
        raise BackendError(f"{path}: no such file or directory")
    kind = _artifact_kind(path)
    if kind == "checkpoint":
        return _open_checkpoint(_single_checkpoint(path) if path.is_dir() else path, backend, device, precision,
                                model_config)
    return _open_exported(path, kind, backend, device, precision, model_config, intra_op_threads, auto)


def pick_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA where torch sees a GPU, else the CPU; a named CUDA device must exist (BackendError)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    return dev


def _artifact_kind(path: Path) -> str:
    if path.is_dir():
        return "bundle" if (path / MANIFEST).is_file() else "checkpoint"
    suffix = path.suffix.lower()
    if suffix in (".plan", ".engine", ".trt"):
        return "plan"
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".json":
        return "bundle"
    return "checkpoint"


def _single_checkpoint(directory: Path) -> Path:
    found = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES)
    if len(found) != 1:
        what = "no checkpoint" if not found else f"{len(found)} checkpoints"
        raise BackendError(f"{directory}: not an export bundle (no manifest.json) and holds {what}; "
                           "pass a .plan, .onnx, bundle directory or checkpoint file")
    return found[0]


def torch_denoiser(backend: str, model, *, device: torch.device | str = "cpu", precision: str = "fp32") -> Denoiser:
    """A Denoiser of ``TORCH_BACKENDS[backend]`` over ``model`` (an nn.Module, converted in place)."""
    from . import pytorch

    if backend not in TORCH_BACKENDS:
        raise BackendError(f"{backend!r} does not run a PyTorch module; use one of {', '.join(TORCH_BACKENDS)}")
    return getattr(pytorch, TORCH_BACKENDS[backend])(model, device=device, dtype=precision_dtype(precision))


def _open_checkpoint(path: Path, backend: str | None, device: torch.device, precision: str,
                     model_config: ModelConfig | None) -> tuple[Denoiser, EngineInfo]:
    from ..checkpoint import CheckpointError, load_checkpoint
    from . import pytorch

    backend = backend or "pytorch"
    if backend not in TORCH_BACKENDS:
        raise BackendError(f"{path}: a checkpoint runs with the {' or '.join(TORCH_BACKENDS)} backend; export it "
                           f"for {backend} first with `dh-export {path}`")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise BackendError(f"{e}; or pass a .plan, .onnx or export bundle") from None
    _check_model(path, ckpt.model, model_config)
    den, _ = pytorch.open(Artifact(path, "checkpoint", checkpoint=ckpt), Runtime(device, precision),
                          compiled=backend == "torch-compile")
    info = EngineInfo(model=ckpt.model, audio=ckpt.audio, diffusion=ckpt.diffusion, backend=backend,
                      precision=precision, path=path,
                      description=f"{backend} {precision} on {device}: {path.name} ({ckpt.source} checkpoint)")
    return den, info


def exported_backend(name: str):
    """The module of an ``EXPORTED_BACKENDS`` backend: its ``accepts(artifact)``, ``refusal(artifact)`` and
    ``open(artifact, runtime)`` (imported when used; the heavy library only when ``open`` runs)."""
    if name not in EXPORTED_BACKENDS:
        raise BackendError(f"{name!r} does not run an exported engine; use one of {', '.join(EXPORTED_BACKENDS)}")
    return importlib.import_module(f".{name}_", __name__)


def _open_exported(path: Path, kind: str, backend: str | None, device: torch.device, precision: str,
                   model_config: ModelConfig | None, intra_op_threads: int | None,
                   auto_device: bool = False) -> tuple[Denoiser, EngineInfo]:
    bundle = path if path.is_dir() else path.parent
    try:
        manifest = read_manifest(bundle)
    except BundleError as e:
        raise BackendError(f"{path}: needs the manifest.json dh-export writes beside it ({e})") from None
    _check_model(path, manifest.model, model_config)
    if backend is None and auto_device and kind == "bundle" and precision == "fp32" and device.type == "cpu":
        from ..cpu_choice import choose

        backend, precision = choose(bundle)  # the fastest engine that passed quality parity for this model
    backend = backend or _default_backend(kind, bundle, manifest, device, precision)
    if backend in TORCH_BACKENDS:
        raise BackendError(f"{path}: an export bundle holds no PyTorch weights; pass the checkpoint it was made "
                           f"from ({manifest.source_name or 'sha256 ' + manifest.source_sha256[:12]}) instead")
    module, artifact = exported_backend(backend), Artifact(path, kind, bundle, manifest)
    if not module.accepts(artifact):
        raise BackendError(module.refusal(artifact))
    den, used = module.open(artifact, Runtime(device, precision, intra_op_threads, auto_device))
    info = EngineInfo(model=manifest.model, audio=manifest.audio, diffusion=manifest.diffusion, backend=backend,
                      precision=used, path=path, manifest=manifest,
                      description=f"{backend} {used} on {den.device}: {path.name} "
                                  f"(exported from {manifest.source_name or 'a checkpoint'})")
    return den, info


def _default_backend(kind: str, bundle: Path, manifest: Manifest, device: torch.device,
                     precision: str = "fp32") -> str:
    if kind == "plan":
        return "tensorrt"
    if precision == "bf16" or (precision == "int8" and importlib.util.find_spec("openvino") is not None):
        return "openvino"
    if kind == "onnx":
        return "onnxruntime"
    has_plan = manifest.tensorrt is not None and (bundle / manifest.tensorrt.plan_file).is_file()
    if has_plan and device.type == "cuda" and importlib.util.find_spec("tensorrt") is not None:
        return "tensorrt"
    return "onnxruntime"


def _check_model(path: Path, have: ModelConfig, want: ModelConfig | None) -> None:
    if want is None or have == want:
        return
    diff = {k: (v, getattr(want, k)) for k, v in have.to_dict().items() if _norm(v) != _norm(getattr(want, k))}
    shown = ", ".join(f"{k}={a} (asked {b})" for k, (a, b) in list(diff.items())[:3])
    raise BackendError(f"{path}: engine was made for another model config: {shown}; re-export the right checkpoint")


def _norm(v):
    return list(v) if isinstance(v, tuple) else v
