"""Evaluate generated talking-face videos: one streaming pass per video -> a flat dict of metrics.

Per frame the pass collects: flow/MSE terms with the previous frame (OFM, F-MSE, and the authors'
script variants), MediaPipe mouth opening and eye closure (lip-sync proxy, blinks), ``1 - SSIM`` to
the identity frame inside the face box (drift), the frame's mean colour (colour flicker and colour
drift), and PSNR/SSIM to a reference video where given.
Mouth motion (the 5-95% spread of the opening, its std per second) and the mouth-vs-speech correlation at
the best lag within +-5 frames are measured beside them. With a reference (the real clip), the metrics that
the paper judges as closeness to real video (OFM, F-MSE, blinks, mouth motion, sync) are also given as
ratios to the reference's own values (1 = as real, judged two-sided: a frozen face scores near 0). The
input is the video as decoded, so an mp4 is judged as users see it (encoder-removed grain does not count).
Frames are never all held in memory. The formulas live in :mod:`dheads.benchmarks.metrics`.

Frames are resized to ``size x size`` (128, as the authors' ``smoothness_eval.py`` does) before
every pixel metric; face landmarks are found on the frames as decoded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dheads.benchmarks import metrics as M

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".avi", ".mpg", ".mpeg", ".webm", ".m4v"})
FACE_BOX_PAD = 0.1  # the drift box is the first frame's landmark box grown by 10% each side
MIN_FACE_FRACTION = 0.5  # below this share of frames with a face, face metrics are not reported


class EvalInputError(ValueError):
    """A path that cannot be evaluated (missing, not a video, too short); the message is one line."""


@dataclass(frozen=True)
class EvalConfig:
    """What ``dh-eval`` measures and how; defaults reproduce the documented protocol."""

    size: int | None = 128  # frames resized to size x size for pixel metrics; None keeps them as decoded
    face: bool = True  # run MediaPipe (blinks, lip-sync proxy, face box for drift)
    max_frames: int | None = None
    blink_on: float = 0.25  # eye-closure thresholds above the video's median eyeBlink score
    blink_off: float = 0.15
    max_lag: int = M.SYNC_MAX_LAG  # lip-sync lag search, frames each way (the AV offsets allowed)
    detrend_frames: int = 9  # lip-sync high-pass window, frames
    paper_script: bool = True  # also report OFM/F-MSE as the authors' script computes them

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Signals:
    """Per-pair (``N - 1``) and per-frame (``N``) values gathered in the streaming pass."""

    flow: list[float] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)
    script_ofm: list[float] = field(default_factory=list)
    script_mse: list[float] = field(default_factory=list)
    mouth: list[float] = field(default_factory=list)
    closure: list[float] = field(default_factory=list)
    drift: list[float] = field(default_factory=list)
    color: list[np.ndarray] = field(default_factory=list)  # per-frame mean RGB [3]
    color_identity: np.ndarray | None = None  # mean RGB of --identity; None: the first frame's
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------- inputs


def find_videos(path: str | os.PathLike) -> list[Path]:
    """``[path]`` for a file, or the video files (by suffix, sorted) directly inside a folder."""
    path = Path(path)
    if not path.exists():
        raise EvalInputError(f"no such file or folder: {path}")
    if path.is_file():
        return [path]
    videos = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise EvalInputError(f"no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) in folder {path}")
    return videos


def _probe(path: Path):
    """``VideoInfo`` of a video with at least 2 frames, else :class:`EvalInputError`."""
    from dheads.engine.video import VideoError, probe

    try:
        info = probe(path)
    except VideoError as e:
        raise EvalInputError(f"not a readable video: {e}") from None
    if info.n_frames < 2:
        raise EvalInputError(f"{path}: has {info.n_frames} frame(s); need at least 2 to evaluate")
    return info


def _resize(rgb: np.ndarray, size: int | None) -> np.ndarray:
    """``uint8 [H, W, 3] -> [size, size, 3]`` (bilinear, as ``cv2.resize``'s default in the authors' script)."""
    if size is None or rgb.shape[:2] == (size, size):
        return rgb
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)


def load_identity(path: str | os.PathLike, shape: tuple[int, ...]) -> np.ndarray:
    """Identity image as RGB ``uint8`` resized to ``shape = (H, W, 3)`` of the evaluated frames."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise EvalInputError(f"not a readable image: {path}")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return cv2.resize(rgb, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


