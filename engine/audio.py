"""Load speech for the audio encoders: any audio file or video soundtrack -> 16 kHz mono float32.

Pipeline stage: ``speech -> load + resample 16 kHz -> audio encoder``. Two readers share one
downmix and one resampler, so a file gives the same samples whichever reader decoded it:

* ``soundfile`` (libsndfile) for what it can open: wav, flac, ogg/vorbis, ogg/opus, mp3, aiff...
* ``PyAV`` (FFmpeg libraries, no ffmpeg binary) for the rest: m4a/aac, mp4/mov/mpg soundtracks...

Resampling is band-limited (``soxr``, high quality), never sample dropping. Channels are averaged.

Frame counting follows the authors' windowing (see :func:`num_frames`): one audio embedding per
25 fps video frame, ``n_frames = (n + 2560 - 3200) // 640 + 1`` at 16 kHz (200 for 8 s).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FPS = 25
# Peak below -80 dBFS counts as silence (digital zero, or dither only).
SILENCE_PEAK = 1e-4


class AudioError(ValueError):
    """A speech file cannot be used. The message is one line: the file, and what to fix."""


def num_frames(n_samples: int, samples_per_frame: int = SAMPLE_RATE // FPS) -> int:
    """Number of video frames (= audio embeddings) for ``n_samples`` of audio.

    The authors pad ``2 * spf`` zeros on each side and slide a ``5 * spf`` window with hop ``spf``
    (spf = samples per frame = 640 at 16 kHz / 25 fps), so
    ``n_frames = (n + 4 spf - 5 spf) // spf + 1``, i.e. ``(n + 2560 - 3200) // 640 + 1``.
    That equals ``n // spf``: 8 s = 128000 samples -> 200 frames. Never negative.
    """
    pad, window, hop = 2 * samples_per_frame, 5 * samples_per_frame, samples_per_frame
    return max(0, (int(n_samples) + 2 * pad - window) // hop + 1)


def check_silence(path: str | Path, samples: np.ndarray, mode: str = "warn") -> None:
    """What to do when ``samples`` peak below -80 dBFS: ``"warn"`` (log), ``"error"`` (AudioError) or ``"ignore"``."""
    if mode not in ("warn", "error", "ignore"):
        raise ValueError(f"silence must be warn, error or ignore, got {mode!r}")
    if mode == "ignore" or (samples.size and float(np.max(np.abs(samples))) >= SILENCE_PEAK):
        return
    what = f"{path}: audio is silent (peak below -80 dBFS)"
    if mode == "error":
        raise AudioError(f"{what}; give a file with speech, or allow silence (--allow-silence) for a face that "
                         "does not talk")
    log.warning("%s; the face will not talk", what)


def load_audio(
    path: str | Path, sample_rate: int = SAMPLE_RATE, fps: int = FPS, *, silence: str = "warn",
    max_decode_s: float | None = None,
) -> tuple[np.ndarray, int]:
    """Read ``path`` (audio file or a video's audio track) as mono float32 at ``sample_rate``.

    Returns ``(samples [n], sample_rate)``. Raises :class:`AudioError` when the file is missing,
    is not audio/video, has no audio track, is empty, or is shorter than one video frame
    (``sample_rate // fps`` samples). All-silent audio is handled per ``silence`` (``check_silence``).
    ``max_decode_s``: decode no more than about this many seconds (a server's cap: a 355 KB FLAC holds
    two hours of silence, 0.5 GB once decoded); the caller sees a longer file as more samples than that.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: file not found; check the path")
    if not path.is_file():
        raise AudioError(f"{path}: is not a file; give a path to an audio or video file")
    data, rate = _read_any(path, max_decode_s)
    mono = _to_mono(data)
    if mono.size == 0:
        raise AudioError(f"{path}: contains no audio samples (zero length); give a file with speech")
    _check_finite(path, mono)
    samples = _resample(mono, rate, sample_rate)
    _check_length(path, samples, sample_rate, fps)
    check_silence(path, samples, silence)
    return samples, sample_rate


def audio_seconds(path: str | Path) -> float | None:
    """The length a file's header states (no decoding), or None where it states none or cannot be read."""
    try:
        info = sf.info(str(path))
        if info.frames > 0 and info.samplerate > 0:
            return info.frames / info.samplerate
    except (sf.SoundFileError, RuntimeError):
        pass
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            return container.duration / av.time_base if container.duration else None
    except (av.error.FFmpegError, UnicodeDecodeError):
        return None


def _read_any(path: Path, max_s: float | None = None) -> tuple[np.ndarray, int]:
    """``(data [n, channels] float32, rate)`` from soundfile if it can open ``path``, else PyAV; at most about
    ``max_s`` seconds of it where given."""
    try:
        with sf.SoundFile(str(path)) as f:
            frames = -1 if max_s is None else int(math.ceil(max_s * f.samplerate)) + 1
            return f.read(frames=frames, dtype="float32", always_2d=True), int(f.samplerate)
    except (sf.SoundFileError, RuntimeError) as err:
        log.debug("soundfile cannot read %s (%s); trying PyAV", path, err)
    return _read_pyav(path, max_s)


def _read_pyav(path: Path, max_s: float | None = None) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of ``path`` with PyAV: ``(data [n, channels] float32, rate)``."""
    import av

    try:
        container = av.open(str(path))
    except av.error.FFmpegError as err:
        raise AudioError(
            f"{path}: not a readable audio or video file ({_short(err)}); "
            "give wav/flac/mp3/ogg/m4a or a video with sound"
        ) from None
    with container:
        if not container.streams.audio:
            kinds = ", ".join(f"{s.type} {s.codec_context.name}" for s in container.streams)
            raise AudioError(
                f"{path}: has no audio track (streams: {kinds or 'none'}); "
                "give a file with a soundtrack"
            )
        return _decode_stream(path, container, max_s)


def _decode_stream(path: Path, container, max_s: float | None = None) -> tuple[np.ndarray, int]:
    """Decode every frame of the first audio stream to planar float32 at its native rate (stopping once
    past ``max_s`` seconds where given).

    The rate is taken from the decoded frames (HE-AAC, for one, decodes to twice the rate its
    header states).
    """
    import av

    stream = container.streams.audio[0]
    # Only the sample format changes (layout and rate are kept): no resampling happens here.
    converter = av.AudioResampler(format="fltp")
    chunks: list[np.ndarray] = []
    rate = stream.codec_context.sample_rate or 0
    n = 0
    try:
        for frame in container.decode(stream):
            rate = frame.sample_rate or rate
            chunks += [out.to_ndarray() for out in converter.resample(frame)]
            n += frame.samples
            if max_s is not None and n > max_s * rate:
                break
        chunks += [out.to_ndarray() for out in converter.resample(None)]
    except av.error.FFmpegError as err:
        raise AudioError(
            f"{path}: audio track is corrupt ({_short(err)}); re-encode or give another file"
        ) from None
    if not chunks:
        return np.zeros((0, 1), np.float32), int(rate)
    return np.concatenate(chunks, axis=1).T.astype(np.float32, copy=False), int(rate)


def _to_mono(data: np.ndarray) -> np.ndarray:
    """Average channels: ``[n, channels] -> [n]`` float32."""
    return np.ascontiguousarray(data.mean(axis=1, dtype=np.float32))


def _resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited resampling with soxr (high quality); identity when the rates match."""
    if rate == target:
        return samples.astype(np.float32, copy=False)
    return soxr.resample(samples, rate, target, quality="HQ").astype(np.float32, copy=False)


def _check_finite(path: Path, samples: np.ndarray) -> None:
    """NaN or infinite samples are a corrupt file (float wav): refused, not called silent or encoded."""
    bad = int(samples.size - np.count_nonzero(np.isfinite(samples)))
    if bad:
        raise AudioError(f"{path}: {bad} of {samples.size} samples are NaN or infinite (a corrupt float file); "
                         "re-encode it or give another file")


def check_max_seconds(max_seconds: float | None) -> None:
    """``--max-seconds`` must be a finite number of seconds above zero (AudioError otherwise)."""
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
        raise AudioError(f"--max-seconds must be a positive number of seconds, got {max_seconds}")


def _check_length(path: Path, samples: np.ndarray, sample_rate: int, fps: int) -> None:
    minimum = sample_rate // fps
    if samples.size < minimum:
        raise AudioError(
            f"{path}: audio is {samples.size} samples ({1000 * samples.size / sample_rate:.1f} ms) "
            f"at {sample_rate} Hz, shorter than one video frame ({minimum} samples, "
            f"{1000 / fps:.0f} ms); give longer audio"
        )


def _short(err: Exception) -> str:
    """One line of an FFmpeg error, without the errno and file name PyAV adds."""
    text = getattr(err, "strerror", None) or str(err)
    return " ".join(str(text).split())[:160]
