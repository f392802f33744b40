"""A DDPM/ADM-style U-Net backbone (Ho et al. 2020; Dhariwal & Nichol 2021) conditioned on log-SNR.

Layout: ``conv_in`` -> per level ``num_res_blocks`` ResBlocks (+ self-attention on the levels listed in
``attention_levels``), strided-conv downsampling between levels -> middle ResBlock/attention/ResBlock -> mirrored
up path with ``num_res_blocks + 1`` ResBlocks per level fed by concatenated skips, nearest-neighbour upsampling
+ conv -> GroupNorm, SiLU, zero-initialised ``conv_out``. Scale-shift conditioning from
``SiLU(emb(logsnr) + emb(label))``; cross-attention to context tokens inside the attention blocks when
``context_dim > 0``.

Sizes that are not divisible by ``2^(levels-1)`` (e.g. 28 with 4 levels) are zero-padded at the bottom/right to the
next multiple and the output is cropped back, so any size works; 28 with 3 levels (28 -> 14 -> 7) needs no padding.
The backbone never sees the parameterisation: it maps ``(z, logsnr)`` to a tensor shaped like ``z``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conditioning import BackboneInputs, ConditionEmbedding, ContextEncoder
from .layers import QK_NORMS, ResBlock, SpatialAttention, num_groups, zero_init

__all__ = ["UNetConfig", "UNet"]


@dataclass(frozen=True)
class UNetConfig:
    """U-Net hyper-parameters (defaults: a small MNIST-sized model, levels 28 -> 14 -> 7).

    Attributes:
        channels: width per resolution level (one level per entry; a 2x downsample between levels).
        num_res_blocks: ResBlocks per level on the way down (``+1`` on the way up).
        attention_levels: level indices (0 = full resolution) that get self-attention blocks.
        num_heads: attention heads (must divide the width of every attention level).
        dropout: dropout inside every ResBlock.
        emb_dim: conditioning width; ``None`` -> ``4 * channels[0]``.
        context_dim: width of cross-attention context tokens; 0 disables cross-attention.
        qk_norm: "none", "layer" or "rms" normalisation of queries and keys.
        mid_attention: self-attention in the middle block.
    """

    channels: tuple[int, ...] = (32, 64, 128)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (2,)
    num_heads: int = 4
    dropout: float = 0.0
    emb_dim: int | None = None
    context_dim: int = 0
    qk_norm: Literal["none", "layer", "rms"] = "none"
    mid_attention: bool = True

    def __post_init__(self):
        if not self.channels:
            raise ValueError("UNetConfig.channels must name at least one level")
        bad = [lv for lv in self.attention_levels if not 0 <= lv < len(self.channels)]
        if bad:
            raise ValueError(f"UNetConfig.attention_levels {bad} out of range for {len(self.channels)} levels")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"unknown qk_norm {self.qk_norm!r}; valid: {', '.join(QK_NORMS)}")


class _Down(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Up(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(BackboneInputs):
    """``UNet(cfg, image_channels=, image_size=, num_classes=)``;
    ``forward(z, logsnr, labels, context, context_mask, extra_emb)``."""

    def __init__(self, cfg: UNetConfig, *, image_channels: int, image_size: int | tuple[int, int], num_classes: int):
        super().__init__()
        self.cfg = cfg
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_shape = (image_channels, *size)
        self.num_classes = num_classes
        ch = cfg.channels
        emb_dim = cfg.emb_dim or 4 * ch[0]
        self.cond = ConditionEmbedding(emb_dim, num_classes)
        ctx_w = ch[-1] if cfg.context_dim > 0 else None
        self.context = ContextEncoder(cfg.context_dim, ctx_w) if ctx_w else None
        self.multiple = 2 ** (len(ch) - 1)

        def attn(c: int) -> SpatialAttention:
            return SpatialAttention(c, cfg.num_heads, qk_norm=cfg.qk_norm, context_width=ctx_w)

        self.conv_in = nn.Conv2d(image_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        skip_ch = [ch[0]]
        cur = ch[0]
        for lv, c in enumerate(ch):
            for _ in range(cfg.num_res_blocks):
                blocks = nn.ModuleList([ResBlock(cur, c, emb_dim, cfg.dropout)])
                if lv in cfg.attention_levels:
                    blocks.append(attn(c))
                self.down.append(blocks)
                cur = c
                skip_ch.append(c)
            if lv < len(ch) - 1:
                self.down.append(nn.ModuleList([_Down(cur)]))
                skip_ch.append(cur)
        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, cfg.dropout)])
        if cfg.mid_attention:
            self.mid.append(attn(cur))
        self.mid.append(ResBlock(cur, cur, emb_dim, cfg.dropout))
        self.up = nn.ModuleList()
        for lv in reversed(range(len(ch))):
            c = ch[lv]
            for _ in range(cfg.num_res_blocks + 1):
                blocks = nn.ModuleList([ResBlock(cur + skip_ch.pop(), c, emb_dim, cfg.dropout)])
                if lv in cfg.attention_levels:
                    blocks.append(attn(c))
                self.up.append(blocks)
                cur = c
            if lv > 0:
                self.up.append(nn.ModuleList([_Up(cur)]))
        self.norm_out = nn.GroupNorm(num_groups(cur), cur)
        self.conv_out = zero_init(nn.Conv2d(cur, image_channels, 3, padding=1))

    def _run_blocks(self, blocks: nn.ModuleList, h: Tensor, emb: Tensor, ctx, mask) -> Tensor:
        for blk in blocks:
            if isinstance(blk, ResBlock):
                h = blk(h, emb)
            elif isinstance(blk, SpatialAttention):
                h = blk(h, ctx, mask)
            else:
                h = blk(h)
        return h

    def forward(
        self,
        z: Tensor,
        logsnr: Tensor,
        labels: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        extra_emb: Tensor | None = None,
    ) -> Tensor:
        """``z`` ``[B, C, H, W]``, ``logsnr`` ``[B]`` (or scalar) -> prediction ``[B, C, H, W]``.

        ``extra_emb`` ``[B, emb_dim]``: an optional embedding added to the log-SNR embedding (guided students).
        """
        x, emb, ctx, mask = self.prepare(z, logsnr, labels, context, context_mask, extra_emb)
        h = self.conv_in(x)
        skips = [h]
        for blocks in self.down:
            h = self._run_blocks(blocks, h, emb, ctx, mask)
            skips.append(h)
        h = self._run_blocks(self.mid, h, emb, ctx, mask)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run_blocks(blocks, h, emb, ctx, mask)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return self.crop(out, z)
