"""Building blocks of the Diffused Heads UNet, parameter-for-parameter as in the released checkpoint.

Module and attribute names (``in_layers``, ``t_emb_layers``, ``audio_emb_layers``, ``out_layers``,
``skip_connection``, ``norm``, ``qkv``, ``proj_out``) are the state_dict names of the authors' model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (fp16 overflows in the variance)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, divisor: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f) | sin(t f)]`` with ``f = exp(-ln(max_period) * arange(dim/2) / divisor)``.

    ``t``: [B] original timesteps (0..999). Returns [B, dim] float32. The released model uses
    ``divisor = 512`` with ``dim = 256`` (not the usual ``dim / 2``).
    """
    half = dim // 2
    idx = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * idx / divisor)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbed(nn.Module):
    """``time_embed.fc``: Linear(C, 4C), SiLU, Linear(4C, 4C) on the sinusoidal embedding."""

    def __init__(self, channels: int, emb_dim: int, divisor: int):
        super().__init__()
        self.channels = channels
        self.divisor = divisor
        self.fc = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.channels, self.divisor)
        return self.fc(emb.to(self.fc[0].weight.dtype))


class ResBlock(nn.Module):
    """Residual block conditioned twice ("double_pre_gn", paper Eq. 17).

    ``h = conv(silu(GN(x)))``; ``h = GN2(h) * (1 + s_t) + b_t``; ``h = h * (1 + s_a) + b_a``;
    ``h = conv(dropout(silu(h)))``; returns ``skip(x) + h``. With ``up``/``down`` the hidden and skip
    paths are resampled (nearest x2 / 2x2 average) after the first GN+SiLU, before the first conv.
    """

    def __init__(self, channels: int, emb_dim: int, out_channels: int | None = None, *, dropout: float = 0.0,
                 groups: int = 32, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.up, self.down = up, down
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.t_emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.audio_emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, a_emb: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W]; t_emb, a_emb: [B, E]. Returns [B, C_out, H', W']."""
        h = self.in_layers[1](self.in_layers[0](x))
        h = self.in_layers[2](self._resample(h))
        x = self._resample(x)
        s_t, b_t = self.t_emb_layers(t_emb).to(h.dtype)[..., None, None].chunk(2, dim=1)
        s_a, b_a = self.audio_emb_layers(a_emb).to(h.dtype)[..., None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + s_t) + b_t
        h = h * (1 + s_a) + b_a
        h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over spatial positions with the legacy QKV layout.

    ``qkv`` is one 1x1 Conv1d to 3C; per head the channels are ``[q | k | v]`` (reshape to
    [B*heads, 3*d, T]). Scaling q and k by d**-1/4 each equals scaling q.k by d**-1/2, which is what
    ``scaled_dot_product_attention`` does; its kernels accumulate the softmax in fp32.
    """

    def __init__(self, channels: int, head_channels: int, groups: int = 32):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"attention channels {channels} not divisible by head channels {head_channels}")
        self.num_heads = channels // head_channels
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        b, c, hh, ww = x.shape
        x = x.reshape(b, c, hh * ww)
        qkv = self.qkv(self.norm(x))  # [B, 3C, T]
        d = c // self.num_heads
        q, k, v = qkv.reshape(b * self.num_heads, 3 * d, hh * ww).transpose(1, 2).split(d, dim=2)
        a = F.scaled_dot_product_attention(q, k, v)  # [B*heads, T, d]
        a = a.transpose(1, 2).reshape(b, c, hh * ww)
        return (x + self.proj_out(a)).reshape(b, c, hh, ww)


class CondSequential(nn.ModuleList):
    """A block of the UNet: res blocks take the embeddings, attention blocks and convs do not."""

    def forward(self, h: torch.Tensor, t_emb: torch.Tensor, a_emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            h = layer(h, t_emb, a_emb) if isinstance(layer, ResBlock) else layer(h)
        return h
