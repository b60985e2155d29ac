"""The model-health check (can the UNet see colour?) and the GroupNorm rule that keeps our models from
being mean-blind."""

from __future__ import annotations

import pytest
import torch

from dheads.engine.config import CREMA, LRW, ModelConfig, default_groups, norm_groups_problem
from dheads.engine.model import DiffusedHeadsUNet
from dheads.training.config import TrainingConfig, load_config
from dheads.training.diffusion import extract, make_tables, schedule_for
from dheads.engine.config import DiffusionConfig
from dheads.training.health import HealthLimits, color_error, dc_slope, measure

TABLES = make_tables(schedule_for(DiffusionConfig()), dtype=torch.float32)


def _batch(n: int = 24, size: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(n, 3, size, size, generator=g) * 1.6 - 0.8
    # the identity carries the target itself, so an oracle can read x0 from it
    return {"x0": x0, "identity": x0.clone(), "motion": x0.repeat(1, 2, 1, 1), "audio": torch.zeros(n, 5, 4)}


def _oracle(x_t, t, identity, motion_frames=None, audio_emb=None):
    """The exact eps: x_t and the true x0 (passed as the identity) determine it."""
    ti = t.long()
    a = extract(TABLES.sqrt_alphas_cumprod, ti, 4)
    s = extract(TABLES.sqrt_one_minus_alphas_cumprod, ti, 4)
    return (x_t - a * identity) / s


def _mean_blind(x_t, t, identity, motion_frames=None, audio_emb=None):
    """The exact eps with each channel's spatial mean removed: what a one-channel-per-group UNet can do."""
    eps = _oracle(x_t, t, identity)
    return eps - eps.mean(dim=(2, 3), keepdim=True)


def test_an_exact_denoiser_is_healthy():
    r = measure(_oracle, _batch(), TABLES)
    assert set(r.dc_slope) == {"999", "900", "500"}
    for t in r.dc_slope:
        assert r.dc_slope[t] == pytest.approx(1.0, abs=1e-3)
        assert r.x0_color_error[t] < 0.05  # levels of 255: only float32 rounding
    assert r.passed and r.failures == []


def test_a_mean_blind_denoiser_fails_loudly():
    r = measure(_mean_blind, _batch(), TABLES)
    for t in r.dc_slope:
        assert abs(r.dc_slope[t]) < 1e-6
    # at t = 999 the missing DC (std 1/16 per channel here) is multiplied by sqrt(1/abar - 1) ~ 2e4
    assert r.x0_color_error["999"] > 50
    assert not r.passed
    assert any(f in ("dc_slope at t=900 is 0.000 (< 0.5)", "dc_slope at t=900 is -0.000 (< 0.5)")
               for f in r.failures), r.failures
    assert any(f.startswith("x0 colour error at t=900 is") for f in r.failures), r.failures
    assert not any(f.startswith("x0 colour error at t=999") for f in r.failures)  # reported, not judged


def test_x0_colour_at_t999_is_reported_not_judged():
    """The clamp decides x0's mean at t = 999 for any eps model (an anchored one scores ~20 levels there)."""
    from dheads.training.health import HealthReport

    slopes = {"999": 1.0, "900": 1.0, "500": 0.98}
    ok = HealthReport(slopes, {"999": 20.7, "900": 2.0, "500": 0.3}, 48, HealthLimits())
    assert ok.passed and ok.to_dict()["x0_color_error"]["999"] == 20.7
    bad = HealthReport(slopes, {"999": 1.0, "900": 12.5, "500": 0.3}, 48, HealthLimits())
    assert bad.failures == ["x0 colour error at t=900 is 12.5 levels (> 12.0)"]


def test_measure_is_seeded():
    b = _batch()
    noisy = lambda *a, **k: _oracle(*a, **k) + 0.01 * torch.randn(a[0].shape)  # noqa: E731
    torch.manual_seed(0)
    r1 = measure(noisy, b, TABLES, seed=3)
    torch.manual_seed(0)
    r2 = measure(noisy, b, TABLES, seed=3)
    assert r1.to_dict() == r2.to_dict()


def test_slope_and_colour_error_formulas():
    true = torch.zeros(4, 3, 2, 2)
    true[:, :, 0, 0] = torch.arange(12.0).view(4, 3)
    assert dc_slope(2 * true + 5, true) == pytest.approx(2.0)
    a = torch.zeros(1, 3, 4, 4)
    b = a + torch.tensor([2 / 255, 0.0, -4 / 255]).view(1, 3, 1, 1)
    assert color_error(b, a) == pytest.approx(1.0)  # (1 + 0 + 2) / 3 levels


def test_limits_are_checked_against_nan():
    from dheads.training.health import HealthReport

    r = HealthReport({"999": float("nan")}, {"999": 1.0}, 4, HealthLimits())
    assert not r.passed


def test_groups_rule():
    assert default_groups(256) == 32 and default_groups(32) == 8 and default_groups(64) == 16
    assert default_groups(6) == 1 and default_groups(12) == 3
    assert norm_groups_problem(CREMA) is None and norm_groups_problem(LRW) is None  # released: 8 per group
    msg = norm_groups_problem(ModelConfig(model_channels=32, groups=32))
    assert msg == ("model.groups = 32 with model_channels = 32 gives 1 channel(s) per GroupNorm group, which "
                   "erases each channel's mean (the frame's colour); use model.groups = 8 (at least 4 channels "
                   "per group)")
    assert norm_groups_problem(ModelConfig(model_channels=32, groups=5)) == \
        "model.groups = 5 does not divide model.model_channels = 32"


def test_training_configs_get_safe_groups_and_refuse_mean_blind_ones():
    assert load_config("tiny").model.groups == 8
    assert load_config("crema").model.groups == 32
    with pytest.raises(ValueError, match="1 channel\\(s\\) per GroupNorm group"):
        load_config("tiny", ["model.groups=32"])
    with pytest.raises(ValueError, match="per GroupNorm group"):
        TrainingConfig(model=ModelConfig(model_channels=32, groups=16))


def test_groups_fix_lets_a_real_unet_see_the_mean():
    """Structural: with one channel per group the output barely follows a uniform shift of the input
    (only through the convolutions' zero padding at the border); with 4 per group it does (random weights,
    output head re-initialised so it is not zero; measured 0.0057 vs 0.067)."""
    def shift_response(groups: int) -> float:
        torch.manual_seed(0)
        cfg = ModelConfig(image_size=16, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                          attention_levels=(), num_head_channels=8, audio_dim=4, groups=groups)
        net = DiffusedHeadsUNet(cfg).eval()
        torch.nn.init.normal_(net.out[2].weight, std=0.1)
        x = torch.randn(2, 3, 16, 16)
        args = (torch.tensor([500.0, 500.0]), torch.zeros(2, 3, 16, 16))
        kw = {"motion_frames": torch.zeros(2, 6, 16, 16), "audio_emb": torch.zeros(2, 5, 4)}
        with torch.no_grad():
            d = net(x + 0.5, *args, **kw)[:, :3] - net(x, *args, **kw)[:, :3]
        return float(d.mean(dim=(2, 3)).abs().mean())

    blind, seeing = shift_response(8), shift_response(2)
    assert seeing > 5 * blind, (blind, seeing)
