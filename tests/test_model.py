"""The UNet: official state_dict layouts, config inference, attention layout, time embedding."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from dheads.engine.config import CREMA, LRW, SMALL
from dheads.engine.model import ConfigInferenceError, DiffusedHeadsUNet, infer_config
from dheads.engine.model.blocks import AttentionBlock, timestep_embedding


def _official(shared_reference, name: str) -> dict[str, torch.Tensor]:
    layout = json.loads((shared_reference / f"official_unet_state_dict_{name}.json").read_text())
    # Small random values: enough to check strict loading; meta would skip the real copy.
    return {k: torch.empty(shape).normal_(0, 0.01) for k, (shape, _dtype) in layout.items()}


@pytest.mark.parametrize("name,cfg", [("crema", CREMA), ("lrw", LRW)])
def test_official_layout_loads_strictly(shared_reference, name, cfg):
    sd = _official(shared_reference, name)
    with torch.device("meta"):
        net = DiffusedHeadsUNet(cfg)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    result = net.load_state_dict(sd, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert net.input_blocks[0][0].weight.shape[1] == (12 if name == "crema" else 8)
    assert torch.equal(net.out[2].weight, sd["out.2.weight"])


@pytest.mark.parametrize("name,cfg", [("crema", CREMA), ("lrw", LRW)])
def test_infer_config_from_official_layout(shared_reference, name, cfg):
    assert infer_config(_official(shared_reference, name)) == cfg


def test_infer_config_small():
    sd = DiffusedHeadsUNet(SMALL).state_dict()
    assert infer_config(sd, image_size=SMALL.image_size) == SMALL
    gray = dataclasses.replace(SMALL, grayscale_motion=True)
    assert infer_config(DiffusedHeadsUNet(gray).state_dict(), image_size=32) == gray


def test_infer_config_rejects_other_networks():
    with pytest.raises(ConfigInferenceError, match="missing key 'input_blocks.0.0.weight'"):
        infer_config({"fc.weight": torch.zeros(2, 2)})
    sd = DiffusedHeadsUNet(SMALL).state_dict()
    del sd["middle_block.1.qkv.weight"]
    with pytest.raises(ConfigInferenceError, match="no UNet configuration reproduces"):
        infer_config(sd)


def test_crema_parameter_count():
    with torch.device("meta"):
        net = DiffusedHeadsUNet(CREMA)
    assert sum(p.numel() for p in net.parameters()) == 215_748_614  # 215.7 M, OFFICIAL_FACTS.md


def test_time_embedding_uses_divisor_512():
    t = torch.tensor([0.0, 10.0, 999.0])
    emb = timestep_embedding(t, 256, 512)
    assert emb.shape == (3, 256)
    j = 5
    f = math.exp(-math.log(1e4) * j / 512)
    assert emb[2, j].item() == pytest.approx(math.cos(999 * f), abs=1e-4)
    assert emb[2, 128 + j].item() == pytest.approx(math.sin(999 * f), abs=1e-4)
    assert torch.equal(emb[0, :128], torch.ones(128))


def _legacy_attention(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The authors' QKVAttentionLegacy, written out with einsum, as the reference."""
    b, c, h, w = x.shape
    xs = x.reshape(b, c, -1)
    qkv = block.qkv(block.norm(xs))
    heads = block.num_heads
    ch = c // heads
    q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).float().softmax(dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
    return (xs + block.proj_out(a)).reshape(b, c, h, w)


def test_attention_matches_legacy_qkv_layout():
    torch.manual_seed(0)
    block = AttentionBlock(128, 64)
    for p in block.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(2, 128, 8, 8)
    ref = _legacy_attention(block, x)
    got = block(x)
    # fp32, different summation order only: far under 1e-5 relative.
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_forward_shapes_and_motion_layouts():
    torch.manual_seed(0)
    net = DiffusedHeadsUNet(SMALL).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.02)
    x = torch.randn(2, 3, 32, 32)
    motion = torch.randn(2, 2, 3, 32, 32)
    audio = torch.randn(2, 5, 32)
    t = torch.tensor([3, 999])
    with torch.no_grad():
        a = net(x, t, x, motion_frames=motion, audio_emb=audio)
        b = net(x, t, x, motion_frames=motion.reshape(2, 6, 32, 32), audio_emb=audio)
        c = net(x, t, x, motion_frames=motion.flip(1), audio_emb=audio)
    assert a.shape == (2, 6, 32, 32)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)  # motion frame order matters (oldest first)
