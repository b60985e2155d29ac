"""Recover a ModelConfig from a state_dict alone (tensor shapes and which keys exist).

What the weights cannot tell is taken from the released model: 64 channels per attention head,
an audio window of 2 frames each side, the time-embedding divisor 512, dropout 0.1 (training only),
and 32 GroupNorm groups. ``image_size`` is not in the weights (the net is convolutional); pass it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..config import ModelConfig

_BLOCK = re.compile(r"^input_blocks\.(\d+)\.")


class ConfigInferenceError(ValueError):
    """The state_dict is not a Diffused Heads UNet of any configuration we can build."""


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ConfigInferenceError(f"missing key {key!r}: not a Diffused Heads UNet state_dict")
    return tuple(sd[key].shape)


def _motion(in_ch: int) -> tuple[int, bool]:
    """Motion frames and grayscale flag from the first conv's input channels (3 + motion + 3)."""
    m = in_ch - 6
    if m <= 0:
        raise ConfigInferenceError(f"first conv has {in_ch} input channels; expected 6 + motion channels")
    return (m // 3, False) if m % 3 == 0 else (m, True)


def _candidates(sd: Mapping[str, torch.Tensor], mc: int, n_in: int):
    """Yield (num_res_blocks, channel_mult, attention_levels) consistent with the input blocks."""
    for r in range(1, n_in):
        levels, rem = divmod(n_in, r + 1)
        if rem or levels < 1:
            continue
        mult, attn = [], []
        for level in range(levels):
            first = 1 + level * (r + 1)
            out_ch = _shape(sd, f"input_blocks.{first}.0.in_layers.2.weight")[0]
            if out_ch % mc:
                break
            mult.append(out_ch // mc)
            if f"input_blocks.{first}.1.qkv.weight" in sd:
                attn.append(level)
        else:
            yield r, tuple(mult), tuple(attn)


def infer_config(sd: Mapping[str, torch.Tensor], image_size: int = 128, **overrides) -> ModelConfig:
    """Return the ModelConfig whose UNet has exactly ``sd``'s keys and shapes."""
    from .unet import DiffusedHeadsUNet  # local import: unet imports config only

    mc, in_ch = _shape(sd, "input_blocks.0.0.weight")[:2]
    motion_frames, gray = _motion(in_ch)
    audio_in = _shape(sd, "audio_embed.0.weight")[1]
    out_ch = _shape(sd, "out.2.weight")[0]
    n_in = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK.match(k)))
    want = {k: tuple(v.shape) for k, v in sd.items()}
    base = dict(image_size=image_size, model_channels=mc, motion_frames=motion_frames, grayscale_motion=gray,
                audio_dim=audio_in // 5, learn_sigma=out_ch == 6)
    base.update(overrides)
    for r, mult, attn in _candidates(sd, mc, n_in):
        cfg = ModelConfig(**{**base, "num_res_blocks": r, "channel_mult": mult, "attention_levels": attn})
        try:
            with torch.device("meta"):
                got = {k: tuple(v.shape) for k, v in DiffusedHeadsUNet(cfg).state_dict().items()}
        except ValueError:  # e.g. attention channels not divisible into 64-channel heads
            continue
        if got == want:
            return cfg
    raise ConfigInferenceError(
        f"no UNet configuration reproduces this state_dict's {len(sd)} tensors "
        f"(model_channels={mc}, {n_in} input blocks)"
    )
