"""Audio loading: formats, resampling, the frame-count rule, and one-line errors.

Round-trip tolerances (measured on cmu_arctic_a0007.wav, 4.0 s of 16 kHz speech):
* FLAC at 16 kHz is lossless on 16-bit input: exact.
* Lossless at 44.1/48 kHz stereo: the 16 -> 44.1 -> 16 kHz round trip through two soxr "HQ"
  resamplers loses the 7.6-8 kHz band edge: 39 dB SNR measured; we require 30 dB.
* Vorbis / Opus / MP3 (libsndfile, no added delay): 21.1-28.2 dB SNR, correlation >= 0.996
  measured; we require 18 dB and 0.99. A wrong rate or dropped samples drifts by whole periods over
  4 s and gives correlation near 0, so these bounds separate "same signal" from "broken".
* AAC in m4a written by PyAV keeps the encoder's 1024-sample priming delay (no edit list), so we
  align by cross-correlation (lag <= 1100 samples) first: correlation 0.988-0.9999 measured; >= 0.98.
"""

from __future__ import annotations

import logging

import av
import numpy as np
import pytest
import soundfile as sf
import soxr

from dheads.engine.audio import AudioError, load_audio, num_frames

SPEECH = "speech/cmu_arctic_a0007.wav"


@pytest.fixture(scope="module")
def speech(shared_data) -> np.ndarray:
    """4.0 s of 16 kHz mono speech, float32 ``[64000]``."""
    x, rate = sf.read(shared_data / SPEECH, dtype="float32")
    assert rate == 16000 and x.ndim == 1
    return x


# ---------------------------------------------------------------- frame-count rule


@pytest.mark.parametrize(
    "n, expected",
    [(0, 0), (1, 0), (639, 0), (640, 1), (1279, 1), (1280, 2), (47647, 74), (64000, 100), (128000, 200)],
)
def test_num_frames_rule(n, expected):
    assert num_frames(n) == expected


def test_num_frames_matches_authors_formula():
    for n in range(640, 200_000, 997):
        assert num_frames(n) == (n + 2560 - 3200) // 640 + 1 == n // 640
    # General form: pad 2 spf each side, window 5 spf, hop spf (e.g. 16 kHz at 50 fps).
    for n in range(320, 50_000, 331):
        assert num_frames(n, samples_per_frame=320) == (n + 1280 - 1600) // 320 + 1


# ---------------------------------------------------------------- formats and resampling


def _correlation_at_best_lag(a: np.ndarray, b: np.ndarray, max_lag: int) -> tuple[float, int]:
    """Max normalised correlation of ``a[lag:]`` with ``b`` over ``0 <= lag <= max_lag``."""
    best = (-1.0, 0)
    for lag in range(max_lag + 1):
        n = min(a.size - lag, b.size)
        x, y = a[lag : lag + n], b[:n]
        c = float(np.dot(x, y) / np.sqrt(np.dot(x, x) * np.dot(y, y)))
        best = max(best, (c, lag))
    return best


def _snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((test - ref) ** 2.0)))


def _write_av(path, signal: np.ndarray, rate: int, codec: str, layout: str) -> None:
    """Encode ``signal`` (mono, duplicated to every channel) with PyAV."""
    channels = 1 if layout == "mono" else 2
    planes = np.ascontiguousarray(np.tile(signal[None], (channels, 1)), dtype=np.float32)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


def test_wav_and_flac_load_exactly(speech, shared_data, tmp_path):
    x, rate = load_audio(shared_data / SPEECH)
    assert rate == 16000 and x.dtype == np.float32 and np.array_equal(x, speech)
    sf.write(tmp_path / "s.flac", speech, 16000, subtype="PCM_16")
    y, _ = load_audio(tmp_path / "s.flac")
    np.testing.assert_array_equal(y, speech)


@pytest.mark.parametrize(
    "ext, fmt, subtype, rate", [("flac", "FLAC", "PCM_16", 44100), ("wav", "WAV", "FLOAT", 48000)]
)
def test_lossless_stereo_high_rate_resampled(speech, tmp_path, ext, fmt, subtype, rate):
    up = soxr.resample(speech, 16000, rate)
    sf.write(tmp_path / f"s.{ext}", np.stack([up, up], axis=1), rate, format=fmt, subtype=subtype)
    y, out_rate = load_audio(tmp_path / f"s.{ext}")
    assert out_rate == 16000 and y.shape == speech.shape  # 4 s -> exactly 64000 samples
    assert _snr_db(speech, y) > 30.0


@pytest.mark.parametrize(
    "ext, fmt, subtype, rate",
    [
        ("ogg", "OGG", "VORBIS", 16000),
        ("ogg", "OGG", "VORBIS", 44100),
        ("opus", "OGG", "OPUS", 16000),
        ("opus", "OGG", "OPUS", 48000),
        ("mp3", "MP3", "MPEG_LAYER_III", 16000),
        ("mp3", "MP3", "MPEG_LAYER_III", 44100),
    ],
)
def test_lossy_round_trip(speech, tmp_path, ext, fmt, subtype, rate):
    src = speech if rate == 16000 else soxr.resample(speech, 16000, rate)
    sf.write(tmp_path / f"s.{ext}", np.stack([src, src], axis=1), rate, format=fmt, subtype=subtype)
    y, _ = load_audio(tmp_path / f"s.{ext}")
    assert y.shape == speech.shape
    corr, lag = _correlation_at_best_lag(y, speech, max_lag=0)
    assert corr > 0.99 and _snr_db(speech, y) > 18.0


