"""The error types a user can cause (bad files, wrong engine), which CLIs print as one line, exit 2."""

from __future__ import annotations

from .audio import AudioError
from .backends.base import BackendError
from .bundle import BundleError
from .checkpoint import CheckpointError
from .encoders import EncoderError
from .face import FaceError
from .image import ImageError
from .video import VideoError

USER_ERRORS: tuple[type[BaseException], ...] = (
    AudioError, BackendError, BundleError, CheckpointError, EncoderError, FaceError, ImageError, VideoError,
    FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
)
