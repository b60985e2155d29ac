"""Long speech never whole in memory (issue 30's last item): dh-run reads the file in blocks twice, and the Whisper
encoder's two streamed passes give the rows of the whole-clip path, bit for bit.

The whole-clip path (``WhisperEncoder.__call__`` on ``load_audio``'s samples) is the reference: pass 1 takes the
log-mel maximum the whole clip's clamp uses, pass 2 encodes batch by batch with the same plan.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from dheads.engine.audio import AudioFile, AudioScan, load_audio
from dheads.engine.config import AudioConfig
from dheads.engine.conditioning import audio_windows
from dheads.engine.encoders import load_encoder
from dheads.engine.encoders import whisper as wmod
from dheads.engine.encoders.whisper import N_FFT, WhisperEncoder, _PaddedClip

FACE = Path(__file__).resolve().parents[1] / "engine" / "assets" / "examples" / "face.png"


@pytest.fixture(scope="module")
def whisper() -> WhisperEncoder:
    return load_encoder(AudioConfig(encoder="whisper", dim=384, options={"model": "tiny.en"}))


def in_blocks(x: np.ndarray, size: int):
    return lambda: (x[i : i + size] for i in range(0, x.size, size))


@pytest.fixture(scope="module")
def speech70(shared_data) -> np.ndarray:
    """70 s of real speech (two clips over and over): 1750 rows, three 30 s windows."""
    a, _ = load_audio(shared_data / "speech/cmu_arctic_a0007.wav")
    b, _ = load_audio(shared_data / "speech/espeak_ng_en_us_16k.wav")
    return np.tile(np.concatenate([a, b]), 12)[: 70 * 16000 + 333]


@pytest.mark.parametrize("n", [1, 150, 200, 201, 202, 640, 5000, 480639])
def test_the_padded_clip_is_what_the_centred_stft_frames(n):
    """Reflect padding by 200 each side of the clip zero-padded to its length: the whole path's np.pad + stft."""
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    length = lambda m: max(m, 3000)  # noqa: E731
    want = np.pad(np.pad(x, (0, length(n) - n)), (N_FFT // 2, N_FFT // 2), mode="reflect")
    for size in (7, 199, 4096):
        clip = _PaddedClip((x[i : i + size] for i in range(0, n, size)), length)
        got = np.concatenate(list(clip))
        assert clip.n == n and clip.length == length(n)
        np.testing.assert_array_equal(got, want)


def test_streamed_rows_are_the_whole_clips_bits_on_real_speech(whisper, shared_data):
    """One window: a speech wav and a GRID clip's soundtrack (PyAV, 44.1 kHz, resampled), read as dh-run reads them."""
    for path in (shared_data / "speech/cmu_arctic_a0007.wav", shared_data / "grid/bbaf2n.mpg"):
        whole = whisper(load_audio(path)[0])
        streamed = whisper.encode_file(AudioFile(path).blocks)
        assert streamed.shape == whole.shape and torch.equal(streamed, whole), path


def test_streamed_rows_are_the_whole_clips_bits_over_several_windows(whisper, speech70):
    whole = whisper(speech70)
    assert whole.shape == (1750, 384)
    assert torch.equal(whisper.encode_file(in_blocks(speech70, 65536)), whole)
    # a batch per window: pass 2 reads forward across batches; odd blocks straddle every mel frame's edge
    one = load_encoder(AudioConfig(encoder="whisper", dim=384, options={"model": "tiny.en", "batch_size": 1}))
    assert torch.equal(one.encode_file(in_blocks(speech70, 4999)), whole)


def test_first_pass_peak_is_the_whole_clips_log_mel_max(whisper, speech70):
    first = whisper.first_pass(in_blocks(speech70, 12345)())
    n = speech70.size
    padded = np.pad(speech70, (0, whisper._mel_length(n) - n))
    log_spec = (4 * torch.from_numpy(wmod.log_mel_spectrogram(padded)) - 4)  # undo the scaling: the clamped max
    assert first.n_samples == n and float(first.peak) == pytest.approx(float(log_spec.max()), abs=1e-6)


def test_the_streamed_encoding_never_holds_the_clip(whisper, monkeypatch):
    """3 and 20 minutes of audio peak alike in numpy (a batch's span of samples, its windows' mel, the encoder's
    output: 26.5 MB both, measured), where the whole path's waveform alone is 77 MB at 20 min. The encoder itself
    is replaced by zeros (its memory is per batch)."""
    monkeypatch.setattr(WhisperEncoder, "encode_mel", lambda self, mel: np.zeros((mel.shape[0], 1500, 384), np.float32))
    block = np.full(16000, 0.01, np.float32)

    def peak(minutes: int) -> int:
        blocks = lambda: (block * (k % 7) for k in range(60 * minutes))  # noqa: E731
        tracemalloc.start()
        try:
            rows = whisper.encode_file(blocks)
            assert rows.shape == (60 * minutes * 25, 384)  # torch's: not traced, 1.5 KB a frame
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    short, long = peak(3), peak(20)
    assert long < short + (1 << 20) and long < 40 << 20, (short / 2**20, long / 2**20)


def test_dh_run_streams_long_speech_and_keeps_short_speech_whole(whisper, speech70, tmp_path):
    from dheads.engine.pipeline import TalkingHead

    wav = tmp_path / "long.wav"
    sf.write(wav, speech70, 16000, subtype="FLOAT")
    head = TalkingHead.open(threads=1)
    long = head.prepare(FACE, wav)
    assert long.samples is None and long.speech == AudioFile(wav)
    assert torch.equal(long.audio_emb, whisper(speech70))
    np.testing.assert_array_equal(np.concatenate(list(long.soundtrack())), speech70)  # the mp4's audio
    cut = head.prepare(FACE, wav, max_seconds=12)  # one window: whole, the samples --max-seconds kept before
    assert cut.speech is None and np.array_equal(cut.samples, speech70[: 12 * 16000])
    assert torch.equal(cut.audio_emb, whisper(speech70[: 12 * 16000]))


def test_the_scan_refuses_what_load_audio_refuses(tmp_path):
    quiet = tmp_path / "quiet.wav"
    sf.write(quiet, np.zeros(16000, np.float32), 16000)
    with pytest.raises(ValueError, match=r"quiet\.wav: audio is silent"):
        AudioScan(AudioFile(quiet)).result("error")
    blip = tmp_path / "blip.wav"
    sf.write(blip, np.full(544, 0.1, np.float32), 16000)
    with pytest.raises(ValueError, match=r"blip\.wav: audio is 544 samples .* shorter than one video frame"):
        AudioScan(AudioFile(blip)).result()
    with pytest.raises(ValueError, match=r"quiet\.wav: --max-seconds 0\.02 leaves less than one video frame"):
        AudioScan(AudioFile(quiet, max_seconds=0.02)).result("ignore")
    scan = AudioScan(AudioFile(quiet), keep=1000)
    assert scan.result("ignore") is None and scan.n == 16000  # longer than keep: not held


def test_frame_windows_gathered_per_frame_are_the_tables(monkeypatch):
    """The frame loop gathers each frame's audio window (2w+1 rows) instead of a table of all of them."""
    from dheads.engine.generate import _AudioWindows

    a, b = torch.randn(9, 4), torch.randn(4, 4)
    windows = _AudioWindows([a, b], 2, "cpu")
    out = torch.empty(2, 5, 4)
    wa, wb = audio_windows(a, 2), audio_windows(b, 2)
    for i in range(9):
        windows.fill(out, i)
        assert torch.equal(out[0], wa[i]) and torch.equal(out[1], wb[min(i, 3)])  # b ended: its last window


# The frame loop encodes streamed speech as its frames need it (issue 30: a frame before every window is encoded,
# and no more rows held than the frames' windows reach).

def _spied_rows(emb: torch.Tensor, size: int, events: list, fail_at: int | None = None):
    """``StreamedRows`` of ``emb`` in batches of ``size`` rows that records when each batch is made (and closed)."""
    from dheads.engine.encoders import EncoderError, StreamedRows

    def batches():
        try:
            for k, a in enumerate(range(0, emb.shape[0], size)):
                if k == fail_at:
                    raise EncoderError(f"speech.wav: audio is corrupt at batch {k}; re-encode or give another file")
                events.append(("batch", k))
                yield emb[a : a + size].clone()
        finally:
            events.append(("closed", None))

    return StreamedRows(emb.shape[0], emb.shape[1], batches)


@pytest.fixture(scope="module")
def small_loop():
    from dheads.engine.backends.pytorch import TorchDenoiser
    from dheads.engine.config import SMALL, SamplerConfig
    from dheads.engine.generate import LoopConfig
    from dheads.engine.model import random_unet

    g = torch.Generator().manual_seed(4)
    return (TorchDenoiser(random_unet(SMALL, std=0.05)), LoopConfig(sampler=SamplerConfig("ddim", 2)),
            torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.randn(60, 32, generator=g))


def _dh_encode_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "dh-encode" and t.is_alive()]


@pytest.mark.parametrize("ahead", [0, 1])
def test_the_first_frame_comes_before_the_last_batch_is_encoded(small_loop, ahead):
    """The same frames as from the whole embeddings; frame 0 is made once the first batch of rows is there."""
    from dheads.engine.generate import generate_frames

    den, cfg, ident, emb = small_loop
    want = list(generate_frames(den, ident, emb, config=cfg, seed=2))
    events: list = []
    got = []
    for i, x in enumerate(generate_frames(den, ident, _spied_rows(emb, 10, events), config=cfg, seed=2,
                                          encode_ahead=ahead)):
        events.append(("frame", i))
        got.append(x)
    assert len(got) == 60 and all(torch.equal(a, b) for a, b in zip(got, want))
    order = [e for e in events if e[0] != "closed"]
    assert order.index(("frame", 0)) < order.index(("batch", 5))
    # batch k is made once frame 10k - 2 needs row 10k (its window reaches 2 ahead), or `ahead` batches earlier;
    # frame j is handed out once frame j + 1 is made (the copy back to the host overlaps the next frame)
    for k in range(1 + ahead, 6):
        assert order.index(("batch", k)) > order.index(("frame", 10 * (k - ahead) - 4)), (k, order)
    assert ("closed", None) in events and not _dh_encode_threads()


def test_rows_behind_the_window_are_let_go(small_loop, monkeypatch):
    from dheads.engine import generate

    den, cfg, ident, emb = small_loop
    held = []
    rows = generate._RowFeed.rows

    def spy(self, a, b):
        out = rows(self, a, b)
        held.append(sum(t.shape[0] for _, t in self.held))
        return out

    monkeypatch.setattr(generate._RowFeed, "rows", spy)
    frames = list(generate.generate_frames(den, ident, _spied_rows(emb, 7, []), config=cfg, seed=2))
    assert len(frames) == 60 and len(held) == 60
    assert max(held) <= 14 and held[-1] <= 14  # the batches under a 5-row window: two of 7 rows, of 60 rows


def test_an_encoder_error_in_the_frame_loop_is_its_own_line(small_loop):
    from dheads.engine.encoders import EncoderError
    from dheads.engine.generate import generate_frames

    den, cfg, ident, emb = small_loop
    events: list = []
    made = []
    with pytest.raises(EncoderError, match=r"^speech\.wav: audio is corrupt at batch 2; re-encode or give another "
                                           r"file$"):
        for x in generate_frames(den, ident, _spied_rows(emb, 10, events, fail_at=2), config=cfg, seed=2,
                                 encode_ahead=1):
            made.append(x)
    assert 10 <= len(made) < 20 and not _dh_encode_threads()


def test_closing_the_frames_stops_the_encoder(small_loop):
    """Ctrl-C in dh-run or a server's cancel ends the frame generator: the producer stops and closes its file."""
    from dheads.engine.generate import generate_frames

    den, cfg, ident, emb = small_loop
    events: list = []
    frames = generate_frames(den, ident, _spied_rows(emb, 10, events), config=cfg, seed=2, encode_ahead=1)
    for _ in range(3):
        next(frames)
    frames.close()
    assert not _dh_encode_threads() and events[-1] == ("closed", None)
    assert max(k for e, k in events if e == "batch") <= 2  # the first batch, and at most ahead + 1 more


def test_dh_run_encodes_long_speech_while_making_frames(speech70, tmp_path):
    """``prepare(stream=True)`` (what render uses) leaves the rows to the frame loop: the same rows and frames."""
    from dheads.engine.encoders import StreamedRows
    from dheads.engine.pipeline import TalkingHead

    wav = tmp_path / "long.wav"
    sf.write(wav, speech70, 16000, subtype="FLOAT")
    head = TalkingHead.open(threads=1, device="cpu", backend="onnxruntime")
    whole = head.prepare(FACE, wav)
    streamed = head.prepare(FACE, wav, stream=True)
    assert isinstance(streamed.audio_emb, StreamedRows) and streamed.n_frames == whole.n_frames == 1750
    assert torch.equal(streamed.audio_emb.whole(), whole.audio_emb)
    sampler = head.default_sampler.override(steps=1)
    for a, b in zip(head.frames(whole, sampler=sampler), head.frames(streamed, sampler=sampler)):
        assert np.array_equal(a, b)
        break  # the first frames: the encoding of every batch is compared above
    assert not _dh_encode_threads()
