"""The README's demo command on the shipped demo model: a real talking-face mp4 comes out.

Runs exactly the quickstart's `dh-run engine/assets/examples/face.png engine/assets/examples/speech.wav
-o out.mp4` (no --engine: the packaged model, ONNX Runtime, the sampler it records).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dheads.engine.pipeline import default_engine_path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "engine" / "assets" / "examples"


def test_demo_assets_are_packaged():
    demo = default_engine_path()
    assert (demo / "manifest.json").is_file() and (demo / "unet.onnx").is_file()
    size = sum(p.stat().st_size for p in demo.iterdir())
    assert size < 30 * 2**20, size  # ships inside the wheel


@pytest.mark.slow
def test_readme_demo_command(tmp_path):
    """Slow (2 min on 2 cores), so not in ``make test``: CI's quickstart runs the same command in a fresh
    clone and the same checks (``_demo_check.py``) on its output."""
    from _demo_check import check_demo_video

    out = tmp_path / "out.mp4"
    dh_run = Path(sys.executable).with_name("dh-run")
    cmd = [str(dh_run), str(EXAMPLES / "face.png"), str(EXAMPLES / "speech.wav"), "-o", str(out)]
    assert " ".join(["dh-run", "engine/assets/examples/face.png", "engine/assets/examples/speech.wav",
                     "-o", "out.mp4"]) in (REPO / "README.md").read_text()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    check_demo_video(out)
