"""load_checkpoint: our format, the authors' TorchScript and Lightning files, and clear errors."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from dheads.engine.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_from_model,
    load_checkpoint,
    save_checkpoint,
)
from dheads.engine.config import SMALL, AudioConfig, DiffusionConfig
from dheads.engine.model import random_unet


@pytest.fixture(scope="module")
def net():
    return random_unet(SMALL)


def _inputs(batch=1):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    return dict(x=x, timesteps=torch.tensor([500] * batch), x_cond=x.flip(-1),
                motion_frames=torch.randn(batch, 6, 32, 32, generator=g), audio_emb=torch.randn(batch, 5, 32, generator=g))


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_own_format_round_trip(tmp_path, net):
    ema = {k: v + 1 for k, v in net.state_dict().items()}
    ckpt = dataclasses.replace(
        checkpoint_from_model(net, AudioConfig(encoder="whisper", dim=32, options={"model": "tiny.en"})),
        ema_state_dict=ema, diffusion=DiffusionConfig(sampling_steps=50), meta={"step": 7},
    )
    path = save_checkpoint(tmp_path / "sub" / "model.pt", ckpt, extra={"optimizer": {"lr": 1e-4}})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left
    got = load_checkpoint(path)
    assert got.source == "dheads"
    assert got.model == SMALL and got.audio == ckpt.audio and got.diffusion == ckpt.diffusion
    assert got.meta == {"step": 7}
    assert _same_weights(got.state_dict, ckpt.state_dict)
    assert _same_weights(got.weights(ema=True), ema)
    built = got.build(ema=False)
    with torch.no_grad():
        assert torch.equal(built(**_inputs()), net(**_inputs()))


def test_torchscript_unet_loads_through_torchscript_path(tmp_path, net):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(net, example_kwarg_inputs=_inputs())
    path = tmp_path / "crema_script.pt"
    scripted.save(str(path))
    got = load_checkpoint(path)
    assert got.source == "torchscript"
    # image_size is not in the weights; TorchScript files are the released 128x128 model.
    assert got.model == dataclasses.replace(SMALL, image_size=128)
    assert got.audio == AudioConfig(encoder="sda", dim=32)
    assert _same_weights(got.state_dict, net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(got.build()(**_inputs()), scripted(**_inputs()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prefix", ["unet.", "diffusion.nn_backbone."])
def test_lightning_checkpoint(tmp_path, net, prefix):
    sd = {f"{prefix}{k}": v for k, v in net.state_dict().items()}
    if prefix == "unet.":  # the authors' files hold every tensor twice
        sd.update({f"diffusion.nn_backbone.{k}": v for k, v in net.state_dict().items()})
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "global_step": 100, "state_dict": sd}, path)
    got = load_checkpoint(path)
    assert got.source == "lightning"
    assert got.model == dataclasses.replace(SMALL, image_size=128)
    assert _same_weights(got.state_dict, net.state_dict())


def test_bare_state_dict(tmp_path, net):
    path = tmp_path / "weights.pt"
    torch.save(net.state_dict(), path)
    assert load_checkpoint(path).source == "state_dict"


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such file$"):
        load_checkpoint(tmp_path / "nope.pt")


def test_corrupt_file(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"junk\.pt: cannot be read as a PyTorch checkpoint") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_unknown_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match=r"other\.pt: not a Diffused Heads checkpoint; expected a dheads"):
        load_checkpoint(path)


def test_torchscript_of_another_network(tmp_path):
    path = tmp_path / "audio_encoder.pt"
    torch.jit.script(torch.nn.Linear(3, 4)).save(str(path))
    with pytest.raises(CheckpointError, match=r"audio_encoder\.pt: torchscript holds no Diffused Heads UNet"):
        load_checkpoint(path)


def test_newer_version_refused(tmp_path, net):
    path = save_checkpoint(tmp_path / "m.pt", checkpoint_from_model(net))
    obj = torch.load(path, weights_only=True)
    obj["version"] = 99
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="version 99 is newer"):
        load_checkpoint(path)


def test_checkpoint_is_frozen(net):
    ckpt = checkpoint_from_model(net)
    assert isinstance(ckpt, Checkpoint)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ckpt.source = "x"