# ----------------------------------------------------------------------------- per-frame work


def _open_landmarker(fps: float):
    from dheads.engine.face import FaceLandmarker

    return FaceLandmarker(video=True, fps=fps, max_faces=1)


def _detect(landmarker, rgb: np.ndarray):
    """The largest face in ``rgb`` or ``None`` (also ``None`` without a landmarker)."""
    if landmarker is None:
        return None
    faces = landmarker.detect(rgb)
    if not faces:
        return None
    return max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))


def _face_box(face, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The face's landmark box (padded by ``FACE_BOX_PAD``) mapped from decoded to resized frames."""
    if face is None:
        return None
    sx, sy = dst_hw[1] / src_hw[1], dst_hw[0] / src_hw[0]
    x0, y0, x1, y1 = face.bbox
    px, py = FACE_BOX_PAD * (x1 - x0), FACE_BOX_PAD * (y1 - y0)
    box = (
        max(0, int((x0 - px) * sx)),
        max(0, int((y0 - py) * sy)),
        min(dst_hw[1], int(math.ceil((x1 + px) * sx))),
        min(dst_hw[0], int(math.ceil((y1 + py) * sy))),
    )
    return box if min(box[2] - box[0], box[3] - box[1]) >= 11 else None  # SSIM needs 11x11


def _add_face(sig: _Signals, face) -> None:
    """Mouth opening and eye closure (mean of MediaPipe ``eyeBlinkLeft/Right``); NaN without a face."""
    if face is None:
        sig.mouth.append(math.nan)
        sig.closure.append(math.nan)
        return
    sig.mouth.append(face.mouth_opening())
    bs = face.blendshapes
    if "eyeBlinkLeft" in bs and "eyeBlinkRight" in bs:
        sig.closure.append(0.5 * (bs["eyeBlinkLeft"] + bs["eyeBlinkRight"]))
    else:
        sig.closure.append(math.nan)


def face_signals(path: str | os.PathLike, *, max_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame mouth opening and eye closure of a video: two ``float [N]``, NaN where no face.

    The same signals :func:`evaluate_video` feeds to the lip-sync proxy and the blink counter.
    """
    from dheads.engine.video import read_frames

    path = Path(path)
    return frame_signals(read_frames(path, max_frames=max_frames), fps=_probe(path).fps)


def frame_signals(frames: Iterable[np.ndarray], *, fps: float = 25.0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`face_signals` of frames in memory (uint8 ``[H, W, 3]``, in order, tracked at ``fps``)."""
    sig = _Signals()
    with _open_landmarker(fps) as landmarker:
        for rgb in frames:
            _add_face(sig, _detect(landmarker, rgb))
    return np.array(sig.mouth, dtype=np.float64), np.array(sig.closure, dtype=np.float64)


def _add_pair(sig: _Signals, prev: np.ndarray, cur: np.ndarray, paper_script: bool) -> None:
    flow = M.farneback_flow(prev, cur)
    sig.flow.append(M.flow_magnitude(prev, cur, flow))
    sig.mse.append(M.frame_mse(prev, cur))
    if paper_script:
        ofm_s, mse_s = M.authors_script_pair(prev, cur, flow)
        sig.script_ofm.append(ofm_s)
        sig.script_mse.append(mse_s)


def _add_reference(sig: _Signals, frame: np.ndarray, ref: np.ndarray) -> None:
    if ref.shape != frame.shape:
        ref = cv2.resize(ref, (frame.shape[1], frame.shape[0]), interpolation=cv2.INTER_AREA)
    sig.psnr.append(M.psnr(frame, ref))
    sig.ssim.append(M.ssim(frame, ref))


def _reference_frames(reference: Path | None, size: int | None) -> Iterator[np.ndarray] | None:
    if reference is None:
        return None
    from dheads.engine.video import read_frames

    _probe(reference)
    return (_resize(f, size) for f in read_frames(reference))


def _collect(path: Path, fps: float, reference: Path | None, identity: Path | None, cfg: EvalConfig) -> _Signals:
    """One decoding pass over ``path`` (and ``reference`` in step) filling a :class:`_Signals`."""
    from dheads.engine.video import read_frames

    sig, prev, box, ident = _Signals(), None, None, None
    refs = _reference_frames(reference, cfg.size)
    landmarker = _open_landmarker(fps) if cfg.face else None
    try:
        for i, rgb in enumerate(read_frames(path, max_frames=cfg.max_frames)):
            face = _detect(landmarker, rgb)
            frame = _resize(rgb, cfg.size)
            if i == 0:
                box = _face_box(face, rgb.shape[:2], frame.shape[:2])
                ident = load_identity(identity, frame.shape) if identity is not None else frame
                sig.color_identity = M.mean_color(ident) if identity is not None else None
            _add_face(sig, face)
            if prev is not None:
                _add_pair(sig, prev, frame, cfg.paper_script)
            sig.drift.append(M.drift_distance(frame, ident, box))
            sig.color.append(M.mean_color(frame))
            ref = next(refs, None) if refs is not None else None
            if ref is not None:
                _add_reference(sig, frame, ref)
            prev = frame
    finally:
        if landmarker is not None:
            landmarker.close()
        if refs is not None:
            refs.close()
    if refs is not None and len(sig.psnr) < len(sig.drift):
        log.warning("%s: reference %s has only %d frames; PSNR/SSIM over those", path, reference, len(sig.psnr))
    return sig


# ----------------------------------------------------------------------------- summaries


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _face_fraction(sig: _Signals) -> float:
    return float(np.isfinite(np.array(sig.mouth, dtype=np.float64)).mean()) if sig.mouth else 0.0


def _blink_metrics(sig: _Signals, fps: float, cfg: EvalConfig) -> dict[str, Any]:
    closure = np.array(sig.closure, dtype=np.float64)
    if not cfg.face or _face_fraction(sig) < MIN_FACE_FRACTION or not np.isfinite(closure).any():
        return {"blinks_per_s": None, "blink_count": None, "blink_median_s": None}
    stats = M.blink_stats(closure, fps, on=cfg.blink_on, off=cfg.blink_off)
    return {"blinks_per_s": stats.per_second, "blink_count": stats.count, "blink_median_s": stats.median_duration_s}


def _mouth_metrics(sig: _Signals, fps: float, cfg: EvalConfig) -> dict[str, Any]:
    """How far the mouth moves (``metrics.mouth_motion``); None without enough faces."""
    if not cfg.face or _face_fraction(sig) < MIN_FACE_FRACTION:
        return {"mouth_spread": None, "mouth_std_per_s": None, "mouth_std_per_s_max": None,
                "mouth_std_per_second": []}
    return M.mouth_motion(np.array(sig.mouth, dtype=np.float64), fps).to_dict()


def _lip_metrics(path: Path, has_audio: bool, sig: _Signals, fps: float, cfg: EvalConfig) -> dict[str, Any]:
    empty = {"lip_corr": None, "lip_lag_frames": None}
    if not cfg.face or not has_audio or _face_fraction(sig) < MIN_FACE_FRACTION:
        if cfg.face:
            log.warning("%s: no lip-sync proxy (%s)", path, "no audio track" if not has_audio else "too few faces")
        return empty
    from dheads.engine.audio import AudioError, load_audio

    try:
        audio, rate = load_audio(path)
    except AudioError as e:
        log.warning("no lip-sync proxy: %s", e)
        return empty
    loud = M.loudness_envelope(audio, rate, len(sig.mouth), fps)
    lip = M.speech_sync(np.array(sig.mouth), loud, max_lag=cfg.max_lag)  # a mouth that never moves: 0
    return {"lip_corr": lip.corr, "lip_lag_frames": lip.lag, "_loudness": loud, "_mouth": np.array(sig.mouth)}


def _summarize(path: Path, info, sig: _Signals, cfg: EvalConfig, has_reference: bool) -> dict[str, Any]:
    drift = M.drift_summary(np.array(sig.drift), info.fps)
    row: dict[str, Any] = {
        "name": path.name,
        "path": str(path),
        "fps": info.fps,
        "n_frames": len(sig.drift),
        "duration_s": len(sig.drift) / info.fps,
        "ofm": _mean(sig.flow),
        "fmse": _mean(sig.mse),
        "ofm_paper_script": _mean(sig.script_ofm),
        "fmse_paper_script": _mean(sig.script_mse),
        "face_fraction": _face_fraction(sig) if cfg.face else None,
    }
    row.update(_blink_metrics(sig, info.fps, cfg))
    row.update(_mouth_metrics(sig, info.fps, cfg))
    row.update(_lip_metrics(path, info.has_audio, sig, info.fps, cfg))
    row.update(drift_mean=drift.mean, drift_slope_per_s=drift.slope_per_s, drift_per_second=list(drift.per_second))
    row.update(M.color_summary(np.array(sig.color), info.fps, sig.color_identity).to_dict())
    row.update(psnr=_mean(sig.psnr) if has_reference else None, ssim=_mean(sig.ssim) if has_reference else None)
    return row


def evaluate_video(
    path: str | os.PathLike,
    *,
    reference: str | os.PathLike | None = None,
    identity: str | os.PathLike | None = None,
    config: EvalConfig = EvalConfig(),
    keep_signals: bool = False,
) -> dict[str, Any]:
    """All metrics of one video as a flat JSON-ready dict (``None`` where a metric does not apply).
    ``keep_signals``: also ``_mouth`` and ``_loudness`` (``float [N]`` arrays, not JSON) where measured.

    ``reference``: ground-truth video for PSNR/SSIM (frame by frame over the common length).
    ``identity``: image the drift is measured against (default: the video's first frame).
    """
    path = Path(path)
    info = _probe(path)
    ref = Path(reference) if reference is not None else None
    sig = _collect(path, info.fps, ref, Path(identity) if identity is not None else None, config)
    row = _summarize(path, info, sig, config, has_reference=ref is not None)
    log.info("%s: %d frames, OFM %.3f px, F-MSE %.2f", path.name, row["n_frames"], row["ofm"], row["fmse"])
    if not keep_signals:
        row.pop("_loudness", None), row.pop("_mouth", None)
    return row


def _reference_for(video: Path, reference: Path | None, folder_mode: bool) -> Path | None:
    """The reference of ``video``: the file itself, or the same-stem video in a reference folder."""
    if reference is None or not folder_mode:
        return reference
    matches = [p for p in find_videos(reference) if p.stem == video.stem]
    if not matches:
        log.warning("no reference for %s in %s; PSNR/SSIM skipped", video.name, reference)
    return matches[0] if matches else None


def evaluate_path(
    path: str | os.PathLike,
    *,
    reference: str | os.PathLike | None = None,
    identity: str | os.PathLike | None = None,
    config: EvalConfig = EvalConfig(),
) -> list[dict[str, Any]]:
    """Evaluate a video, or every video in a folder (references matched by file stem)."""
    path = Path(path)
    videos = find_videos(path)
    ref = Path(reference) if reference is not None else None
    if ref is not None and not ref.exists():
        raise EvalInputError(f"no such reference file or folder: {ref}")
    if identity is not None and not Path(identity).is_file():
        raise EvalInputError(f"no such identity image: {identity}")
    folder_mode = path.is_dir()
    if ref is not None and folder_mode != ref.is_dir():
        raise EvalInputError("give --reference as a folder when GENERATED is a folder, a file otherwise")
    rows = []
    for v in videos:
        matched = _reference_for(v, ref, folder_mode)
        row = evaluate_video(v, reference=matched, identity=identity, config=config, keep_signals=True)
        if matched is not None:
            add_real_ratios(row, evaluate_video(matched, config=config))
        rows.append(row)
    add_other_audio_sync(rows, config)
    for row in rows:
        row.pop("_loudness", None), row.pop("_mouth", None)
    return rows


# Metrics judged as closeness to real video (the paper's rule): reported as a ratio to the reference's value.
RATIO_KEYS = ("ofm", "fmse", "blinks_per_s", "mouth_spread", "mouth_std_per_s", "lip_corr")


def add_real_ratios(row: dict[str, Any], real: dict[str, Any]) -> None:
    """``row[KEY_ratio] = row[KEY] / real[KEY]`` and ``row[real_KEY] = real[KEY]`` for ``RATIO_KEYS``: 1 is
    as real; a still video's mouth spread ratio is near 0, a frozen face's OFM and F-MSE ratios too."""
    for key in RATIO_KEYS:
        row[f"real_{key}"] = real.get(key)
        row[f"{key}_ratio"] = M.ratio_to_real(row.get(key), real.get(key))


def add_other_audio_sync(rows: list[dict[str, Any]], config: EvalConfig) -> None:
    """``lip_corr_other_audio``: each video's mouth against every other video's speech (a folder of clips):
    the mismatched-audio control. A model that follows speech scores its own audio higher on average."""
    have = [r for r in rows if r.get("_loudness") is not None]
    for row in rows:
        row["lip_corr_other_audio"] = None
    for row in have:
        m = row["_mouth"]
        others = [M.speech_sync(m[: len(o["_loudness"])], o["_loudness"][: len(m)], max_lag=config.max_lag).corr
                  for o in have if o is not row]
        row["lip_corr_other_audio"] = float(np.mean(others)) if others else None


NUMERIC_KEYS = (
    "ofm", "fmse", "ofm_paper_script", "fmse_paper_script", "blinks_per_s", "blink_median_s",
    "lip_corr", "lip_corr_other_audio", "mouth_spread", "mouth_std_per_s", "drift_mean", "drift_slope_per_s",
    "color_flicker", "color_drift_mean", "color_drift_max", "color_drift_slope_per_s", "psnr", "ssim",
    *(f"{k}_ratio" for k in RATIO_KEYS),
)


def mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over videos of each numeric metric (videos where it is ``None`` are skipped)."""
    out: dict[str, Any] = {"name": "mean", "n_videos": len(rows)}
    for key in NUMERIC_KEYS:
        value = M.dataset_mean(r.get(key) for r in rows)
        out[key] = None if math.isnan(value) else value
    return out


def _jsonable(value: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, recursively (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def report(rows: list[dict[str, Any]], config: EvalConfig) -> dict[str, Any]:
    """The JSON document: ``{"videos": [...], "mean": {...}, "config": {...}}``."""
    return _jsonable({"videos": rows, "mean": mean_row(rows), "config": config.to_dict()})


def write_json(path: str | os.PathLike, document: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    log.info("wrote %s", path)


def mouth_signal(frames: list[np.ndarray], size: int = 256) -> np.ndarray:
    """Per-frame mouth opening (NaN where no face) on frames upscaled to ``size`` px."""
    big = (cv2.resize(np.ascontiguousarray(f), (size, size), interpolation=cv2.INTER_CUBIC) for f in frames)
    return frame_signals(big)[0]
