"""What every backend's ``accepts(artifact)`` and ``open(artifact, runtime)`` take.

:class:`Artifact`: what ``open_denoiser`` was given, recognised once (a bundle folder, an ``.onnx`` or a
``.plan`` beside its manifest, or a checkpoint, loaded). :class:`Runtime`: how to run it, decided once at the
edge (the device already ``cuda:N``, the precision, the threads). A backend picks its file from the artifact
(:meth:`Artifact.onnx`, :meth:`Artifact.plan`), which checks it against the manifest's record first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..bundle import UNET_ONNX, UNET_ONNX_FP16, UNET_ONNX_INT8, UNET_PLAN, BundleError, Manifest, verify_file
from .base import BackendError

KINDS = ("bundle", "onnx", "plan", "checkpoint")
ONNX_KINDS = ("bundle", "onnx")  # what an ONNX backend (onnxruntime, openvino) runs


def plan_refusal(artifact: Artifact, backend: str) -> str:
    """Why an ONNX backend does not run ``artifact``, a TensorRT plan (its ``refusal``)."""
    return (f"{artifact.path}: a TensorRT plan runs only with backend='tensorrt'; pass the bundle directory or its "
            f".onnx for {backend}")


@dataclass(frozen=True)
class Artifact:
    """``path`` as given; ``kind`` one of ``KINDS``; ``bundle`` the folder holding the manifest and ``manifest``
    it (exported artifacts); ``checkpoint`` the loaded ``engine.checkpoint.Checkpoint`` (a checkpoint)."""

    path: Path
    kind: str
    bundle: Path | None = None
    manifest: Manifest | None = None
    checkpoint: Any = None

    @property
    def exported(self) -> bool:
        return self.kind in ("bundle", "onnx", "plan")

    def verified(self, path: Path) -> Path:
        """``path`` once it is checked to be the file the manifest records (size, then sha256:
        ``bundle.verify_file``), before any backend runs it; BackendError (one line) when it was replaced."""
        try:
            return verify_file(path.parent, self.manifest, path.name)
        except BundleError as e:
            raise BackendError(str(e)) from None

    def onnx(self, precision: str) -> Path:
        """The ONNX to run: the ``.onnx`` given, else the bundle's for ``precision`` (fp16: ``unet_fp16.onnx``,
        int8: ``unet_int8.onnx``, else ``unet.onnx``), verified; BackendError (one line, with the export command)
        when the bundle lacks it."""
        if self.kind == "onnx":
            return self.verified(self.path)
        onnx = self.bundle / {"fp16": UNET_ONNX_FP16, "int8": UNET_ONNX_INT8}.get(precision, UNET_ONNX)
        if not onnx.is_file():
            hint = {"fp16": "; export with --precision fp16 for fp16 ONNX",
                    "int8": f"; make one with `dh-export {self.bundle} --precision int8 -o NEW_BUNDLE`",
                    }.get(precision, "")
            raise BackendError(f"{self.bundle}: the bundle has no {onnx.name}{hint}")
        return self.verified(onnx)

    def plan(self) -> Path:
        """The TensorRT plan: the ``.plan`` given, else the one the manifest records (not yet verified)."""
        if self.kind == "plan":
            return self.path
        record = self.manifest.tensorrt
        return self.bundle / (record.plan_file if record else UNET_PLAN)


@dataclass(frozen=True)
class Runtime:
    """How to run an artifact: ``device`` (resolved: ``cuda:N``, never bare ``cuda``), ``precision``,
    ``threads`` (CPU threads of the engine; None: the library's choice), and whether the device was
    ``auto`` (a backend may then fall back to the CPU where it cannot use the GPU)."""

    device: torch.device
    precision: str = "fp32"
    threads: int | None = None
    auto_device: bool = False
