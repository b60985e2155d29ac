"""Video metrics for talking-face generation that need no downloaded weights.

Pure functions on numpy arrays; no file I/O and no face detection here (``evaluate.py`` feeds them).
Conventions: frames are RGB ``uint8 [H, W, 3]`` (or grayscale ``[H, W]``), pixel scale 0..255;
per-frame signals are ``float [N]`` at the video's ``fps``.

Smoothness (Diffused Heads, WACV 2024, appendix; authors' ``smoothness_eval.py``):

* **OFM** (optical-flow magnitude): Farneback flow between consecutive grayscale frames with
  ``pyr_scale=0.5, levels=7, winsize=5, iterations=15, poly_n=5, poly_sigma=1.2, flags=0``; the mean
  per-pixel magnitude ``sqrt(fx^2 + fy^2)`` in pixels per frame, averaged over pairs, per video
  (bit-identical pairs count as 0, see :func:`flow_magnitude`).
* **F-MSE**: mean squared difference of consecutive RGB frames on the 0..255 scale (the authors'
  script works on ``uint8`` frames, i.e. 0..255), averaged over pairs, per video.

The authors' script differs from that text in two ways, reproduced by :func:`authors_script_pair` for
comparison with the paper's tables only: it averages a JET colour map of the per-pair min-max
normalised magnitude (unitless, and 42.67 for a static video), and it squares ``uint8`` differences,
which wrap around modulo 256.

Global colour (the whole frame's mean RGB per frame, levels of 255; :func:`color_metrics`):

* **colour flicker**: mean over consecutive pairs of the mean over R, G, B of ``|change of the mean|``.
* **colour drift**: the same distance of each frame's mean colour from the identity frame's, as a mean,
  a max, 1-s buckets and a slope per second.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

FARNEBACK_PARAMS = dict(
    pyr_scale=0.5, levels=7, winsize=5, iterations=15, poly_n=5, poly_sigma=1.2, flags=0
)
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, the weights of cv2.COLOR_RGB2GRAY


# ----------------------------------------------------------------------------- smoothness


def to_gray(frame: np.ndarray) -> np.ndarray:
    """RGB ``uint8 [H, W, 3]`` -> ``uint8 [H, W]`` (BT.601 luma); a 2-D frame passes through."""
    if frame.ndim == 2:
        return frame
    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


def farneback_flow(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Dense flow ``float32 [H, W, 2]`` (dx, dy in pixels) from ``prev`` to ``nxt`` with the paper's parameters."""
    return cv2.calcOpticalFlowFarneback(to_gray(prev), to_gray(nxt), None, **FARNEBACK_PARAMS)


def mean_magnitude(flow: np.ndarray) -> float:
    """Mean per-pixel length ``sqrt(dx^2 + dy^2)`` of a flow field ``[H, W, 2]``, in pixels."""
    flow = flow.astype(np.float64)
    return float(np.hypot(flow[..., 0], flow[..., 1]).mean())


def flow_magnitude(prev: np.ndarray, nxt: np.ndarray, flow: np.ndarray | None = None) -> float:
    """Mean optical-flow magnitude (pixels) between two frames ``[H, W(, 3)]``: one OFM term.

    Identical frames give exactly 0: OpenCV's Farneback returns a small border artifact for them
    (up to 0.5 px on edge pixels, 0.003 px mean on 128x128 texture), which is not motion.
    ``flow``: :func:`farneback_flow` of the pair where already computed.
    """
    if np.array_equal(prev, nxt):
        return 0.0
    return mean_magnitude(farneback_flow(prev, nxt) if flow is None else flow)


def frame_mse(prev: np.ndarray, nxt: np.ndarray) -> float:
    """Mean squared difference of two frames ``[H, W(, 3)]`` on the 0..255 scale: one F-MSE term."""
    diff = prev.astype(np.float64) - nxt.astype(np.float64)
    return float(np.mean(diff * diff))


