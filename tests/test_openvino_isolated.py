"""The OpenVINO backend's, int8 export's and --device auto's OpenVINO tests, run in a pytest process of their own.

With OpenVINO loaded in the suite's process, a later in-process ``dh-run`` on a PyTorch checkpoint
(tests/test_training_e2e.py::test_dh_run_takes_the_checkpoint) died of a segmentation fault, taking the
whole run with it (2026-12-07; the cause is not found yet). Here they run apart and must all pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'diffused-heads[openvino]')")

TESTS = Path(__file__).resolve().parent


def test_openvino_and_int8_tests_pass_in_their_own_process():
    env = {**os.environ, "DHEADS_OPENVINO_ISOLATED": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "test_openvino.py"),
                           str(TESTS / "test_int8.py"), str(TESTS / "test_cpu_choice.py")], capture_output=True, text=True, env=env, timeout=900,
                          cwd=TESTS.parent)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
