"""Warm start: frames after the first begin from the previous frame noised to the warm step."""

from __future__ import annotations

import pytest
import torch

from dheads.engine.backends.pytorch import TorchDenoiser
from dheads.engine.config import SMALL, SamplerConfig
from dheads.engine.generate import FrameLoop, LoopConfig, generate_frames
from dheads.engine.model import random_unet
from dheads.engine.plan import make_plan
from dheads.engine.reference import generate_reference


class Counting(TorchDenoiser):
    def __init__(self, model):
        super().__init__(model)
        self.calls: list[float] = []

    def __call__(self, x, t, *rest):
        self.calls.append(float(t[0]))
        return super().__call__(x, t, *rest)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_warm_frames_run_only_the_steps_below_the_warm_step(name):
    model = random_unet(SMALL, std=0.05)
    g = torch.Generator().manual_seed(7)
    ident, audio = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.randn(3, 32, generator=g)
    sampler = SamplerConfig(name, 8, warm_steps=3)
    plan = make_plan(sampler=sampler)
    assert (plan.calls(False), plan.calls(True)) == (8, 3)
    den = Counting(model)
    loop = FrameLoop(den, LoopConfig(sampler=sampler))
    got = torch.cat(list(generate_frames(den, ident, audio, config=loop.config, loop=loop, seed=1)))
    ts = [float(t) for t in plan.schedule.timesteps]
    assert den.calls == ts[::-1] + ts[2::-1] * 2  # 8 calls, then 3 per warm frame from t_2 down
    ref = generate_reference(model, ident, audio, sampler=sampler, seed=1)
    assert torch.equal(got, ref)
    cold = generate_reference(model, ident, audio, sampler=SamplerConfig(name, 8), seed=1)
    assert torch.equal(cold[0], ref[0]) and not torch.equal(cold[1], ref[1])
    den.calls.clear()  # a new video starts cold again
    list(generate_frames(den, ident, audio[:1], config=loop.config, loop=loop, seed=1))
    assert len(den.calls) == 8


def test_warm_steps_validated():
    with pytest.raises(ValueError, match=r"warm steps must be in 0\.\.steps \(8\), got 9"):
        SamplerConfig("ddim", 8, warm_steps=9)
