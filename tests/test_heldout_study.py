"""The held-out study (benchmarks/heldout_study.py): mouth motion, sync, smoothness and colour on the decoded
mp4, beside real video and two baselines, on clips a model never saw. Run here on the packaged demo model with
4 DDPM steps (fast; the numbers are not the model's quality, only the study's plumbing and formulas)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from dheads.benchmarks.heldout_study import (StudyError, grain, not_held_out, per_second, roundtrip_mp4,
                                             shuffle_source, study, study_sampler, table_markdown)
from dheads.benchmarks.metrics import fmse
from dheads.engine.config import SamplerConfig
from dheads.engine.pipeline import default_engine_path


def test_grain_and_buckets_known_answers():
    flat = np.full((3, 8, 8, 3), 100, np.uint8)
    assert grain(flat).tolist() == [0.0, 0.0, 0.0]
    dots = flat.copy()
    dots[:, 4, 4] = 110  # one bright pixel: Laplacian -40 there, +10 at its 4 neighbours
    assert grain(dots)[0] == pytest.approx((40 ** 2 + 4 * 10 ** 2) / 64)
    assert per_second(np.arange(5.0), 2) == [0.5, 2.5, 4.0]


def test_the_study_samples_as_dh_run_would_unless_told_otherwise():
    demo = SamplerConfig("ddpm", 13, frame_noise="0.8")  # a bundle's recorded default
    assert study_sampler(demo) == demo  # its frame noise included
    assert study_sampler(demo, frame_noise="fresh") == SamplerConfig("ddpm", 13)
    assert study_sampler(demo, SamplerConfig("ddim", 5)) == SamplerConfig("ddim", 5)
    assert study_sampler(demo, SamplerConfig("ddpm", 25), "0.5", 4) == SamplerConfig("ddpm", 25, frame_noise="0.5",
                                                                                   warm_steps=4)


@pytest.fixture(scope="module")
def prepared(shared_data, tmp_path_factory):
    """lbax4n and sbwe5n prepared at the demo's 64 px as test speakers (real frames and speakers for the study)."""
    from dheads.training.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("prepared")
    listing = out / "list.txt"
    listing.write_text("".join(f"{shared_data / 'grid' / n}.mpg\t{n}\n" for n in ("lbax4n", "sbwe5n")))
    prepare(listing, out / "data", PrepareConfig(size=64, test_speakers=("lbax4n", "sbwe5n")), jobs=1, progress=False)
    return out / "data"


def test_not_held_out_by_speaker_or_clip_name():
    training = {"speakers": ["s1", "pwij3p"], "clips": ["grid_s1/clips/bbaf2n", "grid/pwij3p"]}
    assert not_held_out(training, "lbax4n", "lbax4n") is None
    assert not_held_out(training, "pwij3p", "pwij3p") == "its speaker 'pwij3p' trained the model"
    assert not_held_out(training, "bbaf2n", None) == "clip 'bbaf2n' trained the model"  # grid/bbaf2n is s1's clip
    assert not_held_out(training, "bbaf9x", "s1") == "its speaker 's1' trained the model"


def test_shuffled_speech_turns_over_the_other_clips_seed_by_seed():
    pool = [Path(f"{c}.mpg") for c in ("a", "b", "c", "d")]
    others = pool[1:]  # clip "a" (index 0)
    assert [shuffle_source(others, 0, i).stem for i in range(4)] == ["b", "c", "d", "b"]
    others = [pool[0], *pool[2:]]  # clip "b" (index 1): never its own speech
    assert [shuffle_source(others, 1, i).stem for i in range(3)] == ["c", "d", "a"]


def test_mp4_round_trip_removes_grain_as_users_see_it():
    rng = np.random.default_rng(0)
    flat = np.full((6, 64, 64, 3), 120, np.uint8)
    grainy = np.clip(flat + rng.normal(0, 3, flat.shape), 0, 255).astype(np.uint8)
    back = roundtrip_mp4(grainy)
    assert back.shape == grainy.shape
    assert fmse(list(back)) < 0.5 * fmse(list(grainy))  # the encoder drops most frame-to-frame grain


