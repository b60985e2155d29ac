"""Streams on one TalkingHead do not share state: interleaved ``frames()`` generators give what each gives alone."""

from __future__ import annotations

import numpy as np
import torch

from _small_bundle import small_model
from dheads.engine.backends import open_denoiser
from dheads.engine.checkpoint import checkpoint_from_model, save_checkpoint
from dheads.engine.config import SMALL, SamplerConfig
from dheads.engine.pipeline import Inputs, TalkingHead


def _inputs(seed: int, n: int) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    return Inputs(identity=torch.rand(1, 3, SMALL.image_size, SMALL.image_size, generator=g) * 2 - 1,
                  samples=np.zeros(n * 640, np.float32), audio_emb=torch.randn(n, SMALL.audio_dim, generator=g))


def test_interleaved_generators_equal_each_stream_alone(tmp_path):
    ckpt = save_checkpoint(tmp_path / "small.pt", checkpoint_from_model(small_model()))
    den, info = open_denoiser(ckpt, device="cpu")
    head = TalkingHead(den, info, encoder=None)
    sampler = SamplerConfig("ddpm", 3)
    a, b = _inputs(1, 6), _inputs(2, 4)
    alone_a = list(head.frames(a, sampler=sampler, seed=1))
    alone_b = list(head.frames(b, sampler=sampler, seed=2))
    assert not np.array_equal(alone_a[0], alone_b[0])

    ga, gb = head.frames(a, sampler=sampler, seed=1), head.frames(b, sampler=sampler, seed=2)
    got_a, got_b = [], []
    for _ in range(6):  # a, b, a, b, ...: the second stream starts while the first holds the cached loop
        got_a.append(next(ga))
        if len(got_b) < 4:
            got_b.append(next(gb))
    assert next(ga, None) is None and next(gb, None) is None
    for got, alone in ((got_a, alone_a), (got_b, alone_b)):
        assert len(got) == len(alone)
        for i, (x, y) in enumerate(zip(got, alone)):
            assert np.array_equal(x, y), f"frame {i} differs by up to {np.abs(x.astype(int) - y).max()}/255"
    assert len(head._loops) == 1  # both loops went back; one is kept per config


_RUN = """
import hashlib, sys
import numpy as np
from dheads.engine.config import SamplerConfig
from dheads.engine.pipeline import TalkingHead
head = TalkingHead.open(None, device="cpu", threads=int(sys.argv[1]))
x = head.prepare(sys.argv[2], sys.argv[3], max_seconds=0.6)
frames = np.stack(list(head.frames(x, sampler=SamplerConfig("ddpm", 4), seed=3)))
print(hashlib.sha256(x.audio_emb.numpy().tobytes()).hexdigest(), hashlib.sha256(frames.tobytes()).hexdigest())
"""


def test_same_seed_same_video_across_processes_and_thread_counts():
    """The demo (ONNX Runtime + Whisper on CTranslate2) in two processes, 1 and 2 threads: the same
    features and the same frames, bit for bit (the seed promise in docs/running.md)."""
    import subprocess
    import sys

    from dheads.engine.pipeline import default_engine_path

    ex = default_engine_path().parent / "examples"
    procs = [subprocess.Popen([sys.executable, "-c", _RUN, str(n), str(ex / "face.png"), str(ex / "speech.wav")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]  # at once: each also runs while the other loads
    for p, (_, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-2000:]
    first, second = (stdout.split() for stdout, _ in outs)
    assert len(first) == 2 and first == second
