"""The README's two quickstart commands work in sequence: `make test` after command 1 installs the dev extras.

``.ci/quickstart`` (what ``.ci/run`` does) runs both commands for real in a fresh clone; here the Makefile's
logic is checked in milliseconds against a fake ``.venv`` whose python/pip only log what they are asked.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _readme_commands() -> list[str]:
    spec = importlib.util.spec_from_file_location("readme_commands", REPO / ".ci" / "readme_commands.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.quickstart_commands((REPO / "README.md").read_text(encoding="utf-8"))


def test_readme_quickstart_is_install_and_demo_then_make_test():
    first, second = _readme_commands()
    assert first.startswith("python3 -m venv .venv && ") and ".venv/bin/dh-run " in first
    assert ".venv/bin/pip install -q ." in first  # no dev extras: make test must add them
    assert second == "make test"


FAKE = """#!/bin/sh
echo "{name} $*" >> "{log}"
case "$*" in
  *"import pytest"*) [ -f "{venv}/has_pytest" ] ;;
  *"install -q -e .[dev]"*) touch "{venv}/has_pytest" ;;
esac
"""


def _fake_venv(tmp_path, *, dh_run=True, pytest_installed=False):
    venv, log = tmp_path / "venv", tmp_path / "log"
    (venv / "bin").mkdir(parents=True)
    for name in ("python", "pip"):
        exe = venv / "bin" / name
        exe.write_text(FAKE.format(name=name, log=log, venv=venv))
        exe.chmod(0o755)
    if dh_run:  # what quickstart command 1 leaves: a venv with the package, newer than pyproject.toml
        (venv / "bin" / "dh-run").touch()
    if pytest_installed:
        (venv / "has_pytest").touch()
    return venv, log


def _make_test(venv, log) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    r = subprocess.run(["make", "-s", "-C", str(REPO), "test", f"VENV={venv}", "PY=false"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return log.read_text().splitlines()


def test_make_test_after_quickstart_command_1_installs_dev_extras_before_pytest(tmp_path):
    venv, log = _fake_venv(tmp_path)
    calls = _make_test(venv, log)
    dev = calls.index("pip install -q -e .[dev]")
    assert calls.index("python -m pytest -q") > dev
    assert (venv / ".dheads-dev-installed").is_file()


def test_make_test_reinstalls_when_pytest_went_missing_after_the_stamp(tmp_path):
    venv, log = _fake_venv(tmp_path)
    (venv / ".dheads-dev-installed").touch()  # stamp newer than pyproject.toml, but no pytest
    calls = _make_test(venv, log)
    assert calls.index("python -m pytest -q") > calls.index("pip install -q -e .[dev]")


def test_make_test_in_a_complete_venv_installs_nothing(tmp_path):
    venv, log = _fake_venv(tmp_path, pytest_installed=True)
    (venv / ".dheads-dev-installed").touch()
    calls = _make_test(venv, log)
    assert not [c for c in calls if c.startswith("pip")]
    assert calls[-1] == "python -m pytest -q"
