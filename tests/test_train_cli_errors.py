"""Hostile input to dh-train: one exact line on stderr, exit 2, nothing on stdout, as the other dh-* commands.

Typer's usage box (a missing option, an unknown flag, a value of the wrong type) becomes one line; a ``--set``
value of the wrong type is refused when parsed, not met later as a TypeError in the optimizer; a bundle folder
given as a checkpoint whose manifest does not describe its ONNX is one line, not a traceback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _small_bundle import small_export
from dheads.training.cli import app

runner = CliRunner()
BIN = Path(sys.executable).parent


def _one_line(result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _error_line(result) -> str:
    """The error line of a command that chose its threads before failing: the thread policy's log line may
    come first (on stderr, where logging goes, when this process's logging is dh-train's), nothing else."""
    lines = result.stderr.splitlines()
    assert lines and all("threads:" in line for line in lines[:-1]), result.stderr
    assert result.stdout == ""
    return lines[-1]


@pytest.mark.parametrize("args, message", [
    (["distill", "--data", "D", "--out", "O"], "Missing option '--teacher'."),
    (["fit", "--data", "D", "--out", "O", "--frobnicate"], "No such option: --frobnicate"),
    (["fit", "--data", "D", "--out", "O", "--until", "abc"],
     "Invalid value for '--until': Input should be a valid integer, unable to parse string as an integer"),
    (["nope"], "No such command 'nope'."),
])
def test_usage_errors_are_one_line_exit_2(args, message):
    r = runner.invoke(app, args, prog_name="dh-train")
    assert r.exit_code == 2, (r.stderr, r.exception)
    assert _one_line(r) == f"dh-train: error: {message}"
    assert r.stdout == ""


@pytest.mark.parametrize("value, message", [
    ("optim.lr=abc", "--set optim.lr=abc: optim.lr takes a number, got 'abc'"),
    ("train.steps=1.5", "--set train.steps=1.5: train.steps takes a whole number, got 1.5"),
    ("train.steps=true", "--set train.steps=true: train.steps takes a whole number, got True"),
    ("optim.betas=[0.9]", "--set optim.betas=[0.9]: optim.betas takes a list of 2 values, got [0.9]"),
    ("model.channel_mult=[1,x]", "--set model.channel_mult=[1,x]: model.channel_mult takes a list, e.g. [1, 2], "
                                 "got '[1,x]'"),
    ("data.hflip=yes", "--set data.hflip=yes: data.hflip takes a number, got 'yes'"),
    # names and rules come from engine/names.py (training's precisions are the engine's but int8)
    ("train.precision=int8", "train.precision must be one of fp32, fp16, bf16, got 'int8'"),
    ("train.sample_sampler=euler", "train.sample_sampler: unknown sampler 'euler'; choose one of ddpm, ddim, "
                                   "dpmpp_2m, dpmpp_2m_sde, unipc"),
])
def test_set_values_are_checked_against_their_field_type(value, message, tmp_path):
    r = runner.invoke(app, ["fit", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--set", value],
                      prog_name="dh-train")
    assert r.exit_code == 2, (r.stderr, r.exception)
    assert _one_line(r) == f"dh-train: error: {message}"
    assert not (tmp_path / "run").exists()


def test_set_values_of_the_right_type_pass(tmp_path):
    from dheads.training.config import load_config

    cfg = load_config("tiny", ["optim.lr=1", "optim.betas=[0.9, 0.99]", "model.motion_mask=[0.1, 0.5, 0.9, 1.0]",
                               "data.identity=first", "train.steps=30"])
    assert (cfg.optim.lr, cfg.optim.betas, cfg.train.steps) == (1, (0.9, 0.99), 30)
    assert cfg.model.motion_mask == (0.1, 0.5, 0.9, 1.0) and cfg.data.identity == "first"


def test_nothing_on_stdout_before_an_error(tmp_path):
    """In a fresh process (logging configured as a user sees it, on stderr): a missing input is the only line,
    on stderr, before the thread policy logs anything."""
    fit = subprocess.run([str(BIN / "dh-train"), "fit", "--data", str(tmp_path / "nowhere"), "--out",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert (fit.returncode, fit.stdout) == (2, "")
    assert fit.stderr.splitlines() == [f"dh-train: error: --data {tmp_path / 'nowhere'}: no such folder (make one "
                                       "with `dh-train prepare`)"]
    sample = subprocess.run([str(BIN / "dh-train"), "sample", str(tmp_path / "none.pt"), "--data", str(tmp_path),
                             "--out", str(tmp_path / "x.mp4")], capture_output=True, text=True, timeout=120)
    assert (sample.returncode, sample.stdout) == (2, "")
    assert sample.stderr.splitlines() == [f"dh-train: error: {tmp_path / 'none.pt'}: no such file"]
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def bundle(request, tmp_path_factory) -> Path:
    return small_export(request.config, tmp_path_factory)[1].out_dir


def _edited(bundle: Path, dst: Path, **model) -> Path:
    shutil.copytree(bundle, dst)
    data = json.loads((dst / "manifest.json").read_text())
    data["model"].update(model)
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def test_a_bundle_whose_manifest_claims_128_px_is_one_line(bundle, tmp_path):
    lying = _edited(bundle, tmp_path / "b128", image_size=128)
    r = runner.invoke(app, ["sample", str(lying), "--data", str(tmp_path), "--out", str(tmp_path / "x.mp4")],
                      prog_name="dh-train")
    assert r.exit_code == 2, (r.stderr, r.exception)
    assert _error_line(r) == (f"dh-train: error: {lying / 'unet.onnx'}: x_t has shape ['batch', 3, 32, 32] but the "
                            "manifest's model config gives [-1, 3, 128, 128]; the manifest does not describe this "
                            "ONNX, re-export with dh-export")
    assert not (tmp_path / "x.mp4").exists()


def test_a_bundle_whose_weights_fail_the_parity_check_is_one_line(bundle, tmp_path):
    """The same weights and shapes, but the manifest says every motion frame is masked: the weights read back
    and load, and the rebuilt UNet disagrees with ONNX Runtime (the parity check, one line)."""
    lying = _edited(bundle, tmp_path / "masked", motion_mask=[0.0, 0.0, 1.0, 1.0])
    r = runner.invoke(app, ["sample", str(lying), "--data", str(tmp_path), "--out", str(tmp_path / "x.mp4")],
                      prog_name="dh-train")
    assert r.exit_code == 2, (r.stderr, r.exception)
    line = _error_line(r)
    assert line.startswith(f"dh-train: error: {lying}: the weights read back differ from ONNX Runtime by "), line
    assert line.endswith(" (> 0.0001); not a dh-export graph of this model"), line
    assert not (tmp_path / "x.mp4").exists()


def test_a_bundle_whose_weights_do_not_fit_its_manifest_is_one_line(bundle, tmp_path):
    wide = _edited(bundle, tmp_path / "wide", model_channels=64, num_head_channels=64)
    r = runner.invoke(app, ["anchor", str(wide), "-o", str(tmp_path / "a.pt")], prog_name="dh-train")
    assert r.exit_code == 2, (r.stderr, r.exception)
    assert _error_line(r) == ("dh-train: error: unet.onnx: input_blocks.1.0.in_layers.0 has 64 channels, the graph's "
                            "norm 32")
    assert not (tmp_path / "a.pt").exists()
