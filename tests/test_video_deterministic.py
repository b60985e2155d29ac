"""engine/video.py encodes the same frames to the same mp4 bytes whatever the process did before (issue #31).

libx264's AVX-512 code made the bytes depend on what the heap held (OpenVINO loaded and used in dh-serve's process
was enough to show it); the writer runs x264 without it (``video.x264_asm``). On a CPU without AVX-512 these tests
pass with or without that.
"""

from __future__ import annotations

import importlib.util
import platform
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from dheads.engine.video import write_mp4

HAS_OV = importlib.util.find_spec("openvino") is not None
GLIBC = platform.libc_ver()[0] == "glibc"


def moving_blob(n: int = 7, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    """A lit disc drifting over a wavy background, with seeded noise: uint8 [size, size, 3] (the demo's size)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    frames = []
    for i in range(n):
        r = np.hypot(xx - 32 - 6 * np.sin(i / 3), yy - 30 - 4 * np.cos(i / 4))
        img = np.stack([200 - 2 * r, 120 + 60 * np.sin(xx / 9 + i / 5), 80 + r * (1 + 0.3 * np.sin(i))], -1)
        frames.append(np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8))
    return frames


def encoded(path, frames, **kwargs) -> bytes:
    write_mp4(path, frames, fps=25, **kwargs)
    return path.read_bytes()


@pytest.mark.skipif(not GLIBC, reason="MALLOC_PERTURB_ (what a fresh allocation holds) is glibc's")
def test_the_bytes_do_not_depend_on_what_the_heap_held(tmp_path):
    # Without the fix, on an AVX-512 CPU: three perturb bytes gave three different mp4s (measured 2026-12-07).
    np.save(tmp_path / "frames.npy", np.stack(moving_blob()))
    code = ("import sys, numpy as np; from dheads.engine.video import write_mp4; "
            "write_mp4(sys.argv[2], list(np.load(sys.argv[1])), fps=25)")
    outs = []
    for perturb in ("1", "77", "200"):
        out = tmp_path / f"p{perturb}.mp4"
        env = {"MALLOC_PERTURB_": perturb, "PATH": "/usr/bin:/bin"}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "frames.npy"), str(out)], env=env, check=True,
                       timeout=60)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.skipif(not HAS_OV, reason="openvino is not installed (pip install 'diffused-heads[openvino]')")
def test_openvino_loaded_and_used_leaves_the_bytes_as_they_were(tmp_path):
    from dheads.engine.backends.base import example_inputs
    from dheads.engine.backends.openvino_ import OvDenoiser
    from dheads.engine.bundle import read_manifest
    from dheads.engine.pipeline import default_engine_path

    frames = moving_blob()
    before = encoded(tmp_path / "before.mp4", frames)
    demo = default_engine_path()
    cfg = read_manifest(demo).model
    den = OvDenoiser(demo / "unet.onnx", cfg, precision="fp32", threads=1, cache=tmp_path / "ov")
    den(*example_inputs(cfg, 1, generator=torch.Generator().manual_seed(0)).values())
    after = [encoded(tmp_path / f"after{k}.mp4", frames, threaded=k % 2 == 0) for k in range(4)]
    other: list[bytes] = []
    t = threading.Thread(target=lambda: other.append(encoded(tmp_path / "thread.mp4", frames)))
    t.start()
    t.join()
    assert all(a == before for a in after + other) and len(other) == 1
