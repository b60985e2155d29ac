"""A reduced precision passes when its mean over seeds lies inside the fp32 seed spread of every metric (known answers)."""

from __future__ import annotations

import pytest

from dheads.benchmarks.precision_parity import METRICS, compare, join, markdown, per_seed


def study(per_clip_seed: dict[str, list[float]], talks: bool = True, precision: str = "fp32") -> dict:
    """A heldout_study result whose every metric is the given value per clip and seed."""
    return {"backend": "openvino", "precision": precision, "seeds": [0, 1, 2],
            "clips": {c: {"generated": [{m: v for m in METRICS} for v in vals]} for c, vals in per_clip_seed.items()},
            "verdicts": {"generated": {"talks": talks}}}


FP32 = study({"a": [1.0, 2.0, 3.0], "b": [3.0, 4.0, 5.0]})  # per seed, mean over clips: 2, 3, 4


def test_per_seed_means_over_clips():
    assert per_seed(FP32, "sync") == [2.0, 3.0, 4.0]


@pytest.mark.parametrize("vals_a, vals_b, talks, passed", [
    ([1.1, 2.1, 3.1], [3.1, 4.1, 5.1], True, True),   # mean 3.1, inside [2, 4]
    ([3.0, 3.5, 4.0], [5.0, 5.0, 5.0], True, False),  # mean 4.25, outside
    ([1.0, 2.0, 3.0], [3.0, 4.0, 5.0], False, False),  # same numbers, but it no longer talks
])
def test_inside_the_spread_passes(vals_a, vals_b, talks, passed):
    r = compare(FP32, study({"a": vals_a, "b": vals_b}, talks, "bf16"))
    assert r["passed"] is passed and r["engine"] == "openvino bf16"
    assert r["metrics"]["sync"]["fp32_min"] == 2.0 and r["metrics"]["sync"]["fp32_max"] == 4.0
    assert "| openvino bf16 |" in markdown(FP32, [r])


def test_studies_of_other_clips_or_seeds_are_refused():
    with pytest.raises(ValueError, match="differ in clips or seeds"):
        compare(FP32, study({"a": [1.0, 2.0, 3.0]}))


def test_studies_on_other_seeds_join_into_one():
    more = study({"a": [5.0, 7.0, 9.0], "b": [5.0, 7.0, 9.0]})
    more["seeds"] = [3, 4, 5]
    joined = join([FP32, more])
    assert joined["seeds"] == [0, 1, 2, 3, 4, 5] and per_seed(joined, "sync") == [2.0, 3.0, 4.0, 5.0, 7.0, 9.0]
    with pytest.raises(ValueError, match="repeat a seed"):
        join([FP32, FP32])
    with pytest.raises(ValueError, match="share clips, backend and precision"):
        join([FP32, study({"a": [1.0, 2.0, 3.0], "b": [1.0, 2.0, 3.0]}, precision="bf16")])
