"""Long audio in bounded memory (issue 30: 4 s of speech + 2 h of silence peaked at 4.2 GB in dh-run).

Decoding, downmix and resampling go block by block (the result is the only array that grows with the file),
``--max-seconds`` decodes only that much, and the mp4 writer takes its audio as chunks, pulled as the video
needs them, into an mp4 whose soundtrack is the same as the whole array's.
"""

from __future__ import annotations

import tracemalloc

import av
import numpy as np
import pytest
import soundfile as sf
import soxr

from dheads.engine import audio as audio_mod
from dheads.engine.audio import load_audio
from dheads.engine.video import AUDIO_CHUNK, write_mp4

RATE = 22050  # resampled to 16 kHz on the way in
TONE_S, MINUTES = 3, 20


def tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


@pytest.fixture(scope="module")
def long_flac(tmp_path_factory):
    """3 s of tone, then 20 minutes of silence: 150 KB of FLAC, 77 MB once decoded at 16 kHz."""
    path = tmp_path_factory.mktemp("long") / "talk_then_silence.flac"
    with sf.SoundFile(str(path), "w", RATE, 1, format="FLAC", subtype="PCM_16") as f:
        f.write(tone(TONE_S, RATE))
        zeros = np.zeros(RATE * 60, np.float32)
        for _ in range(MINUTES):
            f.write(zeros)
    assert path.stat().st_size < 2_000_000
    return path


def traced(fn):
    """``(fn(), peak bytes numpy allocated while it ran)``."""
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def counting(monkeypatch) -> list[int]:
    """Spy on the resampler: the number of samples (at the file's rate) each read of the file decoded."""
    seen, real = [], audio_mod._resampled

    def spy(blocks, rate, target, counts):
        yield from real(blocks, rate, target, counts)
        seen.append(counts[0])

    monkeypatch.setattr(audio_mod, "_resampled", spy)
    return seen


def test_a_long_file_decodes_in_blocks_its_peak_is_the_result(long_flac):
    (samples, rate), peak = traced(lambda: load_audio(long_flac, silence="ignore"))
    n = (TONE_S + 60 * MINUTES) * 16000
    assert rate == 16000 and samples.size == n
    # decoded whole, then downmixed and resampled, it took 4 arrays (about 3.4x the result); block by block the
    # result is the one array that grows with the file
    assert peak < samples.nbytes * 1.1 + (8 << 20), (peak, samples.nbytes)
    start = np.concatenate([tone(TONE_S, RATE), np.zeros(RATE, np.float32)])
    head = soxr.resample(start, RATE, 16000, quality="HQ")[: TONE_S * 16000]
    np.testing.assert_allclose(samples[: TONE_S * 16000], head, atol=1e-4)  # 16-bit FLAC of the same tone
    assert not samples[(TONE_S + 1) * 16000 :].any()


def test_max_seconds_decodes_only_that_much(long_flac, monkeypatch):
    seen = counting(monkeypatch)
    (samples, _), peak = traced(lambda: load_audio(long_flac, silence="ignore", max_decode_s=2))
    assert seen == [2 * RATE + 1] and samples.size == round((2 * RATE + 1) * 16000 / RATE)
    assert peak < 2 << 20  # 20 minutes decoded would be 77 MB at 16 kHz


def test_dh_runs_max_seconds_decodes_only_that_much_and_keeps_the_same_samples(long_flac, monkeypatch):
    from dheads.engine.audio import DECODE_MARGIN_S
    from dheads.engine.pipeline import TalkingHead

    head = TalkingHead.open(threads=1)
    face = audio_mod.Path(__file__).resolve().parents[1] / "engine" / "assets" / "examples" / "face.png"
    seen = counting(monkeypatch)
    inputs = head.prepare(face, long_flac, max_seconds=2)
    assert seen == [int(np.ceil((2 + DECODE_MARGIN_S) * RATE)) + 1]  # ~2 s of 20 min
    assert inputs.samples.size == 32000 and inputs.n_frames == 50
    more, _ = load_audio(long_flac, silence="ignore", max_decode_s=3)  # cut elsewhere: the kept samples agree
    np.testing.assert_array_equal(inputs.samples, more[:32000])


def decoded_audio(path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as c:
        s = c.streams.audio[0]
        x = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(s)])
        return x, float(s.duration * s.time_base)


def test_chunked_mux_is_the_whole_arrays_soundtrack(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(50)]  # 2 s of video
    speech = tone(7.3, 16000)  # longer than the video: the rest goes in bounded frames at the end
    write_mp4(tmp_path / "whole.mp4", frames, audio=speech)
    write_mp4(tmp_path / "chunks.mp4", frames, audio=(speech[i : i + 999] for i in range(0, speech.size, 999)))
    (a, da), (b, db) = decoded_audio(tmp_path / "whole.mp4"), decoded_audio(tmp_path / "chunks.mp4")
    assert da == db and abs(da - 7.3) < 0.1 and a.size == b.size
    rms = lambda x: float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))  # noqa: E731
    assert rms(b) == pytest.approx(rms(a), rel=1e-3) and rms(b) == pytest.approx(rms(speech), rel=0.05)
    np.testing.assert_allclose(b, a, atol=1e-3)  # the encoder saw the same samples: AAC's own output agrees


def test_a_long_soundtrack_from_chunks_is_muxed_in_bounded_memory(tmp_path):
    minutes = 3
    chunk = tone(1.0, 16000)

    def source():
        for _ in range(60 * minutes):
            yield chunk

    frames = [np.zeros((16, 16, 3), np.uint8)] * 5
    _, peak = traced(lambda: write_mp4(tmp_path / "long.mp4", frames, audio=source()))
    _, seconds = decoded_audio(tmp_path / "long.mp4")
    assert abs(seconds - 60 * minutes) < 0.2
    assert peak < 2 << 20 and AUDIO_CHUNK * 4 < 2 << 20  # the whole track: 11.5 MB of float32
