"""The load test's bookkeeping (benchmarks/serve_load.py): lost, duplicated and out-of-order frames."""

from __future__ import annotations

import pytest

from dheads.benchmarks.serve_load import check_frames, percentile


def test_complete_stream_is_ok():
    c = check_frames([0, 1, 2, 3], 4)
    assert c.ok and c.received == 4 and c.lost == [] and c.duplicated == []


def test_lost_duplicated_and_reordered_frames_are_counted():
    c = check_frames([0, 2, 2, 1, 5], 4)
    assert not c.ok
    assert c.lost == [3] and c.duplicated == [2, 5]  # 5 is outside 0..3: counted as a bad (extra) index
    assert c.out_of_order == 2  # 2 -> 2 and 2 -> 1 go backward


def test_empty_stream_loses_everything():
    assert check_frames([], 3).lost == [0, 1, 2]


def test_percentiles():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
