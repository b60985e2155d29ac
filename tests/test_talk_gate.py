"""The talking gate (benchmarks/talk_gate.py) and the mouth-motion metrics: a still photo and a face that moves
to another clip's speech must fail; real video must pass. Measured on the 7 real GRID clips (MediaPipe on
their frames, ~10 s in all), with variants made by recombining them:

* ``real``: each clip's own frames, scored against its own speech (and ``sync_other_audio`` against the rest);
* ``still``: each clip's first frame repeated;
* ``wrong``: the next clip's frames scored against this clip's speech (a mouth that talks, to other words);
* ``shuffled``: the clip after that one, likewise (the baseline the gate compares with).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dheads.benchmarks import metrics as M
from dheads.benchmarks.talk_gate import LONG_RULE, TalkGate, av_offset, judge, long_run_rule

FPS = 25


def test_mouth_motion_known_answers():
    x = np.concatenate([np.zeros(25), np.tile([0.0, 0.2], 13)[:25], [np.nan, 0.1]])  # 52 frames
    motion = M.mouth_motion(x, FPS)
    assert len(motion.std_per_second) == 2  # whole seconds only: the last 2 frames are dropped
    assert motion.std_per_second[0] == 0.0 and motion.std_per_second[1] == pytest.approx(np.std(np.tile([0.0, 0.2], 13)[:25]))
    assert motion.spread == pytest.approx(0.2)  # 5-95%: 0 .. 0.2 (the NaN interpolated to 0.15)
    assert M.mouth_motion(np.full(10, 0.3), FPS).spread == 0.0
    assert math.isnan(M.mouth_motion(np.full(5, np.nan), FPS).spread)


def test_ratio_to_real_and_its_two_sided_distance():
    assert M.ratio_to_real(0.1, 0.2) == 0.5 and M.ratio_to_real(1.0, 0.0) is None and M.ratio_to_real(None, 1) is None
    assert M.log_distance(2.0) == pytest.approx(M.log_distance(0.5))  # twice too much = half too little
    assert M.log_distance(1.0) == 0.0 and M.log_distance(0.0) == math.inf and math.isnan(M.log_distance(None))


def test_a_mouth_that_never_moves_has_zero_sync_not_nan():
    loud = np.sin(np.arange(75) / 3.0)
    assert M.speech_sync(np.full(75, 0.2), loud) == M.LipSync(corr=0.0, lag=0)
    lagged = M.speech_sync(np.roll(loud, 4), loud)  # the mouth 4 frames behind the speech
    assert lagged.lag == 4 and lagged.corr > 0.9
    assert M.sync_curve(np.roll(loud, 4), loud, max_lag=5).shape == (11,)


def test_av_offset_is_the_peak_of_the_mean_curve():
    a = np.array([0.1, 0.2, 0.5, 0.2, 0.1])  # lags -2..2: peak at 0
    b = np.array([0.0, 0.9, 0.4, 0.0, np.nan])  # peak at -1; NaN counts as 0
    assert av_offset([a, b], 2) == (-1, pytest.approx(0.55))
    assert av_offset([a], 2) == (0, pytest.approx(0.5))


@pytest.fixture(scope="module")
def grid(shared_data):
    """Per GRID clip: mouth opening of its frames, of its first frame repeated, and its speech envelope."""
    pytest.importorskip("dheads.engine.face")
    from dheads.benchmarks.evaluate import frame_signals
    from dheads.engine.audio import load_audio
    from dheads.engine.video import read_frames

    clips = sorted((shared_data / "grid").glob("*.mpg"))
    if len(clips) < 4:
        pytest.skip("needs the GRID clips in shared/data/grid")
    out = {}
    for c in clips:
        frames = list(read_frames(c))
        mouth = frame_signals(frames)[0]
        still = frame_signals([frames[0]] * len(frames))[0]
        out[c.stem] = (mouth, still, M.loudness_envelope(load_audio(c)[0], 16000, len(mouth), FPS))
    return out


def _score(mouth: np.ndarray, loud: np.ndarray, real_mouth: np.ndarray, others=()) -> dict:
    n = min(len(mouth), len(loud))
    mouth, loud = mouth[:n], loud[:n]
    sync = M.speech_sync(mouth, loud)
    row = {"mouth_spread_ratio": M.ratio_to_real(M.mouth_motion(mouth, FPS).spread,
                                                 M.mouth_motion(real_mouth, FPS).spread),
           "sync": sync.corr, "sync_curve": M.sync_curve(mouth, loud, max_lag=M.SYNC_MAX_LAG)}
    if others:
        row["sync_other_audio"] = float(np.mean([M.speech_sync(mouth[: len(o)], o[: len(mouth)]).corr for o in others]))
    return row


@pytest.fixture(scope="module")
def scores(grid):
    names = list(grid)
    out = {"real": [], "still": [], "wrong": [], "shuffled": []}
    for i, name in enumerate(names):
        mouth, still, loud = grid[name]
        others = [grid[o][2] for o in names if o != name]
        out["real"].append(_score(mouth, loud, mouth, others))
        out["still"].append(_score(still, loud, mouth))
        out["wrong"].append(_score(grid[names[(i + 1) % len(names)]][0], loud, mouth))
        out["shuffled"].append(_score(grid[names[(i + 2) % len(names)]][0], loud, mouth))
    return out


def test_real_video_talks(scores):
    verdict = judge(scores, "real")
    assert verdict.passed, verdict.rules


def test_a_still_photo_fails(scores):
    verdict = judge(scores, "still")
    assert not verdict.passed
    assert {"mouth spread 0.7-1.3x real on every clip", "beats the still photo (spread and sync)"} <= set(
        verdict.failures())
    assert max(verdict.rules["mouth spread 0.7-1.3x real on every clip"]["ratios"]) < 0.2  # MediaPipe jitter only


def test_a_face_moving_to_another_clips_speech_fails(scores):
    """It moves like a talking face (its spread is a real speaker's) but not with this speech."""
    verdict = judge(scores, "wrong")
    assert not verdict.passed
    assert "sync above the shuffled-audio baseline" in verdict.failures(), verdict.rules


def test_a_mouth_moving_too_much_fails_the_two_sided_spread(scores):
    loud = [{**s, "mouth_spread_ratio": 2.0} for s in scores["real"]]
    verdict = judge({**scores, "loud": loud}, "loud")
    assert verdict.failures() == ["mouth spread 0.7-1.3x real on every clip"]
    strict = judge(scores, "real", TalkGate(spread_lo=1.01))
    assert "mouth spread 0.7-1.3x real on every clip" in strict.failures()


FLAT = {"local_drift_per_second": [6.2, 6.8, 5.9, 6.4, 7.9, 6.2, 8.4, 6.5, 5.4, 6.4],
        "grain_per_second": [683, 694, 688, 691, 683, 675, 681, 686, 687, 692]}
BLOB = {"local_drift_per_second": [4.3, 4.2, 3.3, 3.8, 4.4, 5.3, 16.3, 22.2, 26.0, 33.7],  # eyes turn to a blob at 7 s
        "grain_per_second": [662, 667, 667, 668, 655, 646, 683, 735, 732, 866]}


def test_a_long_run_that_ends_as_it_started_passes_and_one_that_grows_fails():
    assert long_run_rule({"a": FLAT, "b": FLAT})["ok"]
    rule = long_run_rule({"a": FLAT, "b": BLOB})
    assert not rule["ok"]
    assert math.isclose(rule["growth"]["b"]["local_drift"], (26.0 + 33.7) / (4.3 + 4.2))
    grainy = {"local_drift_per_second": FLAT["local_drift_per_second"], "grain_per_second": [600] * 8 + [720, 720]}
    assert not long_run_rule({"a": grainy})["ok"]  # 1.2x the grain, the drift flat
    assert long_run_rule({"a": grainy}, TalkGate(long_grain_growth=1.25))["ok"]
    one_second = {"local_drift_per_second": [9.0], "grain_per_second": [700.0]}
    assert long_run_rule({"a": one_second})["growth"]["a"] == {"local_drift": 1.0, "grain": 1.0}


def test_the_long_run_rule_joins_the_verdict_only_when_long_runs_are_given(scores):
    assert LONG_RULE not in judge(scores, "real").rules
    assert judge(scores, "real", long_runs={"a": FLAT}).passed
    verdict = judge(scores, "real", long_runs={"a": FLAT, "b": BLOB})
    assert verdict.failures() == [LONG_RULE]
