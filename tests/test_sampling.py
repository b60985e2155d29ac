"""DDPM and DDIM steps against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from dheads.engine.sampling import ddim_step, ddpm_step, make_tables
from dheads.engine.schedule import cosine_schedule, respace


@pytest.fixture(scope="module")
def sched():
    return respace(cosine_schedule(), 100)


def _hand_ddpm(s, k, xt, eps, v, z):
    abar, abar_prev, beta = s.alphas_cumprod[k], s.alphas_cumprod_prev[k], s.betas[k]
    x0 = max(-1.0, min(1.0, math.sqrt(1 / abar) * xt - math.sqrt(1 / abar - 1) * eps))
    mean = beta * math.sqrt(abar_prev) / (1 - abar) * x0 + (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar) * xt
    tilde = s.posterior_variance
    log_tilde = math.log(tilde[1] if k == 0 else tilde[k])
    nu = (v + 1) / 2
    logvar = nu * math.log(beta) + (1 - nu) * log_tilde
    return mean + math.exp(logvar / 2) * z if k > 0 else mean


@pytest.mark.parametrize("k", [99, 50, 6, 1, 0])
def test_ddpm_step_matches_hand_computation(sched, k):
    tables = make_tables(sched, dtype=torch.float64)
    xt = torch.tensor([[[[0.3]], [[-0.7]], [[1.4]]]], dtype=torch.float64)
    eps = torch.tensor([[[[0.1]], [[-1.2]], [[0.5]]]], dtype=torch.float64)
    v = torch.tensor([[[[0.2]], [[-0.9]], [[1.3]]]], dtype=torch.float64)  # nu outside [0,1] is not clamped
    z = torch.tensor([[[[0.5]], [[-0.25]], [[2.0]]]], dtype=torch.float64)
    out = ddpm_step(xt, torch.cat([eps, v], dim=1), tables, k, z)
    for c in range(3):
        want = _hand_ddpm(sched, k, xt[0, c].item(), eps[0, c].item(), v[0, c].item(), z[0, c].item())
        assert out[0, c].item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_ddpm_last_step_returns_clamped_x0(sched):
    tables = make_tables(sched)
    xt = torch.randn(1, 3, 4, 4) * 3
    out = torch.randn(1, 6, 4, 4)
    x = ddpm_step(xt, out, tables, 0, torch.randn(1, 3, 4, 4))
    x0 = (tables.sqrt_recip_abar[0] * xt - tables.sqrt_recipm1_abar[0] * out[:, :3]).clamp(-1, 1)
    torch.testing.assert_close(x, x0, rtol=1e-6, atol=1e-6)


def test_ddim_eta0_is_deterministic_and_matches_formula(sched):
    tables = make_tables(sched, dtype=torch.float64, eta=0.0)
    k = 40
    xt = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    eps = torch.randn(1, 3, 2, 2, dtype=torch.float64) * 0.1
    out = torch.cat([eps, torch.zeros_like(eps)], dim=1)
    a = ddim_step(xt, out, tables, k, torch.randn_like(xt))
    b = ddim_step(xt, out, tables, k, torch.randn_like(xt))
    assert torch.equal(a, b)
    abar, abar_prev = sched.alphas_cumprod[k], sched.alphas_cumprod_prev[k]
    x0 = (xt / math.sqrt(abar) - math.sqrt(1 / abar - 1) * eps).clamp(-1, 1)
    e = (xt / math.sqrt(abar) - x0) / math.sqrt(1 / abar - 1)
    torch.testing.assert_close(a, math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * e, rtol=1e-10, atol=1e-12)


def test_ddim_eta1_sigma_is_ddpm_posterior_std(sched):
    tables = make_tables(sched, dtype=torch.float64, eta=1.0)
    k = 30
    assert tables.ddim_sigma[k].item() ** 2 == pytest.approx(sched.posterior_variance[k], rel=1e-10)
