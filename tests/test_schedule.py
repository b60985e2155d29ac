"""The cosine schedule and respacing against golden values and the defining formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dheads.engine.schedule import cosine_schedule, respace, respaced_timesteps


def test_cosine_betas_golden():
    s = cosine_schedule()
    assert len(s) == 1000
    # Golden values (float64, formula of OFFICIAL_FACTS.md).
    assert s.betas[0] == pytest.approx(4.128422484e-05, rel=1e-9)
    assert s.betas[1] == pytest.approx(4.614175270e-05, rel=1e-9)
    assert s.betas[998] == pytest.approx(0.74999939, rel=1e-7)
    assert s.betas[999] == 0.999  # clipped
    assert s.alphas_cumprod[-1] == pytest.approx(2.4287669e-09, rel=1e-6)


def test_cosine_betas_match_definition():
    s = cosine_schedule()

    def abar(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    for i in (0, 17, 500, 998):
        assert s.betas[i] == pytest.approx(min(1 - abar((i + 1) / 1000) / abar(i / 1000), 0.999), rel=1e-12)


def test_respaced_timesteps_100():
    ts = respaced_timesteps(1000, 100)
    assert len(ts) == 100
    assert ts[:8] == [0, 10, 20, 30, 40, 50, 61, 71]
    assert ts[-3:] == [979, 989, 999]
    assert ts == [round(k * 999 / 99) for k in range(100)]


def test_respace_betas_recomputed_from_abar():
    base = cosine_schedule()
    r = respace(base, 100)
    abar = base.alphas_cumprod
    assert r.timesteps.tolist() == respaced_timesteps(1000, 100)
    assert r.betas[0] == pytest.approx(1 - abar[0], rel=1e-12)
    assert r.betas[6] == pytest.approx(1 - abar[61] / abar[50], rel=1e-12)
    np.testing.assert_allclose(r.alphas_cumprod, abar[r.timesteps], rtol=1e-10)
    # beta_tilde clipped: element 0 replaced by element 1
    assert r.posterior_log_variance_clipped[0] == r.posterior_log_variance_clipped[1]


def test_schedule_is_immutable():
    s = cosine_schedule()
    with pytest.raises(ValueError):
        s.betas[0] = 0.5
    r = respace(s, 10)
    assert len(s) == 1000 and len(r) == 10


def test_respace_rejects_bad_steps():
    with pytest.raises(ValueError, match="^steps must be at least 1, got 0$"):
        respaced_timesteps(1000, 0)
