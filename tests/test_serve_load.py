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


def test_a_round_counts_refusals_and_places_in_line_apart_from_served_streams():
    from dheads.benchmarks.serve_load import StreamResult, parse_seconds_at, summarize

    def served(first, positions=(), frames=4):
        return StreamResult(frames, 4, first, 2.0, check_frames(list(range(frames)), 4), None, 1000, False,
                            list(positions), frames == 4)

    busy = StreamResult(0, 4, float("nan"), float("nan"), check_frames([], 4),
                        "server busy: 64 streams open, at most 64", 1013, True)
    queue = StreamResult(0, 4, float("nan"), float("nan"), check_frames([], 4),
                         "server busy: 32 streams already waiting", 1013, True)
    r = summarize(5, 0.4, [served(1.0), served(2.0, [2, 1]), served(3.0, [1], frames=3), busy, queue], 10.0,
                  500.0, 300.0)
    assert (r.served, r.refused_busy, r.queued, r.max_queue_position) == (2, 2, 2, 2)
    assert r.refusals == {"server busy: N streams open, at most N": 1, "server busy: N streams already waiting": 1}
    assert r.lost == 1 and r.errors == 0  # a refusal is not an error; the short stream's missing frame is lost
    assert r.first_frame_p50_s == 2.0 and r.first_frame_p95_s == pytest.approx(2.9)
    assert r.total_fps == pytest.approx(1.1) and (r.rss_mib_after, r.prep_rss_mib_after) == (500.0, 300.0)
    assert parse_seconds_at("100=0.4, 8=1") == {100: 0.4, 8: 1.0}
