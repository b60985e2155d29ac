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
