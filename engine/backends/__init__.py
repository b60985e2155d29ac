"""Open any engine artifact as a Denoiser: a TensorRT plan, an export bundle, an ONNX file or a checkpoint.

``open_denoiser(path)`` picks the backend from what ``path`` is; ``backend=`` overrides it where the
artifact allows (a bundle runs with onnxruntime, openvino or tensorrt; a checkpoint only with pytorch).
Heavy libraries (onnxruntime, openvino, tensorrt) are imported only when their backend is opened.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import AudioConfig, DiffusionConfig, ModelConfig
from .base import (PRECISIONS, BackendError, BatchProfile, Denoiser, TensorSpec, check_precision, example_inputs,
                   precision_dtype, unet_io_spec)

if TYPE_CHECKING:
    from ..bundle import Manifest

__all__ = ["BACKENDS", "BACKEND_PRECISIONS", "PRECISIONS", "BackendError", "BatchProfile", "Denoiser", "EngineInfo", "TensorSpec",
           "example_inputs", "open_denoiser", "pick_device", "precision_dtype", "torch_denoiser", "unet_io_spec"]

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
    device = pick_device("auto") if auto else torch.device(device)
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
    from ..bundle import MANIFEST

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

    backend = backend or "pytorch"
    if backend not in TORCH_BACKENDS:
        raise BackendError(f"{path}: a checkpoint runs with the {' or '.join(TORCH_BACKENDS)} backend; export it "
                           f"for {backend} first with `dh-export {path}`")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise BackendError(f"{e}; or pass a .plan, .onnx or export bundle") from None
    _check_model(path, ckpt.model, model_config)
    den = torch_denoiser(backend, ckpt.build(), device=device, precision=precision)
    info = EngineInfo(model=ckpt.model, audio=ckpt.audio, diffusion=ckpt.diffusion, backend=backend,
                      precision=precision, path=path,
                      description=f"{backend} {precision} on {device}: {path.name} ({ckpt.source} checkpoint)")
    return den, info


def _open_exported(path: Path, kind: str, backend: str | None, device: torch.device, precision: str,
                   model_config: ModelConfig | None, intra_op_threads: int | None,
                   auto_device: bool = False) -> tuple[Denoiser, EngineInfo]:
    from ..bundle import UNET_PLAN, BundleError, read_manifest

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
    if backend == "tensorrt":
        if kind == "onnx":
            raise BackendError(f"{path}: the tensorrt backend runs a plan; build one with `dh-export` on a GPU "
                               "machine with TensorRT, or use backend='onnxruntime'")
        plan = path if kind == "plan" else bundle / (manifest.tensorrt.plan_file if manifest.tensorrt else UNET_PLAN)
        den, used = _open_plan(plan, manifest, device, precision)
    elif backend == "openvino":
        if kind == "plan":
            raise BackendError(f"{path}: a TensorRT plan runs only with backend='tensorrt'; pass the bundle "
                               "directory or its .onnx for openvino")
        if device.type != "cpu" and not auto_device:
            raise BackendError(f"the openvino backend runs on the CPU, not {device}; pass device='cpu'")
        den, used = _open_openvino(path if kind == "onnx" else None, bundle, manifest, precision, intra_op_threads)
    else:
        if kind == "plan":
            raise BackendError(f"{path}: a TensorRT plan runs only with backend='tensorrt'; pass the bundle "
                               "directory or its .onnx for onnxruntime")
        if auto_device and device.type == "cuda":
            from .onnxruntime_ import has_cuda_provider

            if not has_cuda_provider():
                log.info("onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu); running on the CPU")
                device = torch.device("cpu")
        den, used = _open_onnx(path if kind == "onnx" else None, bundle, manifest, device, precision,
                               intra_op_threads)
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


def _open_plan(plan: Path, manifest: Manifest, device: torch.device, precision: str) -> tuple[Denoiser, str]:
    from .tensorrt_ import TrtDenoiser, import_tensorrt

    if not plan.is_file():
        raise BackendError(f"{plan.parent}: the bundle has no TensorRT plan; build one with `dh-export` on a GPU "
                           "machine with TensorRT, or use backend='onnxruntime'")
    import_tensorrt()  # a clear error before anything else when TensorRT is missing
    if device.type != "cuda":
        raise BackendError(f"{plan}: TensorRT plans run on CUDA, not {device}; pass device='cuda'")
    verified(plan.parent, manifest, plan.name)
    built = manifest.tensorrt.precision if manifest.tensorrt else manifest.precision
    if precision != built:
        log.info("%s was built for %s; running it in %s (asked for %s)", plan.name, built, built, precision)
    return TrtDenoiser(plan, manifest, device=device), built


def _open_onnx(onnx: Path | None, bundle: Path, manifest: Manifest, device: torch.device, precision: str,
               intra_op_threads: int | None) -> tuple[Denoiser, str]:
    from ..bundle import UNET_ONNX_FP16, UNET_ONNX_INT8
    from .onnxruntime_ import OrtDenoiser

    onnx = verified(bundle, manifest, (onnx or bundle_onnx(bundle, precision)).name)
    used = {UNET_ONNX_FP16: "fp16", UNET_ONNX_INT8: "int8"}.get(onnx.name, "fp32")
    return OrtDenoiser(onnx, manifest.model, device=device, intra_op_threads=intra_op_threads), used


def verified(bundle: Path, manifest: Manifest, name: str) -> Path:
    """``bundle/name`` once it is checked to be the file the manifest records (size, then sha256:
    ``bundle.verify_file``), before any backend runs it; BackendError (one line) when it was replaced."""
    from ..bundle import BundleError, verify_file

    try:
        return verify_file(bundle, manifest, name)
    except BundleError as e:
        raise BackendError(str(e)) from None


def bundle_onnx(bundle: Path, precision: str) -> Path:
    """The bundle's ONNX for ``precision`` (fp16: ``unet_fp16.onnx``, int8: ``unet_int8.onnx``, else ``unet.onnx``);
    BackendError (one line, with the export command) when the bundle lacks it."""
    from ..bundle import UNET_ONNX, UNET_ONNX_FP16, UNET_ONNX_INT8

    onnx = bundle / {"fp16": UNET_ONNX_FP16, "int8": UNET_ONNX_INT8}.get(precision, UNET_ONNX)
    if not onnx.is_file():
        hint = {"fp16": "; export with --precision fp16 for fp16 ONNX",
                "int8": f"; make one with `dh-export {bundle} --precision int8 -o NEW_BUNDLE`"}.get(precision, "")
        raise BackendError(f"{bundle}: the bundle has no {onnx.name}{hint}")
    return onnx


def _open_openvino(onnx: Path | None, bundle: Path, manifest: Manifest, precision: str,
                   threads: int | None) -> tuple[Denoiser, str]:
    """OpenVINO over the bundle's ONNX: fp32 and bf16 from ``unet.onnx``, int8 from ``unet_int8.onnx``."""
    from .openvino_ import OvDenoiser

    onnx = verified(bundle, manifest, (onnx or bundle_onnx(bundle, precision)).name)
    return OvDenoiser(onnx, manifest.model, precision=precision, threads=threads), precision


def _check_model(path: Path, have: ModelConfig, want: ModelConfig | None) -> None:
    if want is None or have == want:
        return
    diff = {k: (v, getattr(want, k)) for k, v in have.to_dict().items() if _norm(v) != _norm(getattr(want, k))}
    shown = ", ".join(f"{k}={a} (asked {b})" for k, (a, b) in list(diff.items())[:3])
    raise BackendError(f"{path}: engine was made for another model config: {shown}; re-export the right checkpoint")


def _norm(v):
    return list(v) if isinstance(v, tuple) else v
