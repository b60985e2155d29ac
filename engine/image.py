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
# The pixel budget of a face image or video frame, checked on the file's header before anything is decoded:
# a 2.5 MB PNG can claim 30000 x 30000 pixels (2.7 GB decoded), which crashed the face detector.
MAX_IMAGE_PIXELS = 50_000_000  # a 50 MP photo (8660 x 5773): more than any phone's default
MAX_IMAGE_SIDE = 16384


class ImageError(ValueError):
    """A missing or unreadable identity image; the message is one line naming the file."""


class ImageTooLarge(ImageError):
    """An image (or video frame) over the pixel budget, refused from its header."""


def check_pixels(width: int, height: int, source: str | os.PathLike) -> None:
    """ImageTooLarge (one line) when ``width x height`` is over ``MAX_IMAGE_PIXELS`` or a side over ``MAX_IMAGE_SIDE``."""
    if width * height > MAX_IMAGE_PIXELS or max(width, height) > MAX_IMAGE_SIDE:
        raise ImageTooLarge(f"{source} is {width}x{height} pixels; a face image may have at most "
                            f"{MAX_IMAGE_PIXELS / 1e6:g} MP and {MAX_IMAGE_SIDE} px a side (scale it down)")


def _u(data: bytes, at: int, n: int, order: str = "big") -> int:
    return int.from_bytes(data[at : at + n], order)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD9)):  # no length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            return _u(data, i + 7, 2), _u(data, i + 5, 2)
        i += 2 + _u(data, i + 2, 2)
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    order = "little" if data[:2] == b"II" else "big"
    ifd = _u(data, 4, 4, order)
    size: dict[int, int] = {}
    for k in range(min(_u(data, ifd, 2, order), 512)):
        e = ifd + 2 + 12 * k
        tag, kind = _u(data, e, 2, order), _u(data, e + 2, 2, order)
        if tag in (256, 257):
            size[tag] = _u(data, e + 8, 2 if kind == 3 else 4, order)
    return (size[256], size[257]) if len(size) == 2 else None


def header_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG, JPEG, GIF, BMP, WebP or TIFF header, without decoding; None when the
    header is not one of these (or is cut short)."""
    with open(path, "rb") as f:
        data = f.read(1 << 20)  # JPEG: EXIF and ICC segments come before the frame header
    if len(data) < 32:  # shorter than any of these headers with its size fields
        return None
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return _u(data, 16, 4), _u(data, 20, 4)
        if data[:3] == b"\xff\xd8\xff":
            return _jpeg_size(data)
        if data[:4] in (b"GIF8",):
            return _u(data, 6, 2, "little"), _u(data, 8, 2, "little")
        if data[:2] == b"BM":
            if _u(data, 14, 4, "little") == 12:  # OS/2 core header: 16-bit sides
                return _u(data, 18, 2, "little"), _u(data, 20, 2, "little")
            return (abs(int.from_bytes(data[18:22], "little", signed=True)),
                    abs(int.from_bytes(data[22:26], "little", signed=True)))
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            chunk = data[12:16]
            if chunk == b"VP8X":
                return 1 + _u(data, 24, 3, "little"), 1 + _u(data, 27, 3, "little")
            if chunk == b"VP8L":
                bits = _u(data, 21, 4, "little")
                return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
            if chunk == b"VP8 ":
                return _u(data, 26, 2, "little") & 0x3FFF, _u(data, 28, 2, "little") & 0x3FFF
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(data)
    except (IndexError, KeyError):
        return None
    return None


def read_rgb(path: str | os.PathLike, *, frame: int = 0) -> np.ndarray:
    """Decode a photo, or frame ``frame`` of a video, to uint8 ``[H, W, 3]`` RGB.

    Raises ``ImageTooLarge`` for a picture over the pixel budget (from its header, before decoding),
    ``ImageError`` for a missing or undecodable photo, ``video.VideoError`` for a video
    that cannot be read or has no frame ``frame`` (both are ``ValueError``).
    """
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path} is a directory; give a photo or a video of one face")
    if not path.is_file():
        raise ImageError(f"no such file: {path}")
    size = header_size(path)
    if size is not None:
        check_pixels(*size, path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        try:
            rgb = read_frame(path, frame, check_size=lambda w, h: check_pixels(w, h, path))
        except NoVideoStream:  # a wav given as FACE, say
            raise ImageError(f"cannot read image {path} (it holds no picture or video stream)") from None
    else:
        if frame != 0:
            raise ImageError(f"frame={frame} given but {path} is a still image")
        with quiet_native_stderr():  # libpng/libjpeg print their own "libpng error: ..." line on fd 2
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ImageError(f"cannot read image {path} (corrupt or unsupported format)")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    check_pixels(rgb.shape[1], rgb.shape[0], path)  # a header this module cannot parse: never past the detector
    return rgb


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
