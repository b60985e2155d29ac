"""Audio encoders: SDA (TorchScript vs eager, per-window vs whole clip) and Whisper (tiny.en).

No SDA weights exist outside the user's ``audio_encoder.pt``, so the SDA tests script a seeded
:class:`SDAEncoder` (with non-trivial BatchNorm statistics) to a file and treat that file as the
release. Tolerance 1e-5 absolute: outputs are GRU states in (-1, 1); the only differences are
float32 summation orders (batched vs single-window conv), measured at 4e-8.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dheads.engine.audio import load_audio, num_frames
from dheads.engine.config import AudioConfig
from dheads.engine.encoders import AudioEncoder, EncoderError, load_encoder
from dheads.engine.encoders.sda import (
    EagerSDA,
    SDAClip,
    SDAEncoder,
    TorchScriptSDA,
    encode_windowed,
    frame_windows,
    load_torchscript_weights,
)
from dheads.engine.encoders.whisper import (
    WhisperEncoder,
    bundled_model_path,
    chunk_plan,
    log_mel_spectrogram,
    mel_filters,
)

from _sda import seeded_sda

SDA_TOL = 1e-5


@pytest.fixture(scope="module")
def speech(shared_data) -> np.ndarray:
    x, _ = load_audio(shared_data / "speech/cmu_arctic_a0007.wav")
    return x  # [64000], 4.0 s -> 100 frames


@pytest.fixture(scope="module")
def sda_module() -> SDAEncoder:
    return seeded_sda()


@pytest.fixture(scope="module")
def sda_file(sda_module, tmp_path_factory):
    """A stand-in for the released ``audio_encoder.pt``: the seeded module, scripted and saved."""
    path = tmp_path_factory.mktemp("sda") / "audio_encoder.pt"
    torch.jit.script(sda_module).save(str(path))
    return path


# ---------------------------------------------------------------- SDA


def test_sda_window_collapses_to_one_gru_step():
    # 3200 -> 200 -> 100 -> 50 -> 25 -> 5 -> 1 (see CONV_BLOCKS in sda.py)
    assert SDAEncoder().encoder(torch.zeros(3, 1, 3200)).shape == (3, 256, 1)


def test_sda_state_dict_names():
    names = list(SDAEncoder().state_dict())
    assert names[:7] == [
        "encoder.0.0.weight", "encoder.0.0.bias", "encoder.0.1.weight", "encoder.0.1.bias",
        "encoder.0.1.running_mean", "encoder.0.1.running_var", "encoder.0.1.num_batches_tracked",
    ]
    assert "encoder.5.0.weight" in names and names[-1] == "rnn.bias_hh_l1" and len(names) == 45


def test_sda_forward_signature(sda_module):
    x, lengths, h0 = torch.randn(2, 1, 3200), torch.LongTensor([3200, 3200]), torch.zeros(2, 2, 256)
    emb, code, h = sda_module(x, lengths, init_state=h0)
    assert emb.shape == (2, 256) and code.shape == (2, 256) and h.shape == (2, 2, 256)


def test_frame_windows_are_the_authors_slices(speech):
    x = torch.from_numpy(speech[:12345])
    windows = frame_windows(x)
    padded = torch.nn.functional.pad(x, (1280, 1280))
    assert windows.shape == (num_frames(12345), 1, 3200) == (19, 1, 3200)
    for i in (0, 7, 18):
        assert torch.equal(windows[i, 0], padded[i * 640 : i * 640 + 3200])


def test_torchscript_matches_eager_loop_and_whole_clip(sda_module, sda_file, speech):
    scripted = TorchScriptSDA(sda_file)
    eager = EagerSDA(sda_module)
    ref = scripted(speech)
    assert ref.shape == (100, 256) and ref.dtype == torch.float32
    assert (eager.windowed(speech) - ref).abs().max() <= SDA_TOL
    assert (eager(speech) - ref).abs().max() <= SDA_TOL


def test_gru_state_is_carried(sda_module, speech):
    """Resetting h per window changes the output: the carry is real, and the clip path keeps it."""
    windows = frame_windows(torch.from_numpy(speech))  # [100, 1, 3200]
    with torch.no_grad():  # a batch of windows, each from h = 0: no carry
        no_carry = sda_module(windows, torch.full((100,), 3200), None)[0]
    assert (EagerSDA(sda_module)(speech) - no_carry).abs().max() > 1e-2


def test_eager_takes_the_scripted_weights(sda_module, sda_file, speech):
    eager = EagerSDA.from_torchscript(sda_file)  # also self-checks against the file on 1 s
    assert torch.equal(eager(speech), EagerSDA(sda_module)(speech))  # the file's weights, exactly


class _OtherNames(nn.Module):
    """The same network under other attribute names, as a foreign TorchScript might have."""

    def __init__(self, src: SDAEncoder):
        super().__init__()
        self.conv_stack = src.encoder
        self.gru = src.rnn

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, init_state: torch.Tensor):
        code = self.conv_stack(x).transpose(1, 2)
        out, h = self.gru(code, init_state)
        return out[:, -1], code[:, -1], h


def test_weights_map_by_order_when_names_differ(sda_module, speech, tmp_path):
    path = tmp_path / "renamed.pt"
    torch.jit.script(_OtherNames(sda_module)).save(str(path))
    scripted = torch.jit.load(str(path))
    assert "gru.weight_ih_l0" in scripted.state_dict()
    fresh = SDAEncoder()
    load_torchscript_weights(fresh, scripted.state_dict())
    ref = encode_windowed(scripted, torch.from_numpy(speech[:16000]))
    assert (EagerSDA(fresh)(speech[:16000]) - ref).abs().max() <= SDA_TOL


def test_weights_mismatch_is_a_clear_error(sda_module):
    state = {f"x.{k}": v for k, v in sda_module.state_dict().items()}
    state["x.encoder.1.0.weight"] = torch.zeros(32, 16, 5)
    msg = r"x\.encoder\.1\.0\.weight has shape \(32, 16, 5\) but encoder\.1\.0\.weight needs \(32, 16, 4\)"
    with pytest.raises(EncoderError, match=msg):
        load_torchscript_weights(SDAEncoder(), state)
    state.pop("x.rnn.bias_hh_l1")
    with pytest.raises(EncoderError, match=r"the file has 39 tensors, SDAEncoder expects 40"):
        load_torchscript_weights(SDAEncoder(), state)


def test_sda_frame_counts(sda_module):
    enc = EagerSDA(sda_module)
    rng = np.random.default_rng(0)
    for n in (0, 639, 640, 641, 1279, 12345, 32000):
        x = (0.1 * rng.standard_normal(n)).astype(np.float32)
        assert enc(x).shape == (num_frames(n), 256)


@pytest.mark.filterwarnings("ignore")  # tracer and constant-folding chatter from the exporter
def test_sda_onnx_export_whole_clip(sda_module, speech, tmp_path):
    """SDAClip exports with a dynamic sample count (legacy exporter; ONNX GRU op) and matches."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = tmp_path / "sda.onnx"
    clip = SDAClip(sda_module).eval()
    torch.onnx.export(
        clip, (torch.from_numpy(speech),), str(path), input_names=["samples"],
        output_names=["emb"], dynamic_axes={"samples": {0: "n"}}, dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (64000, 23685):
        x = speech[:n]
        out = session.run(None, {"samples": x})[0]
        assert out.shape == (num_frames(n), 256)
        assert np.abs(out - EagerSDA(sda_module)(x).numpy()).max() <= SDA_TOL


def test_load_encoder_sda(sda_file, speech):
    eager = load_encoder(AudioConfig(), sda_file)
    scripted = load_encoder(AudioConfig(options={"backend": "torchscript"}), sda_file)
    assert isinstance(eager, EagerSDA) and isinstance(scripted, TorchScriptSDA)
    for enc in (eager, scripted):
        assert isinstance(enc, AudioEncoder) and enc.name == "sda" and enc.dim == 256
        assert enc.config.encoder == "sda"
    x = speech[:16000]
    assert (eager(x) - scripted(x)).abs().max() <= SDA_TOL


class _DifferentForward(SDAEncoder):
    """Same weights and names, different computation: the eager copy cannot reproduce it."""

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, init_state: torch.Tensor):
        code = self.encoder(x).transpose(1, 2)
        out, h = self.rnn(code, init_state)
        return 0.5 * out[:, -1], code[:, -1], h


