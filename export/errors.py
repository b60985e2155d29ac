"""Errors ``dh-export`` reports as one line: bad inputs (exit 2) and failed verification (exit 1)."""

from __future__ import annotations

from dheads.engine.backends.base import BackendError
from dheads.engine.bundle import BundleError
from dheads.engine.checkpoint import CheckpointError
from dheads.engine.encoders import EncoderError

from .to_onnx import ExportGraphError
from .to_tensorrt import TensorRTBuildError
from .verify import ParityError


class ExportError(ValueError):
    """A bad export request: missing file, unwritable output, unsupported option (one-line message)."""


USER_ERRORS: tuple[type[BaseException], ...] = (ExportError, CheckpointError, EncoderError, BundleError)
FAILURES: tuple[type[BaseException], ...] = (ParityError, ExportGraphError, TensorRTBuildError, BackendError)
