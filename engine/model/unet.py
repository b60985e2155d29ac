"""The Diffused Heads UNet (Stypułkowski et al., WACV 2024), state_dict-compatible with the release."""

from __future__ import annotations

import torch
from torch import nn

from ..config import DiffusionConfig, ModelConfig
from .anchor import anchor_for
from .blocks import AttentionBlock, CondSequential, GroupNorm32, ResBlock, TimeEmbed
from .motion_mask import apply_mask, mask_box, soft_keep


class DiffusedHeadsUNet(nn.Module):
    """Predicts ``[eps | v]`` for x_t given the identity frame, motion frames and an audio window.

    Called like the authors' TorchScript: ``net(x, timesteps, x_cond, motion_frames=, audio_emb=)``.
    """

    def __init__(self, config: ModelConfig, diffusion: DiffusionConfig | None = None):
        """``diffusion``: the schedule the model is trained and sampled with; needed (and recorded as
        ``self.diffusion``) only by a ``color_anchor`` model, whose output depends on it."""
        super().__init__()
        self.config, self.diffusion = config, diffusion
        mc, emb_dim = config.model_channels, 4 * config.model_channels
        self.time_embed = TimeEmbed(mc, emb_dim, config.time_embed_divisor)
        self.audio_embed = nn.Sequential(
            nn.Linear(config.audio_frames * config.audio_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.input_blocks, skip_channels, ch = self._build_input(config, emb_dim)
        self.middle_block = CondSequential([
            self._res(ch, emb_dim, ch),
            AttentionBlock(ch, config.num_head_channels, config.groups),
            self._res(ch, emb_dim, ch),
        ])
        self.output_blocks, ch = self._build_output(config, emb_dim, skip_channels, ch)
        self.out = nn.Sequential(
            GroupNorm32(config.groups, ch), nn.SiLU(), nn.Conv2d(ch, config.out_channels, 3, padding=1)
        )
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)
        self.color_anchor = anchor_for(config, diffusion)
        self.motion_mask_px = mask_box(config.motion_mask, config.image_size)
        soft = self.motion_mask_px is not None and config.motion_mask_feather > 0
        # the soft mask's weights [1, 1, H, W], if any: a non-persistent buffer (no state_dict entry)
        self.register_buffer("motion_keep", soft_keep(config.motion_mask, config.image_size,
                                                      config.motion_mask_feather) if soft else None, persistent=False)

    def rebuild_constants(self) -> None:
        """Recompute the non-persistent buffers (the soft mask) a meta-device build left unmaterialised:
        ``load_state_dict(assign=True)`` fills only what the state_dict holds."""
        if self.motion_keep is not None and self.motion_keep.is_meta:
            cfg = self.config
            self.motion_keep = soft_keep(cfg.motion_mask, cfg.image_size, cfg.motion_mask_feather)

    def _res(self, ch: int, emb_dim: int, out: int, **kw) -> ResBlock:
        return ResBlock(ch, emb_dim, out, dropout=self.config.dropout, groups=self.config.groups, **kw)

    def _build_input(self, cfg: ModelConfig, emb_dim: int) -> tuple[nn.ModuleList, list[int], int]:
        ch = cfg.model_channels
        blocks = nn.ModuleList([CondSequential([nn.Conv2d(cfg.in_channels, ch, 3, padding=1)])])
        skips = [ch]
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [self._res(ch, emb_dim, mult * cfg.model_channels)]
                ch = mult * cfg.model_channels
                if level in cfg.attention_levels:
                    layers.append(AttentionBlock(ch, cfg.num_head_channels, cfg.groups))
                blocks.append(CondSequential(layers))
                skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                blocks.append(CondSequential([self._res(ch, emb_dim, ch, down=True)]))
                skips.append(ch)
        return blocks, skips, ch

    def _build_output(self, cfg: ModelConfig, emb_dim: int, skips: list[int], ch: int
                      ) -> tuple[nn.ModuleList, int]:
        skips = list(skips)
        blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [self._res(ch + skips.pop(), emb_dim, mult * cfg.model_channels)]
                ch = mult * cfg.model_channels
                if level in cfg.attention_levels:
                    layers.append(AttentionBlock(ch, cfg.num_head_channels, cfg.groups))
                if level and i == cfg.num_res_blocks:
                    layers.append(self._res(ch, emb_dim, ch, up=True))
                blocks.append(CondSequential(layers))
        return blocks, ch

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, x_cond: torch.Tensor,
                motion_frames: torch.Tensor, audio_emb: torch.Tensor) -> torch.Tensor:
        """x: [B,3,H,W] x_t; timesteps: [B] original t; x_cond: [B,3,H,W] identity;
        motion_frames: [B, M*c, H, W] or [B, M, c, H, W], oldest first; audio_emb: [B, 2w+1, D].
        Returns [B, 6, H, W] (eps, then the variance interpolation v) or [B, 3, H, W]."""
        b = x.shape[0]
        motion = motion_frames.reshape(b, -1, *x.shape[2:])
        if self.motion_keep is not None:
            motion = motion * self.motion_keep.to(motion.dtype)
        elif self.motion_mask_px is not None:
            motion = apply_mask(motion, self.motion_mask_px)
        h = torch.cat([x, motion, x_cond], dim=1)
        t_emb = self.time_embed(timesteps)
        a_emb = self.audio_embed(audio_emb.reshape(b, -1).to(t_emb.dtype))
        hs = []
        for block in self.input_blocks:
            h = block(h, t_emb, a_emb)
            hs.append(h)
        h = self.middle_block(h, t_emb, a_emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), t_emb, a_emb)
        out = self.out(h)
        return out if self.color_anchor is None else self.color_anchor(out, x, x_cond, timesteps)


def random_unet(config: ModelConfig, *, seed: int = 0, std: float = 0.02,
                diffusion: DiffusionConfig | None = None) -> DiffusedHeadsUNet:
    """A UNet in eval mode with every parameter drawn from N(0, std), for benchmarks and parity checks.

    A freshly initialised model would not do: its zero-initialised output convs make every output 0.
    """
    g = torch.Generator().manual_seed(seed)
    net = DiffusedHeadsUNet(config, diffusion).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, std, generator=g)
    return net