def test_load_encoder_checks_the_eager_copy(sda_module, tmp_path, caplog):
    path = tmp_path / "odd.pt"
    odd = _DifferentForward().eval()
    odd.load_state_dict(sda_module.state_dict())
    torch.jit.script(odd).save(str(path))
    with pytest.raises(EncoderError, match=r"odd\.pt: eager copy differs from the TorchScript by"):
        load_encoder(AudioConfig(options={"backend": "eager"}), path)
    with caplog.at_level("WARNING", logger="dheads.engine.encoders"):
        enc = load_encoder(AudioConfig(), path)  # backend "auto"
    assert isinstance(enc, TorchScriptSDA) and "running the TorchScript file as is" in caplog.text


def test_load_encoder_errors(tmp_path):
    msg = r"^unknown audio encoder 'wav2vec' in AudioConfig; use one of sda, whisper$"
    with pytest.raises(EncoderError, match=msg):
        load_encoder(AudioConfig(encoder="wav2vec"))
    with pytest.raises(EncoderError, match=r"needs the released audio_encoder\.pt; pass it with --audio-encoder"):
        load_encoder(AudioConfig())
    with pytest.raises(EncoderError, match=r"missing\.pt: SDA weights file not found"):
        load_encoder(AudioConfig(), tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(EncoderError, match=r"bad\.pt: not a TorchScript file \(.*\); pass the released"):
        load_encoder(AudioConfig(), tmp_path / "bad.pt")
    with pytest.raises(EncoderError, match=r"no CTranslate2 Whisper model \(model\.bin\) there"):
        load_encoder(AudioConfig(encoder="whisper", dim=384), tmp_path)
    with pytest.raises(EncoderError, match=r"only Whisper tiny\.en is bundled, not 'small'"):
        load_encoder(AudioConfig(encoder="whisper", dim=384, options={"model": "small"}))


# ---------------------------------------------------------------- Whisper


@pytest.fixture(scope="module")
def whisper() -> WhisperEncoder:
    return load_encoder(AudioConfig(encoder="whisper", dim=384, options={"model": "tiny.en"}))


def test_mel_filters_shape_and_triangles():
    f = mel_filters(80)
    assert f.shape == (80, 201) and f.dtype == np.float32 and (f >= 0).all()
    peaks = f.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all() and peaks[-1] > 185  # increasing centres up to ~7.7 kHz
    # Slaney norm: each triangle has unit area in Hz (to the 40 Hz bin sampling: 0.96-1.07).
    assert np.allclose(f.sum(axis=1) * 40.0, 1.0, atol=0.1)


def test_log_mel_shape():
    assert log_mel_spectrogram(np.zeros(16000, np.float32)).shape == (80, 100)


def test_log_mel_is_what_whisper_expects(whisper, speech):
    """Golden check of the front end: tiny.en decodes our features to the right words."""
    mel = log_mel_spectrogram(np.pad(speech, (0, 480000 - speech.size)))[None]
    import ctranslate2

    sot, no_timestamps = 50257, 50362  # tiny.en: <|startoftranscript|>, <|notimestamps|>
    features = ctranslate2.StorageView.from_array(mel)
    result = whisper.model.generate(features, [[sot, no_timestamps]], beam_size=1)
    vocab = (bundled_model_path() / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    text = "".join(vocab[i] for i in result[0].sequences_ids[0]).replace("\u0120", " ").strip().lower()
    assert text.rstrip(".") == "and you always want to see it in the superlative degree"


def test_whisper_shape_and_determinism(whisper, speech):
    a = whisper(speech)
    assert a.shape == (100, 384) and a.dtype == torch.float32
    assert torch.equal(a, whisper(speech))
    assert isinstance(whisper, AudioEncoder) and whisper.name == "whisper" and whisper.dim == 384


def test_whisper_frame_counts(whisper):
    rng = np.random.default_rng(1)
    for n in (639, 640, 641, 12345, 480639, 480640):  # 480640 = 751 rows: two windows
        x = (0.05 * rng.standard_normal(n)).astype(np.float32)
        assert whisper(x).shape == (num_frames(n), 384)


def test_whisper_speech_vs_silence(whisper, speech):
    """2 s silence, 4 s speech, 2 s silence: speech rows are far from the silent rows.

    Measured: cosine to the centroid of the first 40 (silent) rows is 0.86 for those rows and
    0.29 for speech rows; the closest speech row is 20.5 from any of them, the median distance
    between two silent rows 12.8. (Silent rows are not zero: attention carries the context.)
    """
    x = np.concatenate([np.zeros(32000, np.float32), speech, np.zeros(32000, np.float32)])
    rows = whisper(x)
    assert rows.shape == (200, 384)
    rms = np.sqrt(np.mean(x.reshape(-1, 640) ** 2, axis=1))
    speech_rows, silent_rows = rows[torch.from_numpy(rms > 0.05)], rows[:40]
    assert len(speech_rows) > 30
    centroid = silent_rows.mean(0, keepdim=True)
    cos = torch.nn.functional.cosine_similarity
    assert cos(silent_rows, centroid).mean() > 0.75 and cos(speech_rows, centroid).mean() < 0.5
    assert torch.cdist(speech_rows, silent_rows).min() > torch.cdist(silent_rows, silent_rows).median()


def test_chunk_plan_tiles_rows_with_context():
    for n in list(range(1, 3000, 37)) + [750, 751, 1000, 1250, 1251]:
        plan = chunk_plan(n, window=750, margin=125)
        kept = np.concatenate([np.arange(c.keep_from, c.keep_to) for c in plan])
        assert np.array_equal(kept, np.arange(n))
        for c in plan:
            assert c.start <= c.keep_from < c.keep_to <= c.start + 750
            assert c.keep_from == 0 or c.keep_from - c.start >= 125
            assert c.keep_to == n or c.start + 750 - c.keep_to >= 125


def test_whisper_long_audio_has_no_seam(whisper, shared_data):
    """40 s: rows = num_frames; around the seam at row 625 (windows at 0 and 500), the stitched rows
    match a single 30 s window starting at row 300 (seam at its position 325, no seam there).

    Measured: cosine mean 0.938 / min 0.66 over rows 575-675. For scale: a plain cut (30 s + 10 s,
    no overlap) compared the same way around its cut gives mean 0.72 / min 0.34; raw features
    (no silence subtraction) 0.57 / 0.32; unrelated speech rows 0.28. We require mean > 0.85 and
    min > 0.5, and the step across the seam no larger than the 95th percentile of all steps
    (measured 12.7 vs median 14.1; with raw features the seam step is 24.2).
    """
    a, _ = load_audio(shared_data / "speech/cmu_arctic_a0007.wav")
    b, _ = load_audio(shared_data / "speech/espeak_ng_en_us_16k.wav")
    x = np.tile(np.concatenate([a, b]), 4)[: 40 * 16000]
    rows = whisper(x)
    assert rows.shape == (1000, 384)
    single = whisper(x[300 * 640 : 300 * 640 + 480000])  # one window covering 12-32 s
    near = slice(575, 675)
    same = slice(near.start - 300, near.stop - 300)
    cos = torch.nn.functional.cosine_similarity(rows[near], single[same], dim=1)
    assert cos.mean() > 0.85 and cos.min() > 0.5, (cos.mean(), cos.min())
    steps = (rows[1:] - rows[:-1]).norm(dim=1)
    assert steps[624] <= steps.quantile(0.95), (steps[624], steps.quantile(0.95))


def test_whisper_config_errors():
    msg = r"Whisper features are 384-d but AudioConfig\.dim is 256; set dim=384"
    with pytest.raises(EncoderError, match=msg):
        load_encoder(AudioConfig(encoder="whisper"))
    with pytest.raises(EncoderError, match=r"Whisper needs 16 kHz audio .* sample_rate=22050"):
        load_encoder(AudioConfig(encoder="whisper", dim=384, sample_rate=22050))


def test_whisper_model_path_option(speech, whisper):
    options = {"model_path": str(bundled_model_path())}
    enc = load_encoder(AudioConfig(encoder="whisper", dim=384, options=options))
    assert enc.model_path == bundled_model_path()
    assert torch.equal(enc(speech[:16000]), whisper(speech[:16000]))


def test_whisper_silence_rows_are_cached_per_model(whisper, tmp_path, monkeypatch):
    """The silent window is encoded once per model and settings, then read back bit for bit."""
    from dheads.engine.encoders import whisper as wmod

    monkeypatch.setenv("DHEADS_CACHE", str(tmp_path))
    cfg = AudioConfig(encoder="whisper", dim=384, options={"model": "tiny.en"})
    first = load_encoder(cfg)
    files = list(tmp_path.glob("whisper_silence_*.npy"))
    assert len(files) == 1 and files[0] == wmod.silence_cache_path(first.model_path, "float32", 2)
    np.testing.assert_array_equal(first.silence, whisper.silence)  # what the uncached encoder computed

    calls = []
    monkeypatch.setattr(WhisperEncoder, "encode_mel", lambda self, mel: calls.append(mel.shape) or 1 / 0)
    second = load_encoder(cfg)
    assert calls == [] and np.array_equal(second.silence, first.silence)  # read back, not encoded again

    other = wmod.silence_cache_path(first.model_path, "int8", 2)
    assert other != files[0]  # another compute type: another entry

    files[0].write_bytes(b"not a numpy file")  # a broken entry is computed again, not trusted
    monkeypatch.undo()
    monkeypatch.setenv("DHEADS_CACHE", str(tmp_path))
    third = load_encoder(cfg)
    np.testing.assert_array_equal(third.silence, first.silence)
    assert np.load(files[0]).shape == (750, 384)
