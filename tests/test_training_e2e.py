"""End to end on the CPU: preprocess two GRID clips, train the tiny preset with all three losses,
resume bit-exactly, and hand the checkpoint to the engine (``load_checkpoint``, ``generate_reference``,
``dh-train sample``, ``dh-run``, ``dh-export``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dheads.engine.checkpoint import load_checkpoint
from dheads.engine.config import SamplerConfig
from dheads.engine.reference import generate_reference
from dheads.training.config import load_config
from dheads.training.dataset import load_clip
from dheads.training.prepare import PrepareConfig, prepare
from dheads.training.train import fit

CLIPS = ("bbaf2n", "lbax4n")
STEPS, CHECKPOINT_AT = 40, 20
BIN = Path(sys.executable).parent
TIMINGS: dict[str, float] = {}


def _tiny(**train) -> "TrainingConfig":  # noqa: F821
    sets = {"steps": STEPS, "checkpoint_every": CHECKPOINT_AT, "log_every": 10, "sample_every": 0, **train}
    return load_config("tiny", [f"train.{k}={v}" for k, v in sets.items()])


@pytest.fixture(scope="module")
def videos(tmp_path_factory, shared_data) -> Path:
    """Two real GRID clips, plus a file that is not a video and a video without a face."""
    from dheads.engine.video import write_mp4

    src = tmp_path_factory.mktemp("videos")
    for name in CLIPS:
        os.symlink(shared_data / "grid" / f"{name}.mpg", src / f"{name}.mpg")
    (src / "broken.mp4").write_bytes(b"not a video at all")
    rng = np.random.default_rng(0)
    write_mp4(src / "noface.mp4", [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(12)],
              audio=(0.1 * np.sin(np.arange(12 * 640) / 10)).astype(np.float32))
    return src


@pytest.fixture(scope="module")
def prepared(videos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    tic = time.perf_counter()
    report = prepare(videos, out, PrepareConfig(size=32), jobs=2, progress=False)
    TIMINGS["prepare"] = time.perf_counter() - tic
    assert sorted(report.done) == list(CLIPS)
    assert set(report.failed) == {"broken", "noface"}, report.failed
    return out


def test_prepare_writes_clips_and_is_resumable(videos, prepared):
    index = json.loads((prepared / "index.json").read_text())
    assert index["audio"]["encoder"] == "whisper" and index["audio"]["dim"] == 384 and index["size"] == 32
    assert [c["id"] for c in index["clips"]] == list(CLIPS)
    assert (prepared / "train.txt").read_text().split() == list(CLIPS)
    clip = load_clip(prepared / "clips" / "bbaf2n.npz")
    t = clip.meta["n_frames"]
    assert t == min(clip.meta["video_frames"], clip.meta["audio_frames"]) >= 70  # 3 s at 25 fps
    assert clip.frames.shape == (t, 32, 32, 3) and clip.frames.dtype == np.uint8
    assert clip.audio_emb.shape == (t, 384) and clip.mouth_boxes.shape == (t, 4)
    assert clip.audio.shape == (t * 640,) and clip.audio.dtype == np.int16
    b = clip.mouth_boxes
    assert ((b[:, 0] < b[:, 2]) & (b[:, 1] < b[:, 3])).all()
    assert (b[:, 1] > 16).all() and (b[:, 3] < 32).all()  # lips in the lower half of the face crop
    failures = [json.loads(line) for line in (prepared / "failures.jsonl").read_text().splitlines()]
    reasons = {f["id"]: f["reason"] for f in failures}
    assert "face found in 0/12 frames" in reasons["noface"]
    # a re-run does nothing: finished clips and recorded failures are skipped
    again = prepare(videos, prepared, PrepareConfig(size=32), jobs=1, progress=False)
    assert again.done == [] and sorted(again.existing) == list(CLIPS) and set(again.failed) == {"broken", "noface"}
    with pytest.raises(ValueError, match="different settings"):
        prepare(videos, prepared, PrepareConfig(size=64), progress=False)


@pytest.fixture(scope="module")
def run_a(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_a")
    tic = time.perf_counter()
    result = fit(_tiny(), prepared, out, progress=False)
    TIMINGS["train_40_steps"] = time.perf_counter() - tic
    return out, result


def test_tiny_preset_learns_and_resumes_bit_exactly(prepared, run_a, tmp_path):
    out, a = run_a
    losses = np.array(a.losses)
    assert len(losses) == STEPS and np.isfinite(losses).all()
    first, last = losses[:10].mean(), losses[-10:].mean()
    assert last < 0.85 * first, (first, last)  # ~1.18 -> ~0.65 in practice
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,mse,vlb,lip") and len(rows) == 1 + STEPS // 10
    vlb, lip = (float(rows[-1].split(",")[i]) for i in (3, 4))
    assert vlb > 0 and lip > 0  # all three terms are live
    assert (out / "checkpoints" / f"step_{CHECKPOINT_AT:08d}.pt").is_file()
    assert (out / "last.pt").samefile(out / "checkpoints" / f"step_{STEPS:08d}.pt")
    # every checkpoint was health-checked (here on training frames: these clips have no test split)
    health = [json.loads(line) for line in (out / "health.jsonl").read_text().splitlines()]
    assert [h["step"] for h in health] == [CHECKPOINT_AT, STEPS]
    assert set(health[-1]["dc_slope"]) == {"999", "900", "500"} and health[-1]["samples"] == 48
    assert health[-1]["passed"] == (not health[-1]["failures"])

    # resume from the step-20 checkpoint into a fresh folder, 2 steps: the same losses, bit for bit
    tic = time.perf_counter()
    b = fit(_tiny(), prepared, tmp_path, resume=out / "checkpoints" / f"step_{CHECKPOINT_AT:08d}.pt",
            progress=False, until=CHECKPOINT_AT + 2)
    TIMINGS["resume_2_steps"] = time.perf_counter() - tic
    assert (b.start_step, b.end_step) == (CHECKPOINT_AT, CHECKPOINT_AT + 2)
    assert b.losses == a.losses[CHECKPOINT_AT:CHECKPOINT_AT + 2], (b.losses, a.losses[CHECKPOINT_AT:CHECKPOINT_AT + 2])
    print(f"\nloss first10 {first:.4f} last10 {last:.4f}; resumed {b.losses} == {a.losses[20:22]}; "
          f"timings {TIMINGS}")


def test_init_fine_tunes_from_a_checkpoints_weights(prepared, run_a, tmp_path):
    """``fit(init=...)``: step 0, a fresh optimizer, the trained (EMA) weights; a mismatched model is named."""
    out, a = run_a
    b = fit(_tiny(), prepared, tmp_path / "ft", progress=False, until=2, init=out / "last.pt")
    assert (b.start_step, b.end_step) == (0, 2)
    # from trained weights the first losses are far below a fresh run's first ones
    assert max(b.losses) < 0.8 * float(np.mean(a.losses[:2])), (b.losses, a.losses[:2])
    with pytest.raises(ValueError, match=r"--init .*last\.pt: its model config differs from this run's "
                                         r"\(num_res_blocks = 1 there, 2 here\); pass --set model\.KEY=VALUE"):
        cfg = load_config("tiny", ["model.num_res_blocks=2", "model.dropout=0.1"])  # dropout may differ
        fit(cfg, prepared, tmp_path / "bad", progress=False, until=1, init=out / "last.pt")
    # other audio features: refused before the run folder is made
    from dataclasses import replace

    from dheads.engine.checkpoint import save_checkpoint
    from dheads.engine.config import AudioConfig

    other = save_checkpoint(tmp_path / "sda.pt", replace(load_checkpoint(out / "last.pt"),
                                                         audio=AudioConfig(encoder="sda", dim=384)))
    with pytest.raises(ValueError, match=r"^--init .*sda\.pt: trained on \{'encoder': 'sda'.* audio features, but "):
        fit(_tiny(), prepared, tmp_path / "bad_audio", progress=False, until=1, init=other)
    assert not (tmp_path / "bad_audio").exists()
    # settings without weights may change: a colour anchor (its buffers are the new model's) and a mask
    cfg = load_config("tiny", ["model.color_anchor=identity", "model.motion_mask=[0.25, 0.5, 0.75, 0.9]"])
    c = fit(cfg, prepared, tmp_path / "anchored", progress=False, until=1, init=out / "last.pt")
    assert c.end_step == 1 and np.isfinite(c.losses).all()
    got = load_checkpoint(tmp_path / "anchored" / "last.pt")
    assert got.model.color_anchor == "identity" and got.model.motion_mask == (0.25, 0.5, 0.75, 0.9)


def test_checkpoint_is_an_engine_checkpoint(prepared, run_a, tmp_path):
    out, _ = run_a
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.source == "dheads" and ckpt.ema_state_dict is not None and ckpt.meta["step"] == STEPS
    assert ckpt.audio.encoder == "whisper" and ckpt.audio.dim == 384 and ckpt.model.image_size == 32
    net = ckpt.build()
    clip = load_clip(prepared / "clips" / "bbaf2n.npz")
    identity = torch.from_numpy(np.array(clip.frames[0])).permute(2, 0, 1)[None].float() / 127.5 - 1
    frames = generate_reference(net, identity, torch.from_numpy(clip.audio_emb[:3]),
                                sampler=SamplerConfig(name="ddim", steps=5))
    assert frames.shape == (3, 3, 32, 32) and torch.isfinite(frames).all()

    from dheads.training.cli import main

    video = tmp_path / "preview.mp4"
    with pytest.raises(SystemExit) as e:
        main(["sample", str(out / "last.pt"), "--data", str(prepared), "--out", str(video), "--frames", "3",
              "--steps", "3"])
    assert e.value.code == 0 and video.stat().st_size > 0


def test_data_order_does_not_depend_on_workers_or_mmap(prepared, tmp_path):
    a = fit(_tiny(steps=3), prepared, tmp_path / "a", progress=False).losses
    b = fit(load_config("tiny", ["train.steps=3", "data.num_workers=2", "data.cache=mmap"]), prepared,
            tmp_path / "b", progress=False).losses
    assert a == b


def test_fit_logs_progress_lines_when_stderr_is_not_a_terminal(prepared, tmp_path, caplog, monkeypatch):
    import logging

    import dheads.training.train as train_mod

    monkeypatch.setattr(train_mod, "PROGRESS_EVERY_S", 0.0)  # a line per step (default: every 30 s)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    with caplog.at_level(logging.INFO, logger="dheads.training"):
        fit(_tiny(steps=3), prepared, tmp_path, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [ln.split(",")[0] for ln in lines] == ["step 1/3", "step 2/3", "step 3/3"], lines
    assert " samples/s, " in lines[-1] and ", loss " in lines[-1]


def test_dh_run_takes_the_checkpoint(run_a, shared_data, tmp_path):
    pytest.importorskip("dheads.engine.cli")
    out, _ = run_a
    video = tmp_path / "run.mp4"
    cmd = [str(BIN / "dh-run"), str(shared_data / "faces" / "astronaut_face_256.png"),
           str(shared_data / "speech" / "cmu_arctic_a0007.wav"), "-o", str(video), "--engine", str(out / "last.pt"),
           "--steps", "2", "--sampler", "ddim", "--max-seconds", "0.2", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert video.stat().st_size > 0


def test_dh_export_takes_the_checkpoint(run_a, tmp_path):
    pytest.importorskip("dheads.export.cli")
    pytest.importorskip("onnx")
    out, _ = run_a
    cmd = [str(BIN / "dh-export"), str(out / "last.pt"), "--output", str(tmp_path / "bundle")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((tmp_path / "bundle").rglob("*.onnx"))


def test_ddp_two_processes_on_cpu(prepared, tmp_path):
    """torchrun --nproc_per_node 2 with gloo: both ranks train, rank 0 writes, weights stay in sync."""
    if not (BIN / "torchrun").is_file():
        pytest.skip("torchrun not installed beside this python")
    out = tmp_path / "ddp"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
           "-m", "dheads.training.cli", "fit", "--data", str(prepared), "--out", str(out), "--no-progress",
           "--set", "train.steps=4", "--set", "train.checkpoint_every=4", "--set", "train.batch_size=2",
           "--set", "train.log_every=2", "--set", "train.sample_every=4", "--set", "train.sample_frames=2",
           "--set", "train.sample_steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.meta["step"] == 4
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3
    assert (out / "samples" / "step_00000004.mp4").stat().st_size > 0


def test_a_killed_run_resumes_from_its_last_checkpoint(prepared, tmp_path):
    """SIGKILL at an arbitrary moment (checkpoints every 2 steps, old ones pruned) never corrupts last.pt."""
    out = tmp_path / "killed"
    cmd = [str(BIN / "dh-train"), "fit", "--data", str(prepared), "--out", str(out), "--no-progress",
           "--set", "train.steps=100000", "--set", "train.checkpoint_every=2", "--set", "train.batch_size=2",
           "--set", "train.keep_checkpoints=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pt").is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(float(np.random.default_rng().uniform(0.2, 1.0)))
    finally:
        proc.kill()
        proc.wait()
    step = load_checkpoint(out / "last.pt").meta["step"]
    assert step >= 2 and step % 2 == 0
    resume = [str(BIN / "dh-train"), "fit", "--data", str(prepared), "--out", str(out), "--no-progress",
              "--resume", "auto", "--set", f"train.steps={step + 2}"]
    done = subprocess.run(resume, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_checkpoint(out / "last.pt").meta["step"] == step + 2
    assert not list(out.glob("checkpoints/.*.tmp"))
