"""One engine, one face, one speech, one seed: every way of rendering gives the same frames (issue 29).

The ways: ``dh-run`` (in process, typer's CliRunner), ``TalkingHead.render``, ``TalkingHead.render_batch``,
the server's worker (``serve.jobs.render_frames`` over an in-process ``EngineWorker``: upload, prepare,
continuous batcher; no HTTP), ``benchmarks.heldout_study``'s generation function and the reference loop
(``engine.reference.generate_reference`` on the PyTorch model). All run the PyTorch backend on the CPU,
one thread, so equality is exact (uint8 frames, bit for bit), except that ``render_batch`` renders the
video beside another one (a batch of two), whose batched kernels may round differently (1 level at most).
Paths that write an mp4 are hooked just before encoding (``MP4Writer.write``), so the comparison is of the
frames, not of what H.264 keeps.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dheads.engine import pipeline
from dheads.engine.checkpoint import checkpoint_from_model, save_checkpoint
from dheads.engine.config import SMALL, SamplerConfig
from dheads.engine.encoders import default_audio_config
from dheads.engine.image import to_uint8_frames
from dheads.engine.model import random_unet
from dheads.engine.pipeline import RenderRequest, TalkingHead
from dheads.engine.reference import generate_reference

from _serve import FACE, short_speech

SEED = 7
# (dh-run flags, the same choice as a server request's fields)
CHOICES = {
    "ddpm3": {"sampler": "ddpm", "steps": 3},
    "dpmpp2m4_corr": {"sampler": "dpmpp_2m", "steps": 4, "frame_noise": "0.8", "spacing": "trailing"},
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A small random model that takes Whisper features (384-d), saved as a checkpoint (runs on PyTorch)."""
    net = random_unet(dataclasses.replace(SMALL, audio_dim=384), std=0.03, seed=3)
    path = tmp_path_factory.mktemp("engine") / "small.pt"
    return save_checkpoint(path, checkpoint_from_model(net, default_audio_config("whisper")))


@pytest.fixture(scope="module")
def head(engine):
    return TalkingHead.open(engine, device="cpu", backend="pytorch", threads=1)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    return short_speech(tmp_path_factory.mktemp("speech") / "s.wav", 0.3)


@pytest.fixture
def written(monkeypatch):
    """Frames the mp4 writers of ``engine.pipeline`` were given, per output file name, in order."""
    frames: dict[str, list[np.ndarray]] = {}

    class Recording(pipeline.MP4Writer):
        def __init__(self, path, *args, **kw):
            super().__init__(path, *args, **kw)
            self._name = str(path)
            frames[self._name] = []

        def write(self, frame):
            frames[self._name].append(np.array(frame, copy=True))
            super().write(frame)

    monkeypatch.setattr(pipeline, "MP4Writer", Recording)
    return frames


def _sampler(head: TalkingHead, choice: dict) -> SamplerConfig:
    return head.default_sampler.override(name=choice["sampler"], steps=choice["steps"],
                                         frame_noise=choice.get("frame_noise"), spacing=choice.get("spacing"))


def _dh_run(engine, speech, out, choice) -> None:
    from dheads.engine.cli import app

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in choice.items()]
    res = CliRunner().invoke(app, [str(FACE), str(speech), "-o", str(out), "--engine", str(engine), "--device", "cpu",
                                   "--backend", "pytorch", "--threads", "1", "--seed", str(SEED), *flags])
    assert res.exit_code == 0, res.output


def _server(head, choice, speech) -> np.ndarray:
    from dheads.serve.config import ServeConfig
    from dheads.serve.jobs import render_frames
    from dheads.serve.uploads import UploadDir
    from dheads.serve.worker import EngineWorker, stream_options

    config = ServeConfig(threads=1, max_streams=2)
    worker = EngineWorker(config, head)
    worker.start()
    try:
        opts = stream_options(head, config, seed=SEED, **choice)

        async def render():
            with UploadDir() as d:
                frames, _ = await render_frames(worker, d, (FACE.read_bytes(), FACE.name),
                                                (speech.read_bytes(), speech.name), opts)
            return frames

        return np.stack(asyncio.run(render()))
    finally:
        worker.stop()


