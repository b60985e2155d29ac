"""The motion-frame mouth mask (engine/model/motion_mask.py): the masked box of every motion frame has no
effect on the output, the rest does; the numbers are checked; export and a checkpoint round-trip keep it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dheads.engine.backends.base import BatchProfile, example_inputs
from dheads.engine.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from dheads.engine.config import SMALL, ModelConfig
from dheads.engine.model import DiffusedHeadsUNet
from dheads.engine.model.motion_mask import mask_box
from dheads.engine.model.unet import random_unet

BOX = (0.25, 0.5, 0.75, 0.875)  # at 32 px: x 8..24, y 16..28
MASKED = dataclasses.replace(SMALL, motion_mask=BOX)


@pytest.fixture(scope="module")
def net() -> DiffusedHeadsUNet:
    return random_unet(MASKED, seed=5)


def _inputs(seed: int) -> dict[str, torch.Tensor]:
    x = example_inputs(SMALL, batch=2, generator=torch.Generator().manual_seed(seed))
    x["timesteps"] = torch.full((2,), 300.0)
    return x


def _with_motion(x: dict[str, torch.Tensor], change) -> dict[str, torch.Tensor]:
    m = x["motion_frames"].clone().view(2, SMALL.motion_frames, 3, 32, 32)
    change(m)
    return {**x, "motion_frames": m.view_as(x["motion_frames"])}


def test_pixel_box():
    assert mask_box(BOX, 32) == (8, 16, 24, 28) and mask_box((), 32) is None
    assert mask_box((0.34, 0.58, 0.66, 0.92), 64) == (22, 37, 42, 59)


@torch.no_grad()
def test_the_masked_box_of_the_motion_frames_has_no_effect(net):
    x = _inputs(1)
    ref = net(*x.values())
    inside = _with_motion(x, lambda m: m[..., 16:28, 8:24].normal_(generator=torch.Generator().manual_seed(2)))
    assert torch.equal(net(*inside.values()), ref)
    outside = _with_motion(x, lambda m: m[..., 0:16, :].normal_(generator=torch.Generator().manual_seed(2)))
    assert (net(*outside.values()) - ref).abs().max() > 1e-3
    # the same weights without the mask do see the box
    plain = DiffusedHeadsUNet(SMALL).eval()
    plain.load_state_dict(net.state_dict(), strict=True)  # no parameter or buffer of its own
    assert (plain(*inside.values()) - plain(*x.values())).abs().max() > 1e-3


@pytest.mark.parametrize("box, why", [
    ((0.5, 0.5, 0.4, 0.9), "0 <= x0 < x1 <= 1"),
    ((0.1, 0.2, 0.3), "0 <= x0 < x1 <= 1"),
    ((0.1, 0.2, 0.3, 1.5), "0 <= x0 < x1 <= 1"),
    ((0.50, 0.50, 0.51, 0.51), "covers no pixel at 32 px"),
])
def test_malformed_boxes_are_refused(box, why):
    with pytest.raises(ValueError, match=r"^model.motion_mask = .*" + why.replace("(", r"\(")):
        DiffusedHeadsUNet(dataclasses.replace(SMALL, motion_mask=box))


def test_checkpoint_round_trip_keeps_the_mask(net, tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", Checkpoint(model=MASKED, state_dict=net.state_dict()))
    got = load_checkpoint(path)
    assert got.model == MASKED and got.model.motion_mask == BOX
    assert ModelConfig.from_dict(MASKED.to_dict()) == MASKED
    x = _inputs(3)
    with torch.no_grad():
        assert torch.equal(got.build()(*x.values()), net(*x.values()))


def test_onnx_export_carries_the_mask(net, tmp_path):
    pytest.importorskip("onnx")
    from dheads.export.to_onnx import export_unet_onnx
    from dheads.export.verify import verify_onnx

    path = export_unet_onnx(net, tmp_path / "unet.onnx", profile=BatchProfile(1, 2, 2))
    report = verify_onnx(path, net, BatchProfile(1, 2, 2), seed=0)
    assert report.passed, report


# ----------------------------------------------------------------------------- the soft edge

SOFT = dataclasses.replace(MASKED, motion_mask_feather=0.125)  # 4 px at 32 px, centred on the box's edges


def test_soft_mask_weights_fade_over_the_feather():
    from dheads.engine.model.motion_mask import soft_keep

    keep = soft_keep(BOX, 32, 0.125)[0, 0]  # box x 8..24, y 16..28; ramps from 2 px outside to 2 px inside
    assert keep.shape == (32, 32) and keep.min() == 0.0 and keep.max() == 1.0
    assert keep[22, 16] == 0.0 and keep[0, 0] == 1.0  # deep inside, far outside
    row = keep[22, 4:13].tolist()  # across the left edge at x = 8: pixel centres 4.5 .. 12.5
    assert row == pytest.approx([1.0, 1.0, 0.875, 0.625, 0.375, 0.125, 0.0, 0.0, 0.0])
    assert all(a >= b for a, b in zip(row, row[1:]))  # monotone: no step to learn
    with pytest.raises(ValueError, match="must be > 0"):
        soft_keep(BOX, 32, 0.0)


@torch.no_grad()
def test_soft_mask_is_a_non_persistent_buffer_and_exports():
    net = random_unet(SOFT, seed=5)
    assert "motion_keep" not in net.state_dict()  # same state_dict as the hard-mask model: weights carry over
    assert set(net.state_dict()) == set(random_unet(MASKED, seed=5).state_dict())
    x = _inputs(1)
    ref = net(*x.values())
    deep = _with_motion(x, lambda m: m[..., 20:25, 12:20].normal_(generator=torch.Generator().manual_seed(2)))
    assert torch.equal(net(*deep.values()), ref)  # weight 0 deep inside the box
    rim = _with_motion(x, lambda m: m[..., 16:17, 8:24].normal_(generator=torch.Generator().manual_seed(2)))
    assert (net(*rim.values()) - ref).abs().max() > 1e-4  # the rim is half seen, unlike with the hard box
    hard = random_unet(MASKED, seed=5)
    assert torch.equal(hard(*rim.values()), hard(*x.values()))


def test_soft_mask_onnx_export(tmp_path):
    pytest.importorskip("onnx")
    from dheads.export.to_onnx import export_unet_onnx
    from dheads.export.verify import verify_onnx

    net = random_unet(SOFT, seed=5)
    path = export_unet_onnx(net, tmp_path / "unet.onnx", profile=BatchProfile(1, 2, 2))
    assert verify_onnx(path, net, BatchProfile(1, 2, 2), seed=0).passed


def test_soft_mask_survives_a_checkpoint_round_trip(tmp_path):
    net = random_unet(SOFT, seed=5)
    got = load_checkpoint(save_checkpoint(tmp_path / "s.pt", Checkpoint(model=SOFT, state_dict=net.state_dict())))
    assert got.model.motion_mask_feather == 0.125
    x = _inputs(3)
    with torch.no_grad():
        assert torch.equal(got.build()(*x.values()), net(*x.values()))
