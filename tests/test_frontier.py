"""The frontier tooling on a small random model and one short GRID clip: rows, matching rule, files."""

from __future__ import annotations

import dataclasses

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dheads.benchmarks.frontier import FrontierConfig, colour_stats, fewest_matching, frontier, matches, write
from dheads.engine.backends.pytorch import TorchDenoiser
from dheads.engine.config import SMALL, AudioConfig, DiffusionConfig
from dheads.engine.model import random_unet
from dheads.engine.pipeline import TalkingHead


def test_colour_stats_golden():
    ident = np.full((4, 4, 3), 100, np.uint8)
    frames = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (100, 103, 101)])
    frames[2, ..., 1] = 110  # green jumps by 7 on the last frame
    s = colour_stats(frames, ident)
    assert s["flicker"] == pytest.approx((3 + 7) / 2)
    assert s["colour_drift"] == pytest.approx((0 + 3 + 10) / 3)


def test_matching_rule_and_fewest_calls():
    ref = {"runs": [{"flicker": 1.0, "fmse": 5.0}, {"flicker": 1.4, "fmse": 6.0}],
           "mean": {"flicker": 1.2, "fmse": 5.5}, "spread": {"flicker": 0.4, "fmse": 1.0}}
    assert matches({"flicker": 1.3, "fmse": 5.9}, ref)
    assert matches({"flicker": 1.55, "fmse": 5.0}, ref)  # outside the range, within one spread of the mean
    assert not matches({"flicker": 1.7, "fmse": 5.5}, ref)
    pinned = {"runs": [{"flicker": 0.0090, "fmse": 5.0}, {"flicker": 0.0094, "fmse": 6.0}],
              "mean": {"flicker": 0.0092, "fmse": 5.5}, "spread": {"flicker": 0.0004, "fmse": 1.0}}
    assert matches({"flicker": 0.05, "fmse": 5.5}, pinned)  # 0.04 levels: below the 0.1-level floor
    assert not matches({"flicker": 0.2, "fmse": 5.5}, pinned)
    rows = [{"calls_per_frame": c, "s_per_frame": c / 10, "matches_reference": m}
            for c, m in ((2, False), (6, True), (4, True), (8, True))]
    assert fewest_matching(rows)["calls_per_frame"] == 4
    assert fewest_matching([dict(rows[0])]) is None


class _Encoder:
    dim = 32

    def __call__(self, samples):
        n = (len(samples) + 2560 - 3200) // 640 + 1
        return torch.randn(n, 32, generator=torch.Generator().manual_seed(0))


def test_frontier_runs_every_row_and_writes_json_table_png(shared_data, tmp_path):
    info = SimpleNamespace(model=SMALL, audio=AudioConfig(dim=32), diffusion=DiffusionConfig(sampling_steps=4))
    head = TalkingHead(TorchDenoiser(random_unet(SMALL, std=0.05)), info, _Encoder())
    cfg = FrontierConfig(samplers=("ddim", "dpmpp_2m"), calls=(2, 3), warm=(2,), warm_base=4,
                         reference=("ddpm", 4), seeds=(0, 1), max_seconds=0.16, face=False)
    doc = frontier(head, [shared_data / "grid" / "lbax4n.mpg"], cfg)
    assert [(r["sampler"], r["calls_per_frame"], r["warm_steps"]) for r in doc["rows"]] == [
        ("ddim", 2, 0), ("ddim", 3, 0), ("dpmpp_2m", 2, 0), ("dpmpp_2m", 3, 0), ("dpmpp_2m", 2, 2)]
    assert len(doc["reference"]["runs"]) == 2 and doc["reference"]["spread"]["flicker"] >= 0
    assert doc["real"]["lbax4n"]["fmse"] > 0
    for r in doc["rows"]:
        assert r["s_per_frame"] > 0 and r["matches_reference"] == matches(r, doc["reference"])
    js, md, png = write(doc, tmp_path, "f")
    assert json.loads(js.read_text())["rows"][0]["sampler"] == "ddim"
    assert "| dpmpp_2m | 4 | 2 | 2 |" in md.read_text()
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300

    more = dataclasses.replace(cfg, samplers=("dpmpp_2m", "unipc"), warm=())
    ext = frontier(head, [shared_data / "grid" / "lbax4n.mpg"], more, previous=doc)
    assert ext["reference"] == doc["reference"] and ext["rows"][:5] == doc["rows"]
    assert [(r["sampler"], r["steps"]) for r in ext["rows"][5:]] == [("unipc", 2), ("unipc", 3)]
    assert ext["config"]["samplers"] == ["ddim", "dpmpp_2m", "unipc"]
    with pytest.raises(ValueError, match=r"^--extend: the earlier run differs in seeds \(seeds=\[0, 1\]\); "):
        frontier(head, [shared_data / "grid" / "lbax4n.mpg"], dataclasses.replace(more, seeds=(0,)), previous=doc)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    from typer.testing import CliRunner

    from dheads.benchmarks.frontier_cli import app

    r = CliRunner().invoke(app, [str(tmp_path / "missing.mpg")])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [f"dh-frontier: error: no such file: {tmp_path / 'missing.mpg'}"]
    clip = tmp_path / "c.mpg"
    clip.write_bytes(b"x")
    r = CliRunner().invoke(app, [str(clip), "--samplers", "euler"])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [("dh-frontier: error: unknown sampler 'euler'; choose one of "
                                         "ddpm, ddim, dpmpp_2m, dpmpp_2m_sde, unipc")]
