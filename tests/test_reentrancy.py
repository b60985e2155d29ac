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