@pytest.mark.parametrize("name", list(CHOICES))
def test_every_path_makes_the_same_frames(engine, head, speech, written, tmp_path, name):
    choice = CHOICES[name]
    sampler = _sampler(head, choice)
    inputs = head.prepare(FACE, speech)
    assert inputs.n_frames >= 7

    # (a) dh-run
    _dh_run(engine, speech, tmp_path / "run.mp4", choice)
    # (b) TalkingHead.render, (c) render_batch (beside another video: a batch of two)
    head.render(RenderRequest(FACE, speech, tmp_path / "render.mp4", sampler=sampler, seed=SEED))
    other = RenderRequest(FACE, speech, tmp_path / "other.mp4", sampler=sampler, seed=SEED + 1, max_seconds=0.2)
    head.render_batch([other, RenderRequest(FACE, speech, tmp_path / "batch.mp4", sampler=sampler, seed=SEED)])
    got = {k: np.stack(written[str(tmp_path / f"{k}.mp4")]) for k in ("run", "render", "batch")}
    # (d) the server's worker
    got["server"] = _server(head, choice, speech)
    # (e) the held-out study's generation
    from dheads.benchmarks import heldout_study

    got["heldout_study"] = heldout_study._generate(head, inputs, heldout_study.study_sampler(sampler), SEED)
    # (f) the reference loop on the PyTorch model
    ref = generate_reference(head.denoiser.model, inputs.identity, inputs.audio_emb, sampler=sampler,
                             diffusion=head.info.diffusion, seed=SEED)
    got["reference"] = to_uint8_frames(ref)

    expected = got["reference"]
    assert expected.shape == (inputs.n_frames, 32, 32, 3) and expected.dtype == np.uint8
    assert len(np.unique(expected.reshape(len(expected), -1), axis=0)) == len(expected)  # frames differ
    # render_batch ran a batch of two: batched convolutions may sum in another order than a batch of one
    # (fp32 rounding, see test_cli_run), so at most 1 level on under 0.1% of values; measured exact here
    batched = got.pop("batch").astype(int)
    assert batched.shape == expected.shape
    diff = np.abs(batched - expected)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    differ = {k: int(np.abs(v.astype(int) - expected).max()) if v.shape == expected.shape else f"shape {v.shape}"
              for k, v in got.items() if not np.array_equal(v, expected)}
    assert not differ, f"paths that differ from the reference loop (max uint8 difference): {differ}"


def test_a_different_seed_changes_the_frames(head, speech):
    """The comparison above is not vacuous: the seed reaches the frames."""
    inputs = head.prepare(FACE, speech)
    sampler = _sampler(head, CHOICES["ddpm3"])
    a = np.stack(list(head.frames(inputs, sampler=sampler, seed=SEED)))
    b = np.stack(list(head.frames(inputs, sampler=sampler, seed=SEED + 1)))
    assert not np.array_equal(a, b)
    torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(np.stack(list(
        head.frames(inputs, sampler=sampler, seed=SEED)))), rtol=0, atol=0)


def test_a_batch_runs_one_sampler(head, speech, tmp_path):
    """render_batch makes every video with one loop: requests that ask for different samplers are refused
    before anything is prepared or written."""
    a = RenderRequest(FACE, speech, tmp_path / "a.mp4", sampler=_sampler(head, CHOICES["ddpm3"]))
    b = RenderRequest(FACE, speech, tmp_path / "b.mp4")  # the engine's default sampler
    with pytest.raises(ValueError, match="render_batch runs one sampler for all its videos, got 2 different ones"):
        head.render_batch([a, b])
    assert list(tmp_path.iterdir()) == []