def authors_script_pair(
    prev: np.ndarray, nxt: np.ndarray, flow: np.ndarray | None = None
) -> tuple[float, float]:
    """(OFM, F-MSE) terms exactly as the authors' ``smoothness_eval.py`` computes them, for comparison.

    ``prev``/``nxt``: ``uint8 [128, 128, 3]`` (the script resizes every frame to 128x128 first).
    OFM term: mean of ``applyColorMap(minmax_normalise(|flow|) -> uint8, JET)``, unitless 0..255.
    F-MSE term: mean of ``(nxt - prev) ** 2`` evaluated in ``uint8`` (wraps modulo 256).
    ``flow``: :func:`farneback_flow` of the pair where already computed.
    """
    flow = farneback_flow(prev, nxt) if flow is None else flow
    magnitude, _ = cv2.cartToPolar(flow[..., 0], flow[..., 1])
    magnitude = cv2.normalize(magnitude, None, 0, 255, cv2.NORM_MINMAX)
    colored = cv2.applyColorMap(magnitude.astype(np.uint8), cv2.COLORMAP_JET)
    wrapped = (nxt.astype(np.uint8) - prev.astype(np.uint8)) ** 2  # uint8 arithmetic on purpose
    return float(colored.mean()), float(wrapped.mean())


def _consecutive(frames: Iterable[np.ndarray]) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    prev = None
    for frame in frames:
        if prev is not None:
            yield prev, frame
        prev = frame


def ofm(frames: Iterable[np.ndarray]) -> float:
    """OFM of one video: mean over consecutive pairs of :func:`flow_magnitude`. Frames ``[H, W(, 3)]``."""
    values = [flow_magnitude(a, b) for a, b in _consecutive(frames)]
    return float(np.mean(values)) if values else math.nan


def fmse(frames: Iterable[np.ndarray]) -> float:
    """F-MSE of one video: mean over consecutive pairs of :func:`frame_mse` (0..255 scale)."""
    values = [frame_mse(a, b) for a, b in _consecutive(frames)]
    return float(np.mean(values)) if values else math.nan


def dataset_mean(per_video: Iterable[float | None]) -> float:
    """Mean over videos, skipping ``None``/NaN (the paper averages per-video values over the test set)."""
    values = [v for v in per_video if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


# ----------------------------------------------------------------------------- blinks


@dataclass(frozen=True)
class BlinkStats:
    """Blinks found in one eye-closure signal. Durations in seconds; ``None`` when no blink."""

    count: int
    per_second: float
    median_duration_s: float | None
    durations_s: tuple[float, ...]


def closed_runs(
    closure: np.ndarray, *, on: float = 0.25, off: float = 0.15, baseline: bool = True
) -> list[tuple[int, int]]:
    """``[start, stop)`` frame runs where the eyes are closed, by a hysteresis threshold.

    ``closure``: ``float [N]``, higher = more closed (MediaPipe ``eyeBlink`` mean, 0..1). A run starts
    when the signal exceeds ``on`` and lasts while it stays above ``off``. With ``baseline`` the
    thresholds are relative to the signal's median, because the resting ``eyeBlink`` score differs by
    person (0.02..0.15 on GRID speakers). NaN (no face) counts as open.
    """
    x = np.asarray(closure, dtype=np.float64)
    if baseline and np.isfinite(x).any():
        x = x - np.nanmedian(x)
    x = np.nan_to_num(x, nan=-np.inf)
    runs, start = [], None
    for i, v in enumerate(x):
        if start is None and v > on:
            start = i
        elif start is not None and v < off:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(x)))  # still closed at the last frame: count it, duration truncated
    return runs


def blink_stats(
    closure: np.ndarray,
    fps: float,
    *,
    on: float = 0.25,
    off: float = 0.15,
    min_frames: int = 1,
    baseline: bool = True,
) -> BlinkStats:
    """Blink rate (per second of video) and median blink duration from ``closure`` ``float [N]``.

    A blink is a closed run (:func:`closed_runs`) of at least ``min_frames`` frames; its duration is
    its frame count / ``fps``.
    """
    runs = [(a, b) for a, b in closed_runs(closure, on=on, off=off, baseline=baseline) if b - a >= min_frames]
    durations = tuple((b - a) / fps for a, b in runs)
    seconds = len(closure) / fps
    return BlinkStats(
        count=len(runs),
        per_second=len(runs) / seconds if seconds > 0 else math.nan,
        median_duration_s=float(np.median(durations)) if durations else None,
        durations_s=durations,
    )


# ----------------------------------------------------------------------------- lip-sync proxy


@dataclass(frozen=True)
class LipSync:
    """Best Pearson correlation of mouth opening vs loudness, and its lag (frames; > 0: mouth lags audio)."""

    corr: float
    lag: int


