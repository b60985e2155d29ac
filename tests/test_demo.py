"""The README's demo command on the shipped demo model: a real talking-face mp4 comes out.

Runs exactly the quickstart's `dh-run engine/assets/examples/face.png engine/assets/examples/speech.wav
-o out.mp4` (no --engine: the packaged model, ONNX Runtime, the DDIM schedule it records).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from dheads.engine.audio import load_audio, num_frames
from dheads.engine.face import FaceLandmarker
from dheads.engine.pipeline import default_engine_path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "engine" / "assets" / "examples"


def test_demo_assets_are_packaged():
    demo = default_engine_path()
    assert (demo / "manifest.json").is_file() and (demo / "unet.onnx").is_file()
    assert (demo / "TRAINING.md").is_file()
    size = sum(p.stat().st_size for p in demo.iterdir())
    assert size < 30 * 2**20, size  # ships inside the wheel


def test_readme_demo_command(tmp_path):
    out = tmp_path / "out.mp4"
    dh_run = Path(sys.executable).with_name("dh-run")
    cmd = [str(dh_run), str(EXAMPLES / "face.png"), str(EXAMPLES / "speech.wav"), "-o", str(out)]
    assert " ".join(["dh-run", "engine/assets/examples/face.png", "engine/assets/examples/speech.wav",
                     "-o", "out.mp4"]) in (REPO / "README.md").read_text()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples, rate = load_audio(EXAMPLES / "speech.wav")
    n = num_frames(samples.size)
    with av.open(str(out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.average_rate == 25
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert float(a.duration * a.time_base) == pytest.approx(samples.size / rate, abs=0.07)
    assert len(frames) == n == 100
    # A face must be there: MediaPipe finds one in (upscaled) generated frames.
    found = 0
    with FaceLandmarker(max_faces=1) as lm:
        for img in frames[::10]:
            big = cv2.resize(np.ascontiguousarray(img), (256, 256), interpolation=cv2.INTER_CUBIC)
            found += len(lm.detect(big)) == 1
    assert found >= 8, f"face found in only {found}/10 sampled frames"