def test_study_on_held_out_clips(prepared, shared_data, tmp_path):
    """The demo model on lbax4n + sbwe5n (held out from it) with 2 DDPM steps: the plumbing, the baselines and
    the verdicts (the numbers are not the model's quality)."""
    clips = [shared_data / "grid" / f"{n}.mpg" for n in ("lbax4n", "sbwe5n")]
    result = study(clips, None, data=prepared, sampler=SamplerConfig("ddpm", 4, spacing="trailing"), long_seconds=1.0,
                   strip_dir=tmp_path)
    row = result["clips"]["lbax4n"]
    assert row["speaker"] == "lbax4n" and row["not_held_out"] is None and row["shuffled_speech_from"] == ["sbwe5n"]
    assert row["real"]["mouth_spread_ratio"] == 1.0 and row["real"]["frames"] == 74
    assert row["still"]["mouth_spread_ratio"] < 0.2  # a photo's mouth does not move
    gen = row["generated"][0]
    for key in ("color_flicker", "color_drift", "fmse", "ofm", "mouth_spread", "ofm_ratio", "fmse_ratio"):
        assert math.isfinite(gen[key]) and gen[key] >= 0, key
    assert -5 <= gen["sync_lag"] <= 5 and len(gen["sync_curve"]) == 11 and "sync_other_audio" in gen
    assert result["verdicts"]["still"]["talks"] is False and result["verdicts"]["real"]["talks"] is True
    assert len(row["long"]["local_drift_per_second"]) == 1
    talk = cv2.imread(str(tmp_path / "lbax4n_talk.png"))
    assert talk.shape == (6 * 128, 10 * 128, 3)  # real / generated / shuffled, each with its mouth enlarged
    table = table_markdown(result)
    assert table.count("\n") == 6 and "| still | no |" in table and "| real | yes |" in table


def test_the_gate_judges_the_long_run_of_every_seed():
    from dheads.benchmarks.heldout_study import long_runs_of
    from dheads.benchmarks.talk_gate import long_run_rule

    flat = {"local_drift_per_second": [5.0] * 10, "grain_per_second": [700.0] * 10}
    blob = {"local_drift_per_second": [5.0] * 6 + [20.0, 30.0, 35.0, 40.0], "grain_per_second": [700.0] * 10}
    per_clip = {"lbax4n": {"long": flat, "long_more_seeds": [flat | {"seed": 1}, blob | {"seed": 3}]},
                "sbwe5n": {"long": flat}, "gone": {}}
    runs = long_runs_of(per_clip)
    assert sorted(runs) == ["lbax4n", "lbax4n@1", "lbax4n@3", "sbwe5n"]
    assert not long_run_rule(runs)["ok"]  # the blob at seed 3 fails the model though seed 0's run is flat
    assert long_run_rule({k: v for k, v in runs.items() if k != "lbax4n@3"})["ok"]


def test_study_refuses_a_clip_that_trained_the_model(prepared, shared_data, tmp_path):
    bundle = tmp_path / "demo"
    shutil.copytree(default_engine_path(), bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["training"] = {"speakers": ["sbwe5n"], "clips": ["grid/sbwe5n"]}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    clips = [shared_data / "grid" / f"{n}.mpg" for n in ("lbax4n", "sbwe5n")]
    with pytest.raises(StudyError, match=r"^sbwe5n is not held out: its speaker 'sbwe5n' trained the model"):
        study(clips, str(bundle), data=prepared, sampler=SamplerConfig("ddpm", 1), long_seconds=0)


def test_study_refuses_a_precision_its_backend_cannot_run_in_one_line(tmp_path):
    """--backend/--precision reach TalkingHead.open: a pair no backend runs is one line, exit 2, before any clip."""
    import typer
    from typer.testing import CliRunner

    from dheads.benchmarks.heldout_study import main

    app = typer.Typer()
    app.command()(main)
    res = CliRunner().invoke(app, [str(tmp_path / "lbax4n.mpg"), "--data", str(tmp_path), "--backend", "onnxruntime",
                                   "--precision", "bf16"])
    assert res.exit_code == 2
    assert res.stderr.strip() == ("heldout_study: error: the onnxruntime backend runs fp32, fp16, int8, not bf16; "
                                  "use --backend openvino")