def loudness_envelope(
    audio: np.ndarray,
    sample_rate: int,
    n_frames: int,
    fps: float = 25.0,
    *,
    band: tuple[float, float] = (300.0, 3000.0),
    window_s: float = 0.064,
    floor_db: float = 60.0,
) -> np.ndarray:
    """Per-video-frame speech loudness in dB, ``float [n_frames]``, from mono ``audio`` ``float [S]``.

    Frame ``i`` covers ``[i/fps, (i+1)/fps)`` (40 ms at 25 fps); its value is the RMS spectral
    magnitude in ``band`` (the telephone speech band, which drops breath and hum) of a Hann window of
    ``window_s`` centred on the frame, in dB, floored at ``max - floor_db`` so silence does not
    dominate the correlation with -inf-like values.
    """
    if n_frames <= 0:
        return np.zeros(0)
    win = max(16, int(round(window_s * sample_rate)))
    centres = np.round((np.arange(n_frames) + 0.5) * sample_rate / fps).astype(np.int64)
    padded = np.pad(np.asarray(audio, dtype=np.float64), (win, int(centres[-1]) + win))
    segments = np.stack([padded[c + win - win // 2 : c + win - win // 2 + win] for c in centres])
    spectrum = np.abs(np.fft.rfft(segments * np.hanning(win), axis=1))
    freqs = np.fft.rfftfreq(win, 1.0 / sample_rate)
    in_band = (freqs >= band[0]) & (freqs <= band[1])
    db = 20.0 * np.log10(np.sqrt(np.mean(spectrum[:, in_band] ** 2, axis=1)) + 1e-10)
    return np.maximum(db, db.max() - floor_db)


def interpolate_nans(x: np.ndarray) -> np.ndarray:
    """Fill NaN (frames with no face) by linear interpolation, edge values held. ``[N] -> [N]``."""
    x = np.asarray(x, dtype=np.float64).copy()
    bad = ~np.isfinite(x)
    if bad.all() or not bad.any():
        return x
    idx = np.arange(len(x))
    x[bad] = np.interp(idx[bad], idx[~bad], x[~bad])
    return x


def detrend(x: np.ndarray, window: int) -> np.ndarray:
    """Subtract a centred moving average of ``window`` frames (edges held): a high-pass, ``[N] -> [N]``.

    Removes the slow speech-vs-silence shape that every utterance shares, so the correlation rests on
    syllable-rate (about 3-8 Hz) movement that is specific to the audio.
    """
    x = np.asarray(x, dtype=np.float64)
    if window <= 1:
        return x
    half = window // 2
    padded = np.pad(x, (half, window - 1 - half), mode="edge")
    return x - np.convolve(padded, np.ones(window) / window, mode="valid")


def lagged_pearson(mouth: np.ndarray, loud: np.ndarray, lag: int) -> float:
    """Pearson r of ``mouth[t + lag]`` vs ``loud[t]`` over the overlap; NaN if degenerate. Inputs ``[N]``."""
    n = min(len(mouth), len(loud))
    a, b = (mouth[lag:n], loud[: n - lag]) if lag >= 0 else (mouth[: n + lag], loud[-lag:n])
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def sync_curve(mouth: np.ndarray, loudness: np.ndarray, *, max_lag: int = 3, detrend_frames: int = 9) -> np.ndarray:
    """Pearson r of the high-passed mouth opening vs loudness at each lag ``-max_lag..max_lag``: ``[2 max_lag + 1]``.

    NaN where degenerate (a mouth that does not move). Averaging curves over clips gives a study's AV offset.
    """
    m = detrend(interpolate_nans(mouth), detrend_frames)
    e = detrend(np.asarray(loudness, dtype=np.float64), detrend_frames)
    return np.array([lagged_pearson(m, e, lag) for lag in range(-max_lag, max_lag + 1)])


def lip_sync_proxy(
    mouth: np.ndarray, loudness: np.ndarray, *, max_lag: int = 3, detrend_frames: int = 9
) -> LipSync:
    """Max over lags in ``[-max_lag, max_lag]`` of Pearson r(mouth opening, loudness envelope).

    ``mouth``, ``loudness``: ``float [N]`` per video frame (NaN in ``mouth`` interpolated). Both are
    high-passed by :func:`detrend` first. The default +-3 frames (+-120 ms at 25 fps) covers real
    audio-visual offsets; a wider window raises the chance level (the max of more noisy correlations).
    """
    curve = sync_curve(mouth, loudness, max_lag=max_lag, detrend_frames=detrend_frames)
    scored = [(float(r), lag) for r, lag in zip(curve, range(-max_lag, max_lag + 1)) if not math.isnan(r)]
    if not scored:
        return LipSync(corr=math.nan, lag=0)
    r, lag = max(scored, key=lambda t: (t[0], -abs(t[1])))
    return LipSync(corr=r, lag=lag)


SYNC_MAX_LAG = 5  # frames each way (+-200 ms at 25 fps): the AV offsets a mouth-vs-speech correlation may take


def speech_sync(mouth: np.ndarray, loudness: np.ndarray, *, max_lag: int = SYNC_MAX_LAG) -> LipSync:
    """Mouth opening vs speech envelope at the best lag in ``+-max_lag`` frames (the lag is an AV offset).

    :func:`lip_sync_proxy` with the wider lag window that a talking-head judgement uses. A mouth that does
    not move (a still photo) has no correlation: its ``corr`` is 0, not NaN, so it fails any gate.
    """
    sync = lip_sync_proxy(mouth, loudness, max_lag=max_lag)
    return LipSync(corr=0.0, lag=0) if math.isnan(sync.corr) else sync


# ----------------------------------------------------------------------------- mouth motion


@dataclass(frozen=True)
class MouthMotion:
    """How far a mouth moves: the 5-95% spread of its opening, and its std in each whole second.

    Correlations are blind to amplitude (a mouth that moves 3% as much as the speaker's can correlate as
    well); these are not. Units: :func:`dheads.engine.face.mouth_opening` (lip gap / eye distance).
    """

    spread: float
    std_per_second: tuple[float, ...]

    @property
    def std_per_second_mean(self) -> float:
        return float(np.mean(self.std_per_second)) if self.std_per_second else math.nan

    @property
    def std_per_second_max(self) -> float:
        return float(np.max(self.std_per_second)) if self.std_per_second else math.nan

    def to_dict(self) -> dict[str, float | list[float]]:
        """The ``mouth_*`` keys of ``dh-eval``'s JSON."""
        return {"mouth_spread": self.spread, "mouth_std_per_s": self.std_per_second_mean,
                "mouth_std_per_s_max": self.std_per_second_max, "mouth_std_per_second": list(self.std_per_second)}


def mouth_motion(mouth: np.ndarray, fps: float, *, lo: float = 5.0, hi: float = 95.0) -> MouthMotion:
    """:class:`MouthMotion` of a per-frame mouth opening ``float [N]`` (NaN = no face, interpolated).

    The std per second is taken over whole seconds only (a last partial second of < ``fps`` frames is
    dropped, unless it is the whole video).
    """
    x = interpolate_nans(mouth)
    if len(x) == 0 or not np.isfinite(x).any():
        return MouthMotion(spread=math.nan, std_per_second=())
    per = max(1, int(round(fps)))
    whole = [x[i:i + per] for i in range(0, len(x) - per + 1, per)] or [x]
    return MouthMotion(spread=float(np.percentile(x, hi) - np.percentile(x, lo)),
                       std_per_second=tuple(float(np.std(w)) for w in whole))


def ratio_to_real(value: float | None, real: float | None) -> float | None:
    """``value / real`` for a metric judged as closeness to real video; None where either is missing or real is 0."""
    if value is None or real is None or not math.isfinite(value) or not math.isfinite(real) or real == 0:
        return None
    return float(value / real)


def log_distance(ratio: float | None) -> float:
    """Two-sided distance of a ratio to real video, ``|ln ratio|``: 0 as real, the same for 2x and 0.5x;
    ``inf`` for a zero ratio (a still video), NaN where there is no ratio."""
    if ratio is None or not math.isfinite(ratio):
        return math.nan
    return math.inf if ratio <= 0 else abs(math.log(ratio))


# ----------------------------------------------------------------------------- fidelity (PSNR / SSIM)


def _luma(frame: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` or ``[H, W]`` -> ``float64 [H, W]`` BT.601 luma on the input's scale."""
    x = np.asarray(frame, dtype=np.float64)
    return x @ LUMA if x.ndim == 3 else x


def ssim(a: np.ndarray, b: np.ndarray, *, data_range: float = 255.0) -> float:
    """SSIM (Wang et al. 2004) of two frames ``[H, W(, 3)]`` on their luma; H, W >= 11.

    Standard constants: 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, L = ``data_range``;
    averaged over the 'valid' region (5-pixel border dropped), as the reference MATLAB code does.
    """
    x, y = _luma(a), _luma(b)
    if x.shape != y.shape or min(x.shape) < 11:
        raise ValueError(f"ssim needs equal shapes of at least 11x11, got {x.shape} and {y.shape}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(img: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(img, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)[5:-5, 5:-5]

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    num = (2 * mx * my + c1) * (2 * cov + c2)
    den = (mx * mx + my * my + c1) * (vx + vy + c2)
    return float(np.mean(num / den))


def psnr(a: np.ndarray, b: np.ndarray, *, data_range: float = 255.0, max_db: float = 100.0) -> float:
    """PSNR in dB of two frames ``[H, W(, 3)]`` over all channels; identical frames give ``max_db``."""
    mse = frame_mse(a, b)
    if mse <= data_range**2 * 10 ** (-max_db / 10):
        return max_db
    return float(10.0 * np.log10(data_range**2 / mse))


# ----------------------------------------------------------------------------- identity drift


@dataclass(frozen=True)
class Drift:
    """Distance from the identity frame over time: mean per 1-s bucket, linear slope per second, mean."""

    per_second: tuple[float, ...]
    slope_per_s: float
    mean: float


def drift_distance(frame: np.ndarray, identity: np.ndarray, box: Sequence[int] | None = None) -> float:
    """``1 - SSIM`` of ``frame`` vs ``identity`` (both ``[H, W(, 3)]``) inside ``box = (x0, y0, x1, y1)``."""
    if box is not None:
        x0, y0, x1, y1 = box
        frame, identity = frame[y0:y1, x0:x1], identity[y0:y1, x0:x1]
    return 1.0 - ssim(frame, identity)


def drift_summary(distances: np.ndarray, fps: float) -> Drift:
    """Bucket per-frame distances ``float [N]`` into whole seconds and fit ``d(t) = a + slope * t``.

    The slope is fitted on the per-frame values (``t = i / fps``); a positive slope means the video
    moves away from its identity frame as it goes on (the paper sees quality drop after 8-9 s).
    """
    d = np.asarray(distances, dtype=np.float64)
    if len(d) == 0:
        return Drift(per_second=(), slope_per_s=math.nan, mean=math.nan)
    t = np.arange(len(d)) / fps
    second = np.floor(t + 1e-9).astype(int)
    per_second = tuple(float(d[second == s].mean()) for s in range(second.max() + 1))
    slope = float(np.polyfit(t, d, 1)[0]) if len(d) >= 2 else 0.0
    return Drift(per_second=per_second, slope_per_s=slope, mean=float(d.mean()))


def identity_drift(
    frames: Iterable[np.ndarray], fps: float, *, identity: np.ndarray | None = None, box: Sequence[int] | None = None
) -> Drift:
    """:func:`drift_summary` of ``1 - SSIM`` of every frame vs ``identity`` (default: the first frame)."""
    distances = []
    for frame in frames:
        if identity is None:
            identity = frame
        distances.append(drift_distance(frame, identity, box))
    return drift_summary(np.array(distances), fps)


# ----------------------------------------------------------------------------- global colour


@dataclass(frozen=True)
class ColorStats:
    """Frame-to-frame colour flicker and colour drift from the identity frame, in levels of 255.

    ``flicker``: mean over consecutive pairs of :func:`color_distance` of their mean colours.
    ``drift_*``: :func:`color_distance` of each frame's mean colour from the identity's, summarised
    like the SSIM drift (:func:`drift_summary`: mean, 1-s buckets, least-squares slope per second)
    plus the max over frames.
    """

    flicker: float
    drift_mean: float
    drift_max: float
    drift_slope_per_s: float
    drift_per_second: tuple[float, ...]

    def to_dict(self) -> dict[str, float | list[float]]:
        """The ``color_*`` keys of ``dh-eval``'s JSON."""
        return {
            "color_flicker": self.flicker,
            "color_drift_mean": self.drift_mean,
            "color_drift_max": self.drift_max,
            "color_drift_slope_per_s": self.drift_slope_per_s,
            "color_drift_per_second": list(self.drift_per_second),
        }


def mean_color(frame: np.ndarray) -> np.ndarray:
    """Mean colour of a frame over all its pixels: RGB ``[H, W, 3]`` -> ``float64 [3]`` (``[H, W]`` -> ``[1]``)."""
    x = np.asarray(frame, dtype=np.float64)
    return x.reshape(-1, x.shape[2] if x.ndim == 3 else 1).mean(axis=0)


def color_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Distance of two mean colours ``[C]``: the mean over channels of ``|a - b|`` (levels of 255).

    The mean absolute change per channel, so a shift of every channel by ``d`` is ``d`` and a shift
    of one channel of three by ``d`` is ``d / 3``.
    """
    return float(np.mean(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def color_flicker(means: np.ndarray) -> float:
    """Mean over consecutive pairs of :func:`color_distance` of per-frame mean colours ``[N, C]``; NaN for N < 2.

    A video whose colour alternates between ``c + d`` and ``c - d`` scores ``2d``; a constant one 0.
    """
    m = np.asarray(means, dtype=np.float64)
    if len(m) < 2:
        return math.nan
    return float(np.mean(np.abs(np.diff(m, axis=0)), axis=1).mean())


def color_summary(means: np.ndarray, fps: float, identity: np.ndarray | None = None) -> ColorStats:
    """:class:`ColorStats` of per-frame mean colours ``[N, C]`` at ``fps``.

    ``identity``: the identity frame's mean colour ``[C]`` (default: the first frame's).
    """
    m = np.asarray(means, dtype=np.float64)
    if len(m) == 0:
        return ColorStats(math.nan, math.nan, math.nan, math.nan, ())
    ref = m[0] if identity is None else np.asarray(identity, dtype=np.float64)
    distances = np.mean(np.abs(m - ref), axis=1)
    drift = drift_summary(distances, fps)
    return ColorStats(
        flicker=color_flicker(m),
        drift_mean=drift.mean,
        drift_max=float(distances.max()),
        drift_slope_per_s=drift.slope_per_s,
        drift_per_second=drift.per_second,
    )


def color_metrics(frames: Iterable[np.ndarray], fps: float = 25.0, *, identity: np.ndarray | None = None) -> ColorStats:
    """Colour flicker and drift of frames in memory: uint8 ``[N, H, W, 3]`` (or an iterable of ``[H, W, 3]``).

    For a training or eval script that has the frames and no video file. ``identity``: the identity
    image ``[H', W', 3]`` (any size: only its mean colour counts; default: the first frame).
    ``dh-eval`` measures the same on frames resized to 128x128, which moves a mean colour by
    well under a level.
    """
    means = np.array([mean_color(f) for f in frames])
    return color_summary(means, fps, None if identity is None else mean_color(identity))


# ----------------------------------------------------------------------------- local shading drift

MOUTH_REGION = (0.30, 0.55, 0.70, 0.95)  # (x0, y0, x1, y1) fractions of a face crop: the mouth moves, so it is left out


def local_drift(frame: np.ndarray, identity: np.ndarray, *, blocks: int = 16, worst: int = 4,
                exclude: Sequence[float] | None = MOUTH_REGION) -> float:
    """Local shading drift of ``frame`` vs ``identity`` (equal ``[H, W(, 3)]``), levels of 255: the mean of the
    ``worst`` largest ``|mean luma difference|`` over a ``blocks`` x ``blocks`` grid of area means, blocks whose
    centre lies in ``exclude`` (the mouth, which moves) left out.

    A patch of the face growing darker over a long rollout (the eyes, on the demo's fine-tunes) moves a
    few blocks' means by tens of levels while the frame's mean colour (:func:`color_metrics`) and its grain
    hardly move; fine grain averages out inside a block. Calibrated on the 10-s strips in
    ``benchmarks/results/``: faces that stay stable score 10-18 after the first second (small head motion
    and blinks), the darkening ones climb past 25 within 5 s.
    """
    a, b = _luma(frame), _luma(identity)
    if a.shape != b.shape:
        raise ValueError(f"local_drift needs equal shapes, got {a.shape} and {b.shape}")
    size = (blocks, blocks)
    diff = np.abs(cv2.resize(a, size, interpolation=cv2.INTER_AREA) - cv2.resize(b, size, interpolation=cv2.INTER_AREA))
    if exclude is not None:
        centre = (np.arange(blocks) + 0.5) / blocks
        cx, cy = np.meshgrid(centre, centre)
        x0, y0, x1, y1 = exclude
        diff = np.where((cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1), 0.0, diff)
    return float(np.sort(diff.ravel())[-worst:].mean())


def local_drift_per_second(frames: Iterable[np.ndarray], identity: np.ndarray, fps: float) -> list[float]:
    """:func:`local_drift` of every frame vs ``identity``, averaged in whole seconds."""
    d = np.array([local_drift(f, identity) for f in frames])
    return list(drift_summary(d, fps).per_second)
