"""dheads.export: checkpoint -> ONNX -> TensorRT plan, verified against eager PyTorch (``dh-export``).

``export_bundle(ckpt, out_dir, ...)`` is the library call behind the CLI; the runtime reads what it writes
through :mod:`dheads.engine.bundle` and :func:`dheads.engine.backends.open_denoiser`.
"""

from __future__ import annotations

__all__ = ["ExportError", "ParityError", "export_bundle", "run_export"]


def __getattr__(name: str):
    # Lazy: ``import dheads.export`` stays cheap until the exporter is used.
    if name in ("export_bundle", "run_export"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "ExportError":
        from .errors import ExportError

        return ExportError
    if name == "ParityError":
        from .verify import ParityError

        return ParityError
    raise AttributeError(f"module 'dheads.export' has no attribute {name!r}")
