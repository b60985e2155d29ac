"""TalkingHead.prepare encodes the speech on a thread while the face is cropped: the same inputs as doing one after
the other, the face's error first, and one face landmarker per head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dheads.engine.audio import AudioError, load_audio
from dheads.engine.image import ImageError, load_face
from dheads.engine.pipeline import TalkingHead, default_engine_path

EXAMPLES = default_engine_path().parent / "examples"
FACE, SPEECH = EXAMPLES / "face.png", EXAMPLES / "speech.wav"


@pytest.fixture(scope="module")
def head():
    return TalkingHead.open(device="cpu", backend="onnxruntime")


def test_prepare_gives_what_the_stages_give_one_after_the_other(head):
    x = head.prepare(FACE, SPEECH, max_seconds=1.0)
    size = head.info.model.image_size
    assert torch.equal(x.identity, load_face(FACE, size=size))  # a fresh landmarker crops the same
    samples, rate = load_audio(SPEECH)
    samples = samples[: int(1.0 * rate)]
    assert np.array_equal(x.samples, samples)
    assert torch.equal(x.audio_emb, head.encoder(samples))
    assert set(x.stages) == {"face", "audio_load", "audio_encode"} and all(v > 0 for v in x.stages.values())


def test_one_landmarker_per_head(head):
    head.prepare(FACE, SPEECH, max_seconds=0.2)
    first = head._landmarker
    again = head.prepare(FACE, SPEECH, max_seconds=0.2)
    assert first is not None and head._landmarker is first
    assert torch.equal(again.identity, head.prepare(FACE, SPEECH, max_seconds=0.2).identity)


def test_the_face_error_comes_first(head, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    silent = tmp_path / "silent.wav"
    import soundfile as sf

    sf.write(silent, np.zeros(16000, np.float32), 16000)
    with pytest.raises(ImageError, match=r"^cannot read image .*junk\.png"):
        head.prepare(junk, silent)  # both bad: the face's line, as when the face was read first
    with pytest.raises(AudioError):
        head.prepare(FACE, silent)  # the speech's error from its thread
