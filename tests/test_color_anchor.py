"""The identity colour anchor (``model.color_anchor = "identity"``): each frame's predicted x0 has the
identity frame's per-channel mean at every timestep, the rest of the output is the network's, and the
option survives checkpoints and ONNX export.

Tolerances: the anchor is exact algebra in float32; 1e-3 (levels of 255: 0.13) on the x0 mean leaves room
for float32 rounding amplified by sqrt(1/abar) (about 160 at t = 990) and fails any wrong sign or table.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dheads.engine.backends.base import BatchProfile, example_inputs
from dheads.engine.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from dheads.engine.config import SMALL, DiffusionConfig
from dheads.engine.model import DiffusedHeadsUNet
from dheads.engine.model.unet import random_unet
from dheads.engine.schedule import schedule_for
from dheads.training.diffusion import make_tables
from dheads.training.health import measure

ANCHORED = dataclasses.replace(SMALL, color_anchor="identity")
DIFFUSION = DiffusionConfig()


@pytest.fixture(scope="module")
def nets() -> tuple[DiffusedHeadsUNet, DiffusedHeadsUNet]:
    """The same random weights without and with the anchor."""
    plain = random_unet(SMALL, seed=3)
    anchored = DiffusedHeadsUNet(ANCHORED, DIFFUSION).eval()
    missing = anchored.load_state_dict(plain.state_dict(), strict=False)
    assert missing.unexpected_keys == [] and sorted(missing.missing_keys) == [
        "color_anchor.sqrt_abar", "color_anchor.sqrt_one_minus_abar"]
    return plain, anchored


def _inputs(t: int, batch: int = 2) -> dict[str, torch.Tensor]:
    x = example_inputs(SMALL, batch=batch, generator=torch.Generator().manual_seed(t))
    x["timesteps"] = torch.full((batch,), float(t))
    return x


@pytest.mark.parametrize("t", [0, 10, 250, 500, 900, 990])
def test_predicted_x0_has_the_identity_mean(nets, t):
    _, anchored = nets
    x = _inputs(t)
    with torch.no_grad():
        eps = anchored(*x.values())[:, :3].double()
    s = schedule_for(DIFFUSION)
    x0 = s.sqrt_recip_alphas_cumprod[t] * x["x_t"].double() - s.sqrt_recipm1_alphas_cumprod[t] * eps
    want = x["identity"].double().mean(dim=(2, 3))
    assert torch.allclose(x0.mean(dim=(2, 3)), want, atol=1e-3), (x0.mean(dim=(2, 3)) - want).abs().max()


def test_detail_and_variance_stay_the_networks(nets):
    plain, anchored = nets
    x = _inputs(400, batch=3)
    with torch.no_grad():
        a, b = plain(*x.values()), anchored(*x.values())
    assert torch.equal(a[:, 3:], b[:, 3:])
    zero_mean = lambda e: e - e.mean(dim=(2, 3), keepdim=True)  # noqa: E731
    assert torch.allclose(zero_mean(a[:, :3]), zero_mean(b[:, :3]), atol=1e-6)
    assert (a[:, :3].mean(dim=(2, 3)) - b[:, :3].mean(dim=(2, 3))).abs().max() > 1e-3  # the DC did change


def test_health_check_sees_the_anchor_follow_the_noise_dc(nets):
    """A random network is mean-blind (slope ~0); with the anchor its eps-DC is the true one at t = 999."""
    plain, anchored = nets
    g = torch.Generator().manual_seed(0)
    n, size = 16, SMALL.image_size
    identity = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    batch = {"x0": (identity + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(-1, 1), "identity": identity,
             "motion": identity.repeat(1, 2, 1, 1), "audio": torch.randn(n, SMALL.audio_frames, SMALL.audio_dim, generator=g)}
    tables = make_tables(schedule_for(DIFFUSION), torch.device("cpu"))
    assert measure(anchored, batch, tables, timesteps=(999,)).dc_slope["999"] == pytest.approx(1.0, abs=0.01)
    assert abs(measure(plain, batch, tables, timesteps=(999,)).dc_slope["999"]) < 0.2


def test_checkpoint_round_trip_keeps_the_anchor(nets, tmp_path):
    _, anchored = nets
    path = save_checkpoint(tmp_path / "a.pt", Checkpoint(model=ANCHORED, state_dict=anchored.state_dict(),
                                                         diffusion=DIFFUSION))
    loaded = load_checkpoint(path)
    assert loaded.model.color_anchor == "identity"
    x = _inputs(700)
    with torch.no_grad():
        assert torch.equal(loaded.build()(*x.values()), anchored(*x.values()))


def test_onnx_export_carries_the_anchor(nets, tmp_path):
    pytest.importorskip("onnx")
    from dheads.export.to_onnx import export_unet_onnx
    from dheads.export.verify import verify_onnx

    _, anchored = nets
    path = export_unet_onnx(anchored, tmp_path / "unet.onnx", profile=BatchProfile(1, 2, 2))
    report = verify_onnx(path, anchored, BatchProfile(1, 2, 2), seed=0)
    assert report.passed, report


def test_unknown_anchor_and_missing_schedule_are_refused():
    with pytest.raises(ValueError, match=r"^model.color_anchor = 'mean'; choose one of none, identity$"):
        DiffusedHeadsUNet(dataclasses.replace(SMALL, color_anchor="mean"))
    with pytest.raises(ValueError, match="needs its DiffusionConfig"):
        DiffusedHeadsUNet(ANCHORED)


def test_anchor_table_is_the_training_schedule(nets):
    _, anchored = nets
    abar = schedule_for(DIFFUSION).alphas_cumprod
    np.testing.assert_allclose(anchored.color_anchor.sqrt_abar.double().numpy(), np.sqrt(abar), rtol=1e-6)


def test_dh_train_anchor_adds_the_anchor_to_a_trained_checkpoint(nets, tmp_path):
    """The same weights with the anchor: outputs equal the anchored net's; a second anchor and writing
    over the input are refused in one line (exit 2)."""
    from typer.testing import CliRunner

    from dheads.training.cli import app

    plain, anchored = nets
    src = save_checkpoint(tmp_path / "plain.pt", Checkpoint(model=SMALL, state_dict=plain.state_dict(),
                                                            ema_state_dict=plain.state_dict(), diffusion=DIFFUSION))
    runner = CliRunner()
    r = runner.invoke(app, ["anchor", str(src), "-o", str(tmp_path / "anchored.pt")], prog_name="dh-train")
    assert r.exit_code == 0, r.output
    got = load_checkpoint(tmp_path / "anchored.pt")
    assert got.model == ANCHORED and got.meta["color_anchor_added"] == "identity (no retraining)"
    x = _inputs(300)
    with torch.no_grad():
        assert torch.equal(got.build()(*x.values()), anchored(*x.values()))
    r = runner.invoke(app, ["anchor", str(tmp_path / "anchored.pt"), "-o", str(tmp_path / "twice.pt")])
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        "dh-train: error: the model already has color_anchor = 'identity'"]
    r = runner.invoke(app, ["anchor", str(src), "-o", str(src)])
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        f"dh-train: error: output {src} is the input checkpoint; choose another path"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anchored.pt", "plain.pt"]
