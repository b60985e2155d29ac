"""One loader for every checkpoint a user may hold, and our own atomic checkpoint format.

Recognised: our ``dheads`` checkpoint (config + weights + EMA + diffusion + audio settings + version),
the authors' released TorchScript UNet (``crema_script.pt``), the authors' Lightning training
checkpoints (tensors under ``unet.*`` / ``diffusion.nn_backbone.*``), a bare UNet state_dict, and a
``dh-export`` bundle (a folder with ``manifest.json``: its ONNX weights, read back and checked against
ONNX Runtime), so a shipped bundle such as the embedded demo can be fine-tuned or distilled.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write
from .config import AudioConfig, DiffusionConfig, ModelConfig
from .model import ConfigInferenceError, DiffusedHeadsUNet, infer_config
from .model.anchor import anchor_for

log = logging.getLogger(__name__)

FORMAT = "dheads-checkpoint"
VERSION = 1
_EXPECTED = ("expected a dheads checkpoint, the authors' TorchScript UNet (crema_script.pt), "
             "a Lightning checkpoint with unet.* tensors, a UNet state_dict or a dh-export bundle folder")
_LIGHTNING_PREFIXES = ("unet.", "diffusion.nn_backbone.")


class CheckpointError(ValueError):
    """A file that is missing, unreadable, or not a Diffused Heads checkpoint (one-line message)."""


@dataclass(frozen=True)
class Checkpoint:
    """What any checkpoint loads into: enough to rebuild the UNet and drive it correctly."""

    model: ModelConfig
    state_dict: dict[str, torch.Tensor]
    audio: AudioConfig = AudioConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    ema_state_dict: dict[str, torch.Tensor] | None = None
    source: str = "dheads"  # dheads | torchscript | lightning | state_dict
    meta: dict[str, Any] = field(default_factory=dict)

    def weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        """The EMA weights when present and asked for (what one samples with), else the raw ones."""
        return self.ema_state_dict if ema and self.ema_state_dict is not None else self.state_dict

    def build(self, *, ema: bool = True, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> DiffusedHeadsUNet:
        """The UNet with these weights loaded strictly, in eval mode."""
        with torch.device("meta"):
            net = DiffusedHeadsUNet(self.model, self.diffusion)
        net.load_state_dict(self.weights(ema), strict=True, assign=True)
        net.rebuild_constants()
        return net.to(device=device, dtype=dtype).eval()


def with_color_anchor(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` with the identity colour anchor (``engine/model/anchor.py``) added: the same weights, each
    frame's mean colour now the identity's. Parameter-free, so a trained model needs no retraining; the
    anchor's schedule table is added to both state_dicts. ValueError if ``ckpt`` has an anchor already."""
    if ckpt.model.color_anchor != "none":
        raise ValueError(f"the model already has color_anchor = {ckpt.model.color_anchor!r}")
    model = dataclasses.replace(ckpt.model, color_anchor="identity")
    table = {f"color_anchor.{k}": v for k, v in anchor_for(model, ckpt.diffusion).state_dict().items()}
    ema = None if ckpt.ema_state_dict is None else {**ckpt.ema_state_dict, **table}
    meta = {**ckpt.meta, "color_anchor_added": "identity (no retraining)"}
    return dataclasses.replace(ckpt, model=model, state_dict={**ckpt.state_dict, **table}, ema_state_dict=ema,
                               meta=meta)


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``ckpt`` (plus e.g. optimizer state in ``extra``) atomically: temp file, fsync, rename."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": ckpt.model.to_dict(),
        "audio_config": ckpt.audio.to_dict(),
        "diffusion_config": ckpt.diffusion.to_dict(),
        "state_dict": ckpt.state_dict,
        "ema_state_dict": ckpt.ema_state_dict,
        "meta": dict(ckpt.meta),
        "extra": dict(extra or {}),
    }
    with atomic_write(path) as f:
        torch.save(payload, f)
    return path


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n or n.endswith("constants.pkl") for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def _load_torchscript(path: Path) -> Checkpoint:
    try:
        sd = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except Exception as e:  # noqa: BLE001 - any failure is "unreadable" to the user
        raise CheckpointError(f"{path}: TorchScript archive cannot be loaded ({_first_line(e)})") from None
    return _from_state_dict(path, sd, "torchscript")


def _from_state_dict(path: Path, sd: Mapping[str, Any], source: str, **kw) -> Checkpoint:
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    try:
        cfg = infer_config(tensors)
    except ConfigInferenceError as e:
        raise CheckpointError(f"{path}: {source} holds no Diffused Heads UNet ({e})") from None
    if kw.get("audio") is None:
        kw["audio"] = AudioConfig(encoder="sda", dim=cfg.audio_dim)
    return Checkpoint(model=cfg, state_dict=tensors, source=source, **kw)


def _lightning_unet(sd: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    for prefix in _LIGHTNING_PREFIXES:
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if sub:
            return sub
    return None


def _from_dheads(path: Path, obj: Mapping[str, Any]) -> Checkpoint:
    if obj.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: dheads checkpoint version {obj['version']} is newer than this "
                              f"package understands ({VERSION}); upgrade diffused-heads")
    missing = [k for k in ("model_config", "state_dict", "audio_config", "diffusion_config") if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: dheads checkpoint is missing {', '.join(missing)} (damaged or edited); "
                              "save it again with save_checkpoint")
    try:
        return Checkpoint(
            model=ModelConfig.from_dict(obj["model_config"]),
            state_dict=obj["state_dict"],
            audio=AudioConfig.from_dict(obj["audio_config"]),
            diffusion=DiffusionConfig.from_dict(obj["diffusion_config"]),
            ema_state_dict=obj.get("ema_state_dict"),
            source="dheads",
            meta=dict(obj.get("meta") or {}),
        )
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: dheads checkpoint has a malformed config ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Recognise and load any supported checkpoint; raise CheckpointError with one clear line."""
    path = Path(path)
    if path.is_dir():
        from .bundle_weights import checkpoint_from_bundle  # onnx is imported only for bundles

        return checkpoint_from_bundle(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if _is_torchscript(path):
        return _load_torchscript(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({_first_line(e)}); "
                              f"{_EXPECTED}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}; {_EXPECTED}")
    if obj.get("format") == FORMAT:
        return _from_dheads(path, obj)
    if isinstance(obj.get("state_dict"), Mapping):
        unet = _lightning_unet(obj["state_dict"])
        if unet is not None:
            return _from_state_dict(path, unet, "lightning")
    if "input_blocks.0.0.weight" in obj:
        return _from_state_dict(path, obj, "state_dict")
    raise CheckpointError(f"{path}: not a Diffused Heads checkpoint; {_EXPECTED}")


def checkpoint_from_model(model: DiffusedHeadsUNet, audio: AudioConfig | None = None, **kw) -> Checkpoint:
    """Wrap a live UNet (e.g. freshly initialised or trained) as a Checkpoint value."""
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    audio = audio or AudioConfig(encoder="sda", dim=model.config.audio_dim)
    return Checkpoint(model=model.config, state_dict=sd, audio=audio, **kw)


def replace(ckpt: Checkpoint, **changes) -> Checkpoint:
    return dataclasses.replace(ckpt, **changes)
