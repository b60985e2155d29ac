"""Checks of the README demo command's output, shared by tests/test_demo.py and CI's quickstart.

``python tests/_demo_check.py out.mp4``: exit 0 when out.mp4 is the demo video it should be (25 fps,
one frame per 40 ms of the example speech, the audio track as long as the speech, a face MediaPipe
finds in at least 8 of 10 sampled frames); else one line on stderr and exit 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import av
import cv2
import numpy as np

from dheads.engine.audio import load_audio, num_frames
from dheads.engine.face import FaceLandmarker

EXAMPLES = Path(__file__).resolve().parents[1] / "engine" / "assets" / "examples"


def check_demo_video(out: Path) -> None:
    """AssertionError naming what is wrong with ``out``."""
    samples, rate = load_audio(EXAMPLES / "speech.wav")
    n = num_frames(samples.size)
    with av.open(str(out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.average_rate == 25, f"{v.average_rate} fps, expected 25"
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        seconds = float(a.duration * a.time_base)
        assert abs(seconds - samples.size / rate) <= 0.07, f"audio {seconds:.3f} s, speech {samples.size / rate:.3f} s"
    assert len(frames) == n == 100, f"{len(frames)} frames, expected {n} (= 100)"
    found = 0
    with FaceLandmarker(max_faces=1) as lm:  # a face must be there: MediaPipe finds one in upscaled frames
        for img in frames[::10]:
            big = cv2.resize(np.ascontiguousarray(img), (256, 256), interpolation=cv2.INTER_CUBIC)
            found += len(lm.detect(big)) == 1
    assert found >= 8, f"face found in only {found}/10 sampled frames"


if __name__ == "__main__":
    try:
        check_demo_video(Path(sys.argv[1]))
    except AssertionError as e:
        print(f"demo video check failed: {e}", file=sys.stderr)
        sys.exit(1)
