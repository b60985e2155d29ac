"""A resumed run continues as it was configured: ``dh-train fit --data D --out RUN`` on a run paused with
``--until`` keeps the run's recorded config (its steps, not the preset's), refuses flags that would make it
another run (one line, nothing changed), and records the changes a resume may make (``--set train.steps``)."""

from __future__ import annotations

import os
import tomllib

import pytest
import torch
from typer.testing import CliRunner

from dheads.training.cli import app
from dheads.training.prepare import PrepareConfig, prepare

runner = CliRunner()
ALLOWED = ("data.cache, data.num_workers, train.checkpoint_every, train.keep_checkpoints, train.log_backend, "
           "train.log_every, train.sample_every, train.sample_frames, train.sample_sampler, train.sample_steps, "
           "train.steps")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_data):
    src = tmp_path_factory.mktemp("videos")
    for name in ("bbaf2n", "lbax4n"):
        os.symlink(shared_data / "grid" / f"{name}.mpg", src / f"{name}.mpg")
    out = tmp_path_factory.mktemp("prepared")
    report = prepare(src, out, PrepareConfig(size=32), jobs=1, progress=False)
    assert sorted(report.done) == ["bbaf2n", "lbax4n"]
    return out


def _fit(*args: str):
    return runner.invoke(app, ["fit", *args, "--no-progress", "--threads", "1"], prog_name="dh-train")


def _recorded(run) -> dict:
    return tomllib.loads((run / "config.toml").read_text())


def _step(run) -> int:
    obj = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    return int(obj["extra"]["step"])


def test_a_resumed_run_keeps_its_recorded_config(prepared, tmp_path):
    run = tmp_path / "run"
    r = _fit("--data", str(prepared), "--out", str(run), "--config", "tiny", "--set", "train.steps=30",
             "--set", "train.batch_size=2", "--set", "train.checkpoint_every=10", "--until", "10")
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert _step(run) == 10 and _recorded(run)["train"]["steps"] == 30

    # flags that would make it another run are refused, and change nothing
    before = (run / "config.toml").read_text()
    r = _fit("--data", str(prepared), "--out", str(run), "--set", "optim.lr=1e-3")
    assert r.exit_code == 2, (r.stderr, r.exception)
    assert r.stderr.splitlines() == [
        f"dh-train: error: resuming {run / 'last.pt'}: --set changes its recorded config (optim.lr = 0.0005 "
        f"recorded, 0.001 given); a resumed run keeps the config it was started with (--set may change only "
        f"{ALLOWED}): drop the flag, or start a new run with another --out"]
    r = _fit("--data", str(prepared), "--out", str(run), "--config", "tiny")
    assert r.exit_code == 2, (r.stderr, r.exception)
    assert r.stderr.splitlines() == [
        f"dh-train: error: resuming {run / 'last.pt'}: --config changes its recorded config (train.batch_size = 2 "
        "recorded, 8 given, train.checkpoint_every = 10 recorded, 200 given, train.steps = 30 recorded, 2000 "
        f"given); a resumed run keeps the config it was started with (--set may change only {ALLOWED}): drop the "
        "flag, or start a new run with another --out"]
    assert (run / "config.toml").read_text() == before and _step(run) == 10

    # the resume the issue describes: no --config, no --set -> on to the recorded 30 steps, not the preset's 2000
    r = _fit("--data", str(prepared), "--out", str(run))
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert _step(run) == 30 and (run / "config.toml").read_text() == before
    assert _recorded(run)["train"]["steps"] == 30

    # the same --config and --set as the run was started with describe the same run: accepted (nothing to do)
    r = _fit("--data", str(prepared), "--out", str(run), "--config", "tiny", "--set", "train.steps=30",
             "--set", "train.batch_size=2", "--set", "train.checkpoint_every=10")
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert _step(run) == 30

    # a resume may lengthen the run; the new length is recorded (config.toml and the checkpoint)
    r = _fit("--data", str(prepared), "--out", str(run), "--set", "train.steps=32")
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert _step(run) == 32 and _recorded(run)["train"]["steps"] == 32
    obj = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert obj["extra"]["training_config"]["train"]["steps"] == 32
    assert obj["extra"]["training_config"]["train"]["batch_size"] == 2

    # --resume no: a fresh run, as asked (the preset's config)
    fresh = tmp_path / "fresh"
    r = _fit("--data", str(prepared), "--out", str(fresh), "--resume", "no", "--set", "train.steps=2",
             "--set", "train.batch_size=2")
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert _step(fresh) == 2 and _recorded(fresh)["optim"]["lr"] == 0.0005
