"""dh-run end to end on CPU: a decodable mp4 in sync with the audio; bad inputs -> one line, exit 2."""

from __future__ import annotations

import dataclasses
import logging
import re

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from dheads.engine.atomic import file_mode
from dheads.engine.checkpoint import checkpoint_from_model, save_checkpoint
from dheads.engine.cli import app
from dheads.engine.config import SMALL, SamplerConfig
from dheads.engine.encoders import default_audio_config
from dheads.engine.model import DiffusedHeadsUNet

runner = CliRunner()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A small random model that takes Whisper features (384-d), saved as our checkpoint."""
    torch.manual_seed(0)
    net = DiffusedHeadsUNet(dataclasses.replace(SMALL, audio_dim=384))
    for p in net.parameters():
        p.data.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("engine") / "small.pt"
    return save_checkpoint(path, checkpoint_from_model(net, default_audio_config("whisper")))


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_mp4_decodes_with_frames_fps_and_audio_in_sync(shared_data, engine, tmp_path):
    out = tmp_path / "talk.mp4"
    wav = shared_data / "speech" / "cmu_arctic_a0007.wav"
    r = _run("--engine", engine, shared_data / "faces" / "astronaut_512.png", wav, "-o", out, "--steps", "2",
             "--max-seconds", "1.6")
    assert r.exit_code == 0, r.stderr
    n = int(1.6 * 16000) // 640  # the authors' frame rule: 40 frames
    with av.open(str(out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264" and a.codec_context.name == "aac"
        assert v.average_rate == 25
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == n
        assert frames[0].shape == (32, 32, 3)
        assert float(a.duration * a.time_base) == pytest.approx(1.6, abs=0.07)  # within one AAC frame
    assert [p.name for p in tmp_path.iterdir()] == ["talk.mp4"]
    assert out.stat().st_mode & 0o777 == file_mode()  # an ordinary file, not the temp file's 0600


def test_same_seed_same_video(shared_data, engine, tmp_path):
    face, wav = shared_data / "faces" / "astronaut_512.png", shared_data / "speech" / "cmu_arctic_a0007.wav"
    outs = []
    for name, seed in (("a.mp4", 1), ("b.mp4", 1), ("c.mp4", 2)):
        r = _run("--engine", engine, face, wav, "-o", tmp_path / name, "--steps", "2", "--max-seconds", "0.4",
                 "--seed", seed)
        assert r.exit_code == 0, r.stderr
        with av.open(str(tmp_path / name)) as c:
            outs.append(np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]))
    assert np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


def _bad_inputs(shared_data, tmp_path, engine):
    face = shared_data / "faces" / "astronaut_512.png"
    wav = shared_data / "speech" / "cmu_arctic_a0007.wav"
    grey = tmp_path / "grey.png"
    import cv2

    cv2.imwrite(str(grey), np.full((256, 256, 3), 128, np.uint8))
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF" + bytes(range(256)) * 8)
    silent_short = tmp_path / "short.wav"
    sf.write(silent_short, np.zeros(100, np.float32), 16000)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    late = tmp_path / "late.wav"  # one second of silence, then speech
    speech, rate = sf.read(wav, dtype="float32")
    sf.write(late, np.concatenate([np.zeros(rate, np.float32), speech]), rate)
    other = tmp_path / "other_model.pt"  # records Whisper audio but expects 32-d features
    torch.manual_seed(0)
    save_checkpoint(other, checkpoint_from_model(DiffusedHeadsUNet(SMALL), default_audio_config("whisper")))
    return {
        "missing face": ([tmp_path / "nope.png", wav, "--engine", engine], r"no such file: .*nope\.png"),
        "missing audio": ([face, tmp_path / "nope.wav", "--engine", engine], r"no such file: .*nope\.wav"),
        "no face": ([grey, wav, "--engine", engine], r"no face found in .*grey\.png"),
        "unreadable audio": ([face, junk, "--engine", engine], r"junk\.wav"),
        "too short audio": ([face, silent_short, "--engine", engine], r"short\.wav"),
        "silent audio": ([face, silent, "--engine", engine],
                         r"silent\.wav: audio is silent \(peak below -80 dBFS\); give a file with speech, or "
                         r"allow silence \(--allow-silence\)"),
        "silent part used": ([face, late, "--engine", engine, "--max-seconds", "0.8"], r"late\.wav: audio is silent"),
        "missing engine": ([face, wav, "--engine", tmp_path / "nope.plan"], r"nope\.plan"),
        "engine for another model": ([face, wav, "--engine", other],
                                     r"model expects 32-d audio features but the whisper encoder gives 384-d"),
    }


@pytest.mark.parametrize("case", ["missing face", "missing audio", "no face", "unreadable audio",
                                  "too short audio", "silent audio", "silent part used", "missing engine",
                                  "engine for another model"])
def test_bad_input_one_line_exit_2_no_output(shared_data, engine, tmp_path, case):
    args, pattern = _bad_inputs(shared_data, tmp_path, engine)[case]
    out = tmp_path / "out.mp4"
    r = _run(*args, "-o", out)
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    line = _error_line(r)
    assert line.startswith("dh-run: error: ")
    import re

    assert re.search(pattern, line), line
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.mp4")]


def test_allow_silence_makes_a_video_of_a_face_that_does_not_talk(shared_data, engine, tmp_path, caplog):
    silent, out = tmp_path / "silent.wav", tmp_path / "still.mp4"
    sf.write(silent, np.zeros(8000, np.float32), 16000)
    r = _run("--engine", engine, shared_data / "faces" / "astronaut_512.png", silent, "-o", out, "--steps", "2",
             "--allow-silence")
    assert r.exit_code == 0, r.stderr
    assert "silent.wav: audio is silent (peak below -80 dBFS); the face will not talk" in caplog.text
    with av.open(str(out)) as c:
        assert len(list(c.decode(video=0))) == 8000 // 640


def _blocks(frames: np.ndarray, k: int = 8) -> np.ndarray:
    n, h, w, c = frames.shape
    return frames.reshape(n, h // k, k, w // k, k, c).astype(float).mean(axis=(2, 4))


def test_render_batch_equals_each_video_rendered_alone(shared_data, engine, tmp_path):
    """Two videos of different lengths in one batch: the same frames as alone (same seed), each mp4 whole."""
    from dheads.engine.config import SamplerConfig
    from dheads.engine.pipeline import RenderRequest, TalkingHead

    head = TalkingHead.open(engine, device="cpu")
    wav = shared_data / "speech" / "cmu_arctic_a0007.wav"
    sampler = SamplerConfig("ddpm", 3)
    jobs = [RenderRequest(shared_data / "faces" / "astronaut_512.png", wav, tmp_path / "a.mp4", max_seconds=0.8,
                          sampler=sampler, seed=1),
            RenderRequest(shared_data / "grid" / "bbaf2n.mpg", wav, tmp_path / "b.mp4", max_seconds=0.48,
                          sampler=sampler, seed=5)]
    inputs = [head.prepare(j.face, j.audio, max_seconds=j.max_seconds) for j in jobs]
    alone = [np.stack(list(head.frames(x, sampler=sampler, seed=seed))) for x, seed in zip(inputs, (1, 5))]
    assert [len(a) for a in alone] == [20, 12]

    batched = list(head.frames_batch(inputs, sampler=sampler, seeds=[1, 5]))
    assert len(batched) == 20 and batched[0].shape == (2, 32, 32, 3)
    for b, solo in enumerate(alone):
        diff = np.abs(np.stack([f[b] for f in batched[: len(solo)]]).astype(int) - solo)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # batched kernels: fp32 rounding only

    stats = head.render_batch(jobs)
    assert stats.frames == 20  # batch steps: the longest video's frames
    for b, job in enumerate(jobs):
        with av.open(str(job.out)) as c:
            got = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(int)
            audio = c.streams.audio[0]
            assert float(audio.duration * audio.time_base) == pytest.approx(job.max_seconds, abs=0.07)
        assert got.shape == alone[b].shape
        # H.264 keeps little of a random model's noisy 32x32 frames but their 8x8-block means: by those,
        # each file is its own video, not the other one
        n = min(len(got), len(alone[1 - b]))
        own, other = (_blocks(v[:n]) for v in (alone[b], alone[1 - b]))
        err_own, err_other = np.abs(_blocks(got[:n]) - own).mean(), np.abs(_blocks(got[:n]) - other).mean()
        assert err_own < 0.5 * err_other, (err_own, err_other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4"]


def test_talking_head_runs_as_its_runtime_config_says(engine):
    """One RuntimeConfig value reaches the backend; keyword overrides replace its fields; it round-trips."""
    import json

    from dheads.engine.config import RuntimeConfig
    from dheads.engine.pipeline import TalkingHead

    rt = RuntimeConfig(device="cpu", threads=2, cuda_graph=False)
    assert RuntimeConfig.from_dict(json.loads(json.dumps(rt.to_dict()))) == rt
    head = TalkingHead.open(engine, rt, threads=1)
    assert head.runtime == RuntimeConfig(device="cpu", threads=1, cuda_graph=False)
    assert head.info.backend == "pytorch" and torch.get_num_threads() == 1  # torch runs the UNet: --threads


def test_render_batch_failure_leaves_no_file(shared_data, engine, tmp_path):
    from dheads.engine.audio import AudioError
    from dheads.engine.pipeline import RenderRequest, TalkingHead

    head = TalkingHead.open(engine, device="cpu")
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    face, wav = shared_data / "faces" / "astronaut_512.png", shared_data / "speech" / "cmu_arctic_a0007.wav"
    with pytest.raises(AudioError, match=r"silent\.wav: audio is silent"):
        head.render_batch([RenderRequest(face, wav, tmp_path / "a.mp4"),
                           RenderRequest(face, silent, tmp_path / "b.mp4")])
    with pytest.raises(ValueError, match="a different output path for each"):
        head.render_batch([RenderRequest(face, wav, tmp_path / "a.mp4"), RenderRequest(face, wav, tmp_path / "a.mp4")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["silent.wav"]


def test_threads_flag_sets_torch_threads_and_logs_progress_when_not_a_terminal(shared_data, engine, tmp_path,
                                                                                 caplog, monkeypatch):
    import dheads.engine.cli as cli

    monkeypatch.setattr(cli, "PROGRESS_EVERY_S", 0.0)  # a line per frame (default: every 10 s)
    out = tmp_path / "talk.mp4"
    with caplog.at_level(logging.INFO, logger="dheads.run.progress"):
        r = _run("--engine", engine, shared_data / "faces" / "astronaut_512.png",
                 shared_data / "speech" / "cmu_arctic_a0007.wav", "-o", out, "--steps", "1", "--max-seconds", "0.4",
                 "--threads", "2")
    assert r.exit_code == 0, r.stderr
    assert torch.get_num_threads() == 2  # the PyTorch backend runs the UNet: it gets the threads
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "dheads.run.progress"]
    assert len(lines) == 10 and lines[-1].startswith("frames 10/10, "), lines
    assert "time to first frame" in r.stderr
    assert re.search(r"sampler\s+\S\s+\w+, 1 step, frame noise fresh", r.stderr), r.stderr  # what it ran
    assert re.search(r"engine\s+\S\s+pytorch fp32 on cpu", r.stderr), r.stderr  # what ran it


def test_summary_names_the_sampler_the_video_was_made_with():
    from dheads.engine.cli import describe_sampler

    assert describe_sampler(SamplerConfig("ddpm", 13, frame_noise="0.9")) == "ddpm, 13 steps, frame noise 0.9"
    assert describe_sampler(SamplerConfig("ddpm", 4, spacing="trailing", frame_noise="0.9")) == (
        "ddpm, 4 trailing steps, frame noise 0.9")
    assert describe_sampler(SamplerConfig("dpmpp_2m", 20, warm_steps=4)) == ("dpmpp_2m, 20 steps (warm start: 4), "
                                                                            "frame noise fresh")


def test_negative_threads_one_line_exit_2(shared_data, engine, tmp_path):
    out = tmp_path / "out.mp4"
    r = _run("--engine", engine, shared_data / "faces" / "astronaut_512.png",
             shared_data / "speech" / "cmu_arctic_a0007.wav", "-o", out, "--threads", "-1")
    assert r.exit_code == 2
    assert _error_line(r) == "dh-run: error: --threads must be 0 (auto) or a positive count, got -1"
    assert not out.exists()


def test_time_to_first_frame_is_split_into_its_stages(monkeypatch):
    import dheads.engine.cli as cli
    from dheads.engine.pipeline import RunStats

    monkeypatch.setattr(cli, "T_START", 10.0)
    monkeypatch.setattr(cli, "T_OPEN", 11.5)
    stats = RunStats(frames=2, seconds_of_video=0.08, total_s=0.3, first_frame_s=0.25, prepare_s=0.9,
                     prepare_stages={"face": 0.4, "audio_load": 0.1, "audio_encode": 0.4})
    assert cli._stages(stats, 0.3) == ("imports 1.50 s, engine 0.30 s, face 0.40 s, audio load 0.10 s, "
                                       "audio encode 0.40 s, first frame 0.25 s")


def test_prepare_times_face_audio_load_and_encoding(shared_data):
    from dheads.engine.pipeline import TalkingHead

    head = TalkingHead.open(None, device="cpu", backend="onnxruntime", threads=1)
    x = head.prepare(shared_data / "faces" / "astronaut_512.png", shared_data / "speech" / "cmu_arctic_a0007.wav",
                     max_seconds=0.4)
    assert set(x.stages) == {"face", "audio_load", "audio_encode"} and all(v > 0 for v in x.stages.values())
