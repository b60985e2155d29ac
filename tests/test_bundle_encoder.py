"""A bundle is self-contained: ``dh-export --audio-encoder`` puts the SDA encoder in it and dh-run uses it.

Parity: the bundle's ``audio_encoder.onnx`` driven by :class:`OnnxSDA` against the TorchScript file it was
exported from, run the authors' way (:class:`TorchScriptSDA`), on 2 s of speech (50 chained GRU steps):
max abs difference below 1e-4 (fp32 kernels of two runtimes; the features are O(0.1-1)).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import av
import pytest
import torch
from typer.testing import CliRunner

from dheads.engine.audio import load_audio
from dheads.engine.checkpoint import checkpoint_from_model, save_checkpoint
from dheads.engine.config import SMALL, AudioConfig
from dheads.engine.encoders.sda import TorchScriptSDA
from dheads.engine.encoders.sda_onnx import OnnxSDA
from dheads.engine.model import random_unet

from _sda import seeded_sda

runner = CliRunner()


@pytest.fixture(scope="module")
def sda_file(tmp_path_factory):
    """A stand-in for the released audio_encoder.pt: a seeded SDA with non-trivial BatchNorm statistics."""
    module = seeded_sda()
    path = tmp_path_factory.mktemp("sda") / "audio_encoder.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(module).save(str(path))
    return path


@pytest.fixture(scope="module")
def bundle(sda_file, tmp_path_factory):
    """A SMALL model that takes SDA features (256-d), exported fp32 with --audio-encoder."""
    from dheads.export.pipeline import run_export

    root = tmp_path_factory.mktemp("sda_bundle")
    net = random_unet(dataclasses.replace(SMALL, audio_dim=256), seed=0)
    ckpt = save_checkpoint(root / "small_sda.pt", checkpoint_from_model(net, AudioConfig(encoder="sda", dim=256)))
    return run_export(ckpt, root / "bundle", audio_encoder=sda_file, precision="fp32", seed=0, tensorrt=False).out_dir


def test_bundled_encoder_matches_the_torchscript_it_was_exported_from(sda_file, bundle, shared_data):
    from dheads.engine.bundle import read_manifest

    samples, _ = load_audio(shared_data / "speech" / "cmu_arctic_a0007.wav")
    samples = samples[:32000]
    manifest = read_manifest(bundle)
    onnx = OnnxSDA(bundle / "audio_encoder.onnx", manifest.audio, manifest.audio_encoder.options)
    got, want = onnx(samples), TorchScriptSDA(sda_file)(samples)
    assert got.shape == want.shape == (50, 256)
    assert float(want.abs().max()) > 0.05  # not a trivially small signal
    assert float((got - want).abs().max()) < 1e-4


def test_dh_run_runs_a_bundle_without_audio_encoder_pt(bundle, shared_data, tmp_path):
    from dheads.engine.cli import app

    out = tmp_path / "talk.mp4"
    r = runner.invoke(app, [str(shared_data / "faces" / "astronaut_512.png"),
                            str(shared_data / "speech" / "cmu_arctic_a0007.wav"), "--engine", str(bundle),
                            "-o", str(out), "--steps", "2", "--max-seconds", "0.4"], prog_name="dh-run")
    assert r.exit_code == 0, (r.stderr, r.exception)
    with av.open(str(out)) as c:
        assert len(list(c.decode(video=0))) == 10


def test_a_bundle_missing_its_encoder_file_is_one_line(bundle, shared_data, tmp_path):
    from dheads.engine.cli import app

    broken = tmp_path / "bundle"
    shutil.copytree(bundle, broken)
    (broken / "audio_encoder.onnx").unlink()
    r = runner.invoke(app, [str(shared_data / "faces" / "astronaut_512.png"),
                            str(shared_data / "speech" / "cmu_arctic_a0007.wav"), "--engine", str(broken),
                            "-o", str(tmp_path / "out.mp4")], prog_name="dh-run")
    assert r.exit_code == 2
    assert r.stderr.splitlines() == [f"dh-run: error: {broken}: the bundle's audio_encoder.onnx is missing; copy "
                                     "the whole bundle, or pass --audio-encoder"]
    assert not (tmp_path / "out.mp4").exists()
    data = json.loads((broken / "manifest.json").read_text())
    assert data["audio_encoder"]["kind"] == "onnx"
