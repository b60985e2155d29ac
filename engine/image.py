"""Load the identity frame: a photo or a video frame -> framed face tensor ``[1, 3, S, S]`` in [-1, 1].

Photos (png, jpg, webp, bmp, tiff) are decoded with OpenCV (installed with mediapipe), which
applies EXIF orientation; anything else is read as a video with PyAV (``engine/video.py``).
``crop="auto"`` finds exactly one face and frames it with ``face.crop_box``; ``crop="none"``
takes the centred square of the image as it is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from .face import FaceLandmarker, crop_and_resize, crop_box, detect_faces, quiet_native_stderr, single_face
from .video import NoVideoStream, read_frame

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
CROP_MODES = ("auto", "none")


class ImageError(ValueError):
    """A missing or unreadable identity image; the message is one line naming the file."""


def read_rgb(path: str | os.PathLike, *, frame: int = 0) -> np.ndarray:
    """Decode a photo, or frame ``frame`` of a video, to uint8 ``[H, W, 3]`` RGB.

    Raises ``ImageError`` for a missing or undecodable photo, ``video.VideoError`` for a video
    that cannot be read or has no frame ``frame`` (both are ``ValueError``).
    """
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path} is a directory; give a photo or a video of one face")
    if not path.is_file():
        raise ImageError(f"no such file: {path}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        try:
            return read_frame(path, frame)
        except NoVideoStream:  # a wav given as FACE, say
            raise ImageError(f"cannot read image {path} (it holds no picture or video stream)") from None
    if frame != 0:
        raise ImageError(f"frame={frame} given but {path} is a still image")
    with quiet_native_stderr():  # libpng/libjpeg print their own "libpng error: ..." line on fd 2
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageError(f"cannot read image {path} (corrupt or unsupported format)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def center_square(rgb: np.ndarray) -> tuple[int, int, int]:
    """The largest centred square box ``(x0, y0, side)`` of an ``[H, W, 3]`` image."""
    h, w = rgb.shape[:2]
    side = min(h, w)
    return (w - side) // 2, (h - side) // 2, side


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> float32 ``[1, 3, H, W]`` in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()
    return (x / 127.5 - 1.0).unsqueeze(0)


def to_uint8_frames(x: torch.Tensor) -> np.ndarray:
    """float ``[N, 3, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, 3]`` (rounded, clamped)."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected [N, 3, H, W], got {tuple(x.shape)}")
    y = ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def frame_face(
    rgb: np.ndarray,
    *,
    crop: str = "auto",
    size: int = 128,
    landmarker: FaceLandmarker | None = None,
    source: str | os.PathLike | None = None,
) -> np.ndarray:
    """Crop an RGB uint8 ``[H, W, 3]`` image to the framed face, uint8 ``[size, size, 3]``.

    ``source`` names the image in ``FaceError`` messages.
    """
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
    if crop == "none":
        box = center_square(rgb)
    else:
        box = face_box(rgb, landmarker=landmarker, source=source)
        if box[2] < size:
            log.warning("the face in %s is small (a %d px crop): the %d px identity frame is upscaled and "
                        "will look soft", source if source is not None else "the image", box[2], size)
    return crop_and_resize(rgb, box, size)


def face_box(
    rgb: np.ndarray, *, landmarker: FaceLandmarker | None = None, source: str | os.PathLike | None = None
) -> tuple[int, int, int]:
    """The ``--crop auto`` box ``(x0, y0, side)`` of the one face in RGB uint8 ``[H, W, 3]``.

    ``face.crop_box`` of its landmarks: the rule ``dh-train prepare`` applies to a clip's median.
    """
    own = landmarker is None
    lm = FaceLandmarker(max_faces=2) if own else landmarker
    try:
        face = single_face(detect_faces(lm, rgb), source)
    finally:
        if own:
            lm.close()
    box = crop_box(face.landmarks, rgb.shape[:2])
    log.debug("face crop of %s: box %s", source, box)
    return box


def load_face(
    path: str | os.PathLike,
    *,
    frame: int = 0,
    crop: str = "auto",
    size: int = 128,
    landmarker: FaceLandmarker | None = None,
) -> torch.Tensor:
    """The identity frame from a photo or frame ``frame`` of a video: float32 ``[1, 3, size, size]`` in [-1, 1].

    ``crop="auto"`` needs exactly one face (``FaceError`` otherwise); pass a ``landmarker`` in
    IMAGE mode (``max_faces >= 2`` to notice extra faces) to reuse one across calls.
    """
    rgb = read_rgb(path, frame=frame)
    return to_tensor(frame_face(rgb, crop=crop, size=size, landmarker=landmarker, source=path))