@pytest.mark.parametrize(
    "name, codec, rate, layout",
    [
        ("s.m4a", "aac", 44100, "stereo"),
        ("s16.m4a", "aac", 16000, "mono"),
        ("s.mov", "pcm_s16le", 48000, "stereo"),
    ],
)
def test_pyav_containers(speech, tmp_path, name, codec, rate, layout):
    """m4a/mov are not libsndfile formats: these go through the PyAV reader."""
    src = soxr.resample(speech, 16000, rate) if rate != 16000 else speech
    _write_av(tmp_path / name, src, rate, codec, layout)
    y, out_rate = load_audio(tmp_path / name)
    assert out_rate == 16000 and y.dtype == np.float32 and y.ndim == 1
    assert abs(y.size - speech.size) <= 2048  # AAC priming + final partial frame
    corr, _ = _correlation_at_best_lag(y, speech, max_lag=1100)
    assert corr > 0.98


def test_resampling_is_band_limited(tmp_path):
    """44.1 kHz: 1 kHz tone kept at full amplitude; 10 kHz tone (above 8 kHz Nyquist) removed,
    not aliased to 6 kHz as sample dropping or linear interpolation would."""
    t = np.arange(44100 * 2) / 44100
    sig = 0.4 * np.sin(2 * np.pi * 1000 * t) + 0.4 * np.sin(2 * np.pi * 10000 * t)
    sf.write(tmp_path / "tones.wav", sig.astype(np.float32), 44100, subtype="FLOAT")
    y, _ = load_audio(tmp_path / "tones.wav")
    assert y.size == 32000
    spectrum = np.abs(np.fft.rfft(y[4000:20000] * np.hanning(16000))) / (16000 / 4)  # 1 Hz bins
    assert spectrum[1000] == pytest.approx(0.4, rel=0.02)
    assert spectrum[5900:6100].max() < 1e-3  # alias image of 10 kHz would sit at 6 kHz


def test_grid_video_soundtrack(shared_data):
    """GRID .mpg: MP2 audio at 44.1 kHz stereo -> 16 kHz mono of ~3.0 s, like PyAV's own resampler."""
    paths = sorted((shared_data / "grid").glob("*.mpg"))
    assert len(paths) >= 3
    for path in paths:
        x, rate = load_audio(path)
        assert rate == 16000 and x.dtype == np.float32 and x.ndim == 1
        assert 2.9 < x.size / 16000 < 3.1
        assert np.abs(x).max() > 0.05
        assert num_frames(x.size) in (74, 75)  # 3.0 s at 25 fps, less a part-frame of codec delay
    ref = _pyav_resampled(paths[0])
    corr, lag = _correlation_at_best_lag(load_audio(paths[0])[0], ref, max_lag=64)
    assert corr > 0.99, (corr, lag)


def _pyav_resampled(path) -> np.ndarray:
    """Independent reference: FFmpeg's swresample to 16 kHz mono float."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
    out = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            out += [f.to_ndarray().ravel() for f in resampler.resample(frame)]
    out += [f.to_ndarray().ravel() for f in resampler.resample(None)]
    return np.concatenate(out)


# ---------------------------------------------------------------- errors


def test_error_missing(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.wav: file not found; check the path$"):
        load_audio(tmp_path / "nope.wav")


def test_error_corrupt(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00garbage" * 50)
    msg = r"junk\.wav: not a readable audio or video file \(.*\); give wav"
    with pytest.raises(AudioError, match=msg):
        load_audio(tmp_path / "junk.wav")


def test_error_video_without_audio(tmp_path):
    path = tmp_path / "silent_film.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(5):
            img = np.full((64, 64, 3), 40 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode(None))
    msg = r"silent_film\.mp4: has no audio track \(streams: video mpeg4\); give a file with a soundtrack"
    with pytest.raises(AudioError, match=msg):
        load_audio(path)


def test_error_zero_length(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match=r"empty\.wav: contains no audio samples \(zero length\)"):
        load_audio(tmp_path / "empty.wav")


def test_error_shorter_than_one_frame(tmp_path):
    sf.write(tmp_path / "blip.wav", np.full(1500, 0.1, np.float32), 44100)  # 34 ms -> 544 samples
    msg = r"blip\.wav: audio is 544 samples .* shorter than one video frame \(640 samples, 40 ms\)"
    with pytest.raises(AudioError, match=msg):
        load_audio(tmp_path / "blip.wav")


def test_silent_audio_warns_and_loads(tmp_path, caplog):
    sf.write(tmp_path / "quiet.wav", np.zeros(16000, np.float32), 16000)
    with caplog.at_level(logging.WARNING, logger="dheads.engine.audio"):
        x, _ = load_audio(tmp_path / "quiet.wav")
    assert x.shape == (16000,)
    assert "quiet.wav: audio is silent" in caplog.text


def test_silent_audio_can_be_refused_or_ignored(tmp_path, caplog):
    path = tmp_path / "quiet.wav"
    sf.write(path, np.full(16000, 5e-5, np.float32), 16000)  # dither-level: below -80 dBFS
    with pytest.raises(AudioError, match=r"quiet\.wav: audio is silent \(peak below -80 dBFS\); give a file"):
        load_audio(path, silence="error")
    with caplog.at_level(logging.WARNING, logger="dheads.engine.audio"):
        x, _ = load_audio(path, silence="ignore")
    assert x.shape == (16000,) and caplog.text == ""
    sf.write(path, np.full(16000, 2e-4, np.float32), 16000)  # just above the threshold: speech-quiet, allowed
    assert load_audio(path, silence="error")[0].shape == (16000,)


def test_error_messages_are_one_line(tmp_path):
    (tmp_path / "junk.mp3").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(AudioError) as err:
        load_audio(tmp_path / "junk.mp3")
    assert "\n" not in str(err.value) and "junk.mp3" in str(err.value)
