"""Load speech for the audio encoders: any audio file or video soundtrack -> 16 kHz mono float32.

Pipeline stage: ``speech -> load + resample 16 kHz -> audio encoder``. Two readers share one
downmix and one resampler, so a file gives the same samples whichever reader decoded it:

* ``soundfile`` (libsndfile) for what it can open: wav, flac, ogg/vorbis, ogg/opus, mp3, aiff...
* ``PyAV`` (FFmpeg libraries, no ffmpeg binary) for the rest: m4a/aac, mp4/mov/mpg soundtracks...

Resampling is band-limited (``soxr``, high quality), never sample dropping. Channels are averaged.
Decoding, downmix and resampling go block by block (``BLOCK_FRAMES`` at the file's rate, soxr's streaming
resampler, bit-identical to resampling the whole), so the one array that grows with the file's length is
the 16 kHz mono result; ``max_decode_s`` stops the decoder near a bound (``dh-run --max-seconds``, the
server's cap), whatever the file's length. :class:`AudioFile` gives the same samples as blocks, as many times
as asked, and :class:`AudioScan` checks them in one pass (what ``load_audio`` refuses, it refuses with the
same message) without holding them unless they are short: long speech is never in memory whole.

Frame counting follows the authors' windowing (see :func:`num_frames`): one audio embedding per
25 fps video frame, ``n_frames = (n + 2560 - 3200) // 640 + 1`` at 16 kHz (200 for 8 s).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FPS = 25
# Peak below -80 dBFS counts as silence (digital zero, or dither only).
SILENCE_PEAK = 1e-4
BLOCK_FRAMES = 1 << 16  # frames (at the file's rate) decoded, downmixed and resampled at a time
# Decoded past a cut so the samples kept before it are those of the whole file (soxr HQ looks ~10 ms ahead).
DECODE_MARGIN_S = 0.1


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
    if mode != "ignore":  # the peak needs |samples|: a copy of them
        check_peak(path, float(np.max(np.abs(samples))) if samples.size else None, mode)


def check_peak(path: str | Path, peak: float | None, mode: str = "warn") -> None:
    """``check_silence`` of samples whose absolute peak is ``peak`` (None: no samples)."""
    if mode not in ("warn", "error", "ignore"):
        raise ValueError(f"silence must be warn, error or ignore, got {mode!r}")
    if mode == "ignore" or (peak is not None and peak >= SILENCE_PEAK):
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
    path = _check_path(path)
    rate, blocks, expected = _open_blocks(path, max_decode_s)
    samples, n_in, bad = _resample_blocks(blocks, rate, sample_rate, expected)
    _check_decoded(path, n_in, bad)
    _check_length(path, samples.size, sample_rate, fps)
    check_silence(path, samples, silence)
    return samples, sample_rate


@dataclass(frozen=True)
class AudioFile:
    """A speech file read block by block, as many times as asked: 16 kHz mono float32 blocks whose
    concatenation is ``load_audio``'s samples, cut to the first ``max_seconds`` where given (the samples
    ``load_audio(path, max_decode_s=max_seconds + DECODE_MARGIN_S)[0][:int(max_seconds * rate)]`` keeps)."""

    path: Path
    max_seconds: float | None = None
    sample_rate: int = SAMPLE_RATE

    def blocks(self, counts: list[int] | None = None) -> Iterator[np.ndarray]:
        """The samples in blocks (nothing decoded before iterating). ``counts``, where given, is
        ``[input samples decoded, non-finite ones among them, 16 kHz samples before the cut]``, updated as it goes."""
        counts = [0, 0, 0] if counts is None else counts
        path = _check_path(self.path)
        cut = None if self.max_seconds is None else self.max_seconds + DECODE_MARGIN_S
        rate, blocks, _ = _open_blocks(path, cut)
        left = None if self.max_seconds is None else int(self.max_seconds * self.sample_rate)
        for block in _resampled(blocks, rate, self.sample_rate, counts):
            counts[2] += block.size
            if left is not None:
                block, left = block[:left], left - min(left, block.size)
            if block.size:
                yield block


class AudioScan:
    """One pass over an :class:`AudioFile` that checks it as ``load_audio`` does, without holding it.

    Iterate it for the file's blocks (hand them on to a first encoder pass, or to nothing); then
    :meth:`result` raises what ``load_audio`` would (no samples, NaN, shorter than a frame, silent per
    ``silence``) and returns the samples whole where there are at most ``keep`` of them (None: any number),
    else None: read those again from the file.
    """

    def __init__(self, source: AudioFile, keep: int | None = None, fps: int = FPS):
        self.source, self.keep, self.fps = source, keep, fps
        self.n = 0  # samples seen (after the cut)
        self._counts = [0, 0, 0]
        self._peak: float | None = None
        self._whole: _Growing | None = _Growing(1 << 16)
        self._done = False

    def __iter__(self) -> Iterator[np.ndarray]:
        for block in self.source.blocks(self._counts):
            self.n += block.size
            peak = float(np.max(np.abs(block)))
            self._peak = peak if self._peak is None or not peak <= self._peak else self._peak
            if self._whole is not None:
                if self.keep is not None and self.n > self.keep:
                    self._whole = None  # long: read again from the file when needed
                else:
                    self._whole.add(block)
            yield block
        self._done = True

    def result(self, silence: str = "warn") -> np.ndarray | None:
        """Check what was scanned (the whole file: reads what was not); the samples where kept, else None."""
        if not self._done:
            for _ in self:
                pass
        path, rate = self.source.path, self.source.sample_rate
        _check_decoded(path, self._counts[0], self._counts[1])
        _check_length(path, self._counts[2], rate, self.fps)  # the file's own length (before --max-seconds)
        if self.n < rate // self.fps:
            raise AudioError(f"{path}: --max-seconds {self.source.max_seconds} leaves less than one video frame "
                             "of audio")
        check_peak(path, self._peak, silence)
        return None if self._whole is None else self._whole.result()


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


def _check_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: file not found; check the path")
    if not path.is_file():
        raise AudioError(f"{path}: is not a file; give a path to an audio or video file")
    return path


def _check_decoded(path: Path, n_in: int, bad: int) -> None:
    if n_in == 0:
        raise AudioError(f"{path}: contains no audio samples (zero length); give a file with speech")
    if bad:  # NaN or infinite samples are a corrupt file (float wav): refused, not called silent or encoded
        raise AudioError(f"{path}: {bad} of {n_in} samples are NaN or infinite (a corrupt float file); "
                         "re-encode it or give another file")


def _open_blocks(path: Path, max_s: float | None = None) -> tuple[int, Iterator[np.ndarray], int | None]:
    """``(rate, mono float32 blocks at that rate, frames expected or None)``: soundfile if it can open
    ``path``, else PyAV; at most about ``max_s`` seconds where given. Nothing is decoded before iterating."""
    try:
        f = sf.SoundFile(str(path))
    except (sf.SoundFileError, RuntimeError) as err:
        log.debug("soundfile cannot read %s (%s); trying PyAV", path, err)
    else:
        rate = int(f.samplerate)
        limit = -1 if max_s is None else int(math.ceil(max_s * rate)) + 1
        expected = f.frames if f.frames > 0 else None
        if expected is not None and limit >= 0:
            expected = min(expected, limit)
        return rate, _sf_blocks(f, limit), expected
    return _pyav_blocks(path, max_s)


def _sf_blocks(f: sf.SoundFile, frames: int) -> Iterator[np.ndarray]:
    with f:
        try:
            for block in f.blocks(blocksize=BLOCK_FRAMES, frames=frames, dtype="float32", always_2d=True):
                yield _to_mono(block)
        except (sf.SoundFileError, RuntimeError) as err:
            raise AudioError(f"{f.name}: audio is corrupt ({' '.join(str(err).split())[:160]}); re-encode or "
                             "give another file") from None


def _pyav_blocks(path: Path, max_s: float | None) -> tuple[int, Iterator[np.ndarray], int | None]:
    """PyAV's side of ``_open_blocks``. The rate is the first decoded frame's (HE-AAC, for one, decodes to
    twice the rate its header states), so the first frame is decoded here."""
    import av

    try:
        container = av.open(str(path))
    except av.error.FFmpegError as err:
        raise AudioError(
            f"{path}: not a readable audio or video file ({_short(err)}); "
            "give wav/flac/mp3/ogg/m4a or a video with sound"
        ) from None
    if not container.streams.audio:
        kinds = ", ".join(f"{s.type} {s.codec_context.name}" for s in container.streams)
        container.close()
        raise AudioError(f"{path}: has no audio track (streams: {kinds or 'none'}); give a file with a soundtrack")
    frames = _decode_blocks(path, container, max_s)
    try:
        first = next(frames)
    except StopIteration:
        return 0, iter(()), 0
    except BaseException:
        frames.close()
        raise
    rate, block = first

    def blocks() -> Iterator[np.ndarray]:
        yield block
        for _, b in frames:
            yield b

    return rate, blocks(), None


def _decode_blocks(path: Path, container, max_s: float | None) -> Iterator[tuple[int, np.ndarray]]:
    """``(rate, mono float32 block)`` per decoded frame of the first audio stream, at its native rate; stops
    once past ``max_s`` seconds where given. Closes ``container``."""
    import av

    with container:
        stream = container.streams.audio[0]
        converter = av.AudioResampler(format="fltp")  # only the sample format changes: no resampling here
        rate = stream.codec_context.sample_rate or 0
        n = 0
        try:
            for frame in container.decode(stream):
                rate = frame.sample_rate or rate
                for out in converter.resample(frame):
                    yield int(rate), out.to_ndarray().mean(axis=0, dtype=np.float32)
                n += frame.samples
                if max_s is not None and n > max_s * rate:
                    break
            for out in converter.resample(None):
                yield int(rate), out.to_ndarray().mean(axis=0, dtype=np.float32)
        except av.error.FFmpegError as err:
            raise AudioError(
                f"{path}: audio track is corrupt ({_short(err)}); re-encode or give another file"
            ) from None


def _resample_blocks(blocks: Iterator[np.ndarray], rate: int, target: int,
                     expected: int | None = None) -> tuple[np.ndarray, int, int]:
    """Mono blocks at ``rate`` -> ``(samples at target, input samples seen, non-finite ones among them)``,
    through soxr's streaming resampler (the same samples as resampling the whole). ``expected``: the input's
    length where known, to size the result once."""
    ratio = target / rate if rate > 0 else 1.0
    out = _Growing(int(expected * ratio) + 64 if expected else 1 << 16)
    counts = [0, 0]
    for x in _resampled(blocks, rate, target, counts):
        out.add(x)
    return out.result(), counts[0], counts[1]


def _resampled(blocks: Iterable[np.ndarray], rate: int, target: int, counts: list[int]) -> Iterator[np.ndarray]:
    """Mono blocks at ``rate`` -> blocks at ``target`` (soxr's streaming resampler: the same samples as resampling
    the whole). ``counts[0]`` and ``counts[1]`` grow by the input samples seen and the non-finite ones among them."""
    stream = None if rate == target or rate <= 0 else soxr.ResampleStream(rate, target, 1, dtype="float32",
                                                                          quality="HQ")
    for block in blocks:
        counts[0] += block.size
        counts[1] += int(block.size - np.count_nonzero(np.isfinite(block)))
        yield block if stream is None else stream.resample_chunk(block, last=False)
    if stream is not None:
        yield stream.resample_chunk(np.zeros(0, np.float32), last=True)


class _Growing:
    """A float32 array appended to in place (doubling when full): no list of pieces and no concatenation,
    so the peak is the result, not twice it, when the first size was right."""

    def __init__(self, capacity: int):
        self._buf, self.n = np.empty(max(1, capacity), np.float32), 0

    def add(self, x: np.ndarray) -> None:
        if self.n + x.size > self._buf.size:
            bigger = np.empty(max(2 * self._buf.size, self.n + x.size), np.float32)
            bigger[: self.n] = self._buf[: self.n]
            self._buf = bigger
        self._buf[self.n : self.n + x.size] = x
        self.n += x.size

    def result(self) -> np.ndarray:
        if self.n < 0.9 * self._buf.size:  # a first size far off: do not keep the spare room alive
            return self._buf[: self.n].copy()
        return self._buf[: self.n]


def _to_mono(data: np.ndarray) -> np.ndarray:
    """Average channels: ``[n, channels] -> [n]`` float32."""
    return np.ascontiguousarray(data.mean(axis=1, dtype=np.float32))


def check_max_seconds(max_seconds: float | None) -> None:
    """``--max-seconds`` must be a finite number of seconds above zero (AudioError otherwise)."""
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
        raise AudioError(f"--max-seconds must be a positive number of seconds, got {max_seconds}")


def _check_length(path: Path, n: int, sample_rate: int, fps: int) -> None:
    minimum = sample_rate // fps
    if n < minimum:
        raise AudioError(
            f"{path}: audio is {n} samples ({1000 * n / sample_rate:.1f} ms) "
            f"at {sample_rate} Hz, shorter than one video frame ({minimum} samples, "
            f"{1000 / fps:.0f} ms); give longer audio"
        )


def _short(err: Exception) -> str:
    """One line of an FFmpeg error, without the errno and file name PyAV adds."""
    text = getattr(err, "strerror", None) or str(err)
    return " ".join(str(text).split())[:160]
