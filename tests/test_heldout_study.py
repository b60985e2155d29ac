"""The held-out study (benchmarks/heldout_study.py): colour, smoothness, lip sync and a long run on clips
a model never saw. Run here on the packaged demo model with 2 DDPM steps (fast; the numbers are not the
model's quality, only the study's plumbing and formulas)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from dheads.benchmarks.heldout_study import grain, per_second, study, study_sampler
from dheads.engine.config import SamplerConfig


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


def test_study_on_a_held_out_clip(shared_data, tmp_path):
    clip = shared_data / "grid" / "lbax4n.mpg"
    control = shared_data / "grid" / "bbaf2n.mpg"
    result = study([clip], None, controls=[control], sampler=SamplerConfig("ddpm", 2), long_seconds=1.0,
                   strip_dir=tmp_path)
    row = result["clips"]["lbax4n"]
    assert row["frames"] == 74
    for key in ("color_flicker", "color_drift", "color_drift_max", "fmse", "ofm"):
        assert math.isfinite(row[key]) and row[key] >= 0, key
    assert row["color_drift_max"] >= row["color_drift"]
    assert len(row["long"]["color_drift_per_second"]) == 1 and len(row["long"]["grain_per_second"]) == 1
    assert len(row["long"]["local_drift_per_second"]) == 1 and 0 < row["long"]["local_drift_per_second"][0] < 255
    assert "lip_own" in row and "lip_other_mean" in row  # the control's audio is the mismatched pair
    strip = cv2.imread(str(tmp_path / "lbax4n_long.png"))
    assert strip.shape == (128, 2 * 128, 3)  # identity + one frame a second, 64 px upscaled 2x
    assert result["summary"]["color_flicker"] == row["color_flicker"]
