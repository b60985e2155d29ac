"""A stop signal (``cli_errors.Interrupted``) at the moments where MP4Writer and the frame loop's ``dh-encode`` feed
start something: the ``.part`` file just made, a thread whose ``start()`` has not returned. Each must unwind as the
interrupt, leave no file and no thread behind.

``Thread.start()`` launches the thread and then waits for it to run; the signal handler's exception can come out of
that wait (CI met it: SIGHUP just after the ``.part`` appeared, exit 1). ``interrupted_start`` does what ``start()``
then did: the thread is launched (or, ``launched`` False, not) and runs only a moment later, and ``start()`` raises.
"""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest
import torch

from dheads.engine import video
from dheads.engine.cli_errors import Interrupted
from dheads.engine.generate import _RowFeed
from dheads.engine.video import MP4Writer


def interrupted_start(monkeypatch, prefix: str, launched: bool) -> threading.Event:
    """Make ``start()`` of the next thread named ``prefix...`` raise Interrupted(SIGHUP) before the thread is seen
    running: out of its wait for the thread, which runs 0.2 s later (``launched`` False: before it is launched). The
    event is set once that thread has ended (at once where it never runs)."""
    real_start, real_bootstrap, ended = threading.Thread.start, threading.Thread._bootstrap, threading.Event()

    def interrupted(timeout=None):
        raise Interrupted(signal.SIGHUP)

    def start(self):
        if not self.name.startswith(prefix):
            return real_start(self)
        if not launched:
            ended.set()
            raise Interrupted(signal.SIGHUP)
        self._started.wait = interrupted  # start()'s own wait for the new thread is where the signal lands
        return real_start(self)

    def bootstrap(self):
        if not self.name.startswith(prefix):
            return real_bootstrap(self)
        time.sleep(0.2)
        try:
            real_bootstrap(self)
        finally:
            ended.set()

    monkeypatch.setattr(threading.Thread, "start", start)
    monkeypatch.setattr(threading.Thread, "_bootstrap", bootstrap)
    return ended


def frame() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("launched", [True, False], ids=["runs-late", "never-runs"])
def test_a_stop_signal_while_the_encoder_thread_starts_leaves_nothing(tmp_path, monkeypatch, launched):
    """Before the fix abort() asked join() of that thread: "cannot join thread before it is started" replaced the
    interrupt and the .part stayed."""
    ended = interrupted_start(monkeypatch, "mp4-", launched)
    with pytest.raises(Interrupted):
        with MP4Writer(tmp_path / "out.mp4", audio=np.zeros(16000, np.float32)) as w:
            w.write(frame())
    assert list(tmp_path.iterdir()) == []
    assert ended.wait(10), "the encoder thread that ran late did not end"


def test_a_stop_signal_just_after_the_part_file_is_made_leaves_nothing(tmp_path, monkeypatch):
    """Between mkstemp and the writer knowing the name (its chmod): before the fix the .part stayed."""
    def interrupted():
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(video, "file_mode", interrupted)
    with pytest.raises(Interrupted):
        with MP4Writer(tmp_path / "out.mp4") as w:
            w.write(frame())
    assert list(tmp_path.iterdir()) == []


class _Rows:
    """A StreamedRows stand-in that counts the batches its producer took."""

    n = 8

    def __init__(self):
        self.taken = 0

    def batches(self):
        for _ in range(4):
            self.taken += 1
            yield torch.zeros(2, 3)


def test_a_stop_signal_while_the_encode_feed_starts_stops_its_thread(monkeypatch):
    """No one close()s a feed whose start() raised; before the fix its thread, once running, encoded ``ahead``
    batches and then waited for a permit for ever."""
    ended = interrupted_start(monkeypatch, "dh-encode", launched=True)
    rows = _Rows()
    with pytest.raises(Interrupted):
        _RowFeed(rows, "cpu", ahead=2)
    assert ended.wait(10), "the dh-encode thread did not end"
    assert rows.taken == 0
