"""The reference frame loop: frame count, range, determinism, caller-provided noise."""

from __future__ import annotations

import pytest
import torch

from dheads.engine.config import SMALL, SamplerConfig
from dheads.engine.model import random_unet
from dheads.engine.reference import generate_reference


@pytest.fixture(scope="module")
def model():
    return random_unet(SMALL, std=0.03)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.randn(5, 32, generator=g)


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_reference_loop_frames_in_range_and_deterministic(model, inputs, name):
    ident, audio = inputs
    cfg = SamplerConfig(name=name, steps=8)
    a = generate_reference(model, ident, audio, sampler=cfg, seed=3)
    b = generate_reference(model, ident, audio, sampler=cfg, seed=3)
    c = generate_reference(model, ident, audio, sampler=cfg, seed=4)
    assert a.shape == (5, 3, 32, 32)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_reference_loop_accepts_caller_noise(model, inputs):
    ident, audio = inputs
    cfg = SamplerConfig(steps=6)
    noise = torch.randn(5, 7, 1, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    a = generate_reference(model, ident, audio, sampler=cfg, noise=noise)
    b = generate_reference(model, ident, audio, sampler=cfg, noise=noise.clone())
    assert torch.equal(a, b)
    noise2 = noise.clone()
    noise2[3] += 0.5  # frame 3's noise only: frames 0-2 unchanged, frame 3 differs
    c = generate_reference(model, ident, audio, sampler=cfg, noise=noise2)
    assert torch.equal(a[:3], c[:3])
    assert not torch.equal(a[3], c[3])


def test_reference_loop_uses_motion_frames(model, inputs):
    """Frame 0 sees only the identity as motion; changing frame 0's noise changes frame 1."""
    ident, audio = inputs
    cfg = SamplerConfig(steps=4)
    noise = torch.randn(3, 5, 1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    a = generate_reference(model, ident, audio[:3], sampler=cfg, noise=noise)
    noise2 = noise.clone()
    noise2[0] *= -1
    b = generate_reference(model, ident, audio[:3], sampler=cfg, noise=noise2)
    assert not torch.equal(a[1], b[1])  # frame 1's inputs differ only through the motion ring
