"""Thread policy (dheads.engine.threads) and progress lines for logs (dheads.engine.progress)."""

from __future__ import annotations

import logging

import pytest
import torch

from dheads.engine import threads
from dheads.engine.progress import ProgressLog


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    return monkeypatch


def test_auto_takes_omp_num_threads_when_set(no_env):
    no_env.setenv("OMP_NUM_THREADS", "3")
    assert threads.auto_threads() == (3, "OMP_NUM_THREADS=3")


def test_auto_leaves_the_cores_the_load_keeps_busy(no_env):
    no_env.setattr(threads, "busy_cores", lambda: 6)
    assert threads.auto_threads()[0] == 2
    no_env.setattr(threads, "busy_cores", lambda: 11)  # oversubscribed: still one thread, never zero
    assert threads.auto_threads()[0] == 1


def test_busy_cores_is_the_load_average_capped_by_what_runs_now(monkeypatch, tmp_path):
    """A job that just ended leaves the 1-minute load high; the runnable count says the cores are free."""
    avg = tmp_path / "loadavg"
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (2.1, 1.5, 0.9))
    avg.write_text("2.10 1.50 0.90 1/312 4242\n")  # only the reader itself runs: the last job has ended
    monkeypatch.setattr(threads, "LOADAVG", str(avg))
    assert threads.busy_cores() == 0
    avg.write_text("2.10 1.50 0.90 3/312 4242\n")  # two other tasks running: the load average stands
    assert threads.busy_cores() == 2
    avg.write_text("2.10 1.50 0.90 9/312 4242\n")  # a burst now, but the load says one minute was lighter
    assert threads.busy_cores() == 2
    avg.write_text("garbage")  # unreadable: the load average alone
    assert threads.busy_cores() == 2
    assert threads.runnable_others(str(tmp_path / "missing"), 2, 0.0) is None


def test_runnable_count_stops_reading_once_it_reaches_what_the_caller_needs(monkeypatch, tmp_path):
    """Start-up pays for the repeated readings only where they can lower the count."""
    avg = tmp_path / "loadavg"
    naps = []
    monkeypatch.setattr(threads.time, "sleep", naps.append)
    avg.write_text("2.10 1.50 0.90 3/312 4242\n")
    assert threads.runnable_others(str(avg), 5, 0.02, enough=2) == 2 and naps == []  # one reading sufficed
    assert threads.runnable_others(str(avg), 5, 0.02, enough=3) == 2 and naps == [0.02] * 4  # all five
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.2, 0.1, 0.1))
    monkeypatch.setattr(threads, "LOADAVG", str(tmp_path / "missing"))
    naps.clear()
    assert threads.busy_cores() == 0 and naps == []  # an idle load average needs no readings


def test_training_splits_the_free_cores_over_the_ranks_of_a_node(no_env):
    no_env.setattr(threads, "busy_cores", lambda: 0)
    no_env.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.training_policy().torch == 2
    assert threads.training_policy(5).torch == 5  # --threads wins


def test_runtime_gives_torch_one_thread_unless_it_runs_the_unet(no_env):
    no_env.setattr(threads, "busy_cores", lambda: 0)
    ort = threads.runtime_policy(None)
    assert (ort.torch, ort.onnxruntime) == (1, 8)
    assert threads.runtime_policy(3, unet_on_torch=True).torch == 3


def test_apply_sets_torch_threads():
    threads.apply(threads.ThreadPolicy(torch=2))
    assert torch.get_num_threads() == 2
    threads.apply(threads.ThreadPolicy(torch=1))
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("value, want", [(None, None), (0, None), (4, 4)])
def test_parse_threads(value, want):
    assert threads.parse_threads(value) == want


def test_parse_threads_refuses_negative():
    with pytest.raises(ValueError, match=r"--threads must be 0 \(auto\) or a positive count, got -1"):
        threads.parse_threads(-1)


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_log_lines_at_intervals_and_at_the_end(caplog):
    clock = _Clock()
    plog = ProgressLog(logging.getLogger("dheads.test.progress"), "frames", every_s=10, clock=clock)
    logged = []
    with caplog.at_level(logging.INFO, logger="dheads.test.progress"):
        for done in range(1, 21):
            clock.t = done * 2.0  # one frame every 2 s
            logged.append(plog.update(done, 20))
    assert [i + 1 for i, x in enumerate(logged) if x] == [1, 6, 11, 16, 20]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[1] == "frames 6/20, 0.50 fps, 12 s elapsed, ~28 s left"  # 6 frames in 12 s; 14 left at 2 s
    assert lines[-1] == "frames 20/20, 0.50 fps, 40 s elapsed"


def test_progress_log_given_rate_and_extra_fields(caplog):
    clock = _Clock()
    plog = ProgressLog(logging.getLogger("dheads.test.progress"), "step", every_s=0, unit="samples/s", clock=clock)
    with caplog.at_level(logging.INFO, logger="dheads.test.progress"):
        clock.t = 4.0
        plog.update(5, 10, 22.5, loss=0.12345)
    assert caplog.records[0].getMessage() == "step 5/10, 22.50 samples/s, 4 s elapsed, ~20 s left, loss 0.1235"


@pytest.mark.parametrize("module", ["dheads.engine.cli", "dheads.export.cli", "dheads.benchmarks.cli",
                                    "dheads.training.cli"])
def test_help_does_not_import_torch(module):
    """``--help`` must be instant: torch alone takes seconds to import on a busy machine."""
    import subprocess
    import sys

    code = (f"import sys; sys.argv = ['x', '--help']\nfrom {module} import main\ntry:\n    main()\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print('heavy:', sorted(m for m in ('torch', 'onnxruntime', 'ctranslate2', 'mediapipe') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "heavy: []", r.stdout[-500:]
