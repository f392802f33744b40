"""U-ViT (simple diffusion, Hoogeboom et al. 2023) and residual U-ViT (SiD2, Hoogeboom et al. 2024) backbones.

Layout (simple diffusion sec. 3; SiD2 sec. 2.2):

* input transform: none, "patch" (``p x p`` conv with stride ``p``; output by a transposed conv of the same shape)
  or "wavelet" (the invertible 5/3 DWT with space-to-depth, ``levels`` times; output through the inverse DWT);
* thin convolutional stages (``num_res_blocks`` ResBlocks of width ``channels[i]``), each followed by a 2x2
  stride-2 conv "Down" to the next width; the last Down lands on the transformer width ``dim``;
* a stack of ``depth`` transformer blocks on the lowest-resolution token grid (2-D position embedding, adaLN or
  additive conditioning, optional QK-norm / ViT-22B parallel blocks / cross-attention to context tokens);
  dropout is applied only here ("only on low-resolution feature maps", simple diffusion sec. 3.5);
* mirrored up path with 2x2 stride-2 transposed convs "Up".

Skip connections:

* ``residual=False`` (U-ViT): U-Net skips from every down-path ResBlock, concatenated into the up-path ResBlocks.
* ``residual=True`` (SiD2 residual U-ViT, sec. 2.2): no block-wise skips; per level
  ``h_before = blocks(h); h = Down(h_before); h_after = h`` ... ``h = Up(h - h_after) + h_before; h = blocks(h)``,
  so each level is a residual around everything below it and only two activations per level are kept.

Sizes not divisible by the total downsampling factor are zero-padded at the bottom/right and cropped back (28 with
no input transform and two stages: 28 -> 14 -> 7, no padding; 28 with patch 2 and two stages: padded to 32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conditioning import BackboneInputs, ConditionEmbedding, ContextEncoder
from .layers import ResBlock, TransformerBlock, num_groups, sincos_2d, zero_init
from .wavelets import Wavelet53

__all__ = ["UViTConfig", "ResidualUViTConfig", "UViT"]


@dataclass(frozen=True)
class UViTConfig:
    """U-ViT hyper-parameters (defaults: a small MNIST-sized model, 28 -> 14 -> 7x7 tokens, 32 -> 16 -> 8x8).

    Attributes:
        input_transform: "none", "patch" (conv stride ``patch_size``) or "wavelet" (5/3 DWT, ``wavelet_levels``).
        channels: widths of the convolutional stages (may be empty: a plain ViT on the input transform's grid).
        num_res_blocks: ResBlocks per conv stage on each side.
        dim, depth, num_heads, mlp_ratio: the transformer stack at the lowest resolution.
        dropout: dropout in the transformer blocks only.
        qk_norm: "none", "layer" or "rms" on queries and keys (ViT-22B).
        parallel_block: ``y = x + Attn(LN x) + MLP(LN x)`` (ViT-22B) instead of sequential sub-blocks.
        conditioning: "adaln" (adaLN-Zero) or "additive" (``x + Linear(emb)``) in transformer blocks.
        pos_emb: "sincos" (fixed, any grid) or "learned" (fixed grid from ``image_size``).
        emb_dim: conditioning width; ``None`` -> ``dim``.
        context_dim: width of cross-attention context tokens; 0 disables cross-attention.
        residual: SiD2 residual U-ViT skips instead of U-Net skips.
    """

    input_transform: Literal["none", "patch", "wavelet"] = "none"
    patch_size: int = 2
    wavelet_levels: int = 1
    channels: tuple[int, ...] = (32, 64)
    num_res_blocks: int = 2
    dim: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    qk_norm: Literal["none", "layer", "rms"] = "rms"
    parallel_block: bool = False
    conditioning: Literal["adaln", "additive"] = "adaln"
    pos_emb: Literal["sincos", "learned"] = "sincos"
    emb_dim: int | None = None
    context_dim: int = 0
    residual: bool = False

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"UViTConfig.dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.input_transform == "patch" and self.patch_size < 1:
            raise ValueError(f"UViTConfig.patch_size must be >= 1, got {self.patch_size}")
        if self.input_transform == "wavelet" and self.wavelet_levels < 1:
            raise ValueError(f"UViTConfig.wavelet_levels must be >= 1, got {self.wavelet_levels}")


@dataclass(frozen=True)
class ResidualUViTConfig(UViTConfig):
    """:class:`UViTConfig` with ``residual=True`` (SiD2 residual U-ViT) by default."""

    residual: bool = True


class UViT(BackboneInputs):
    """``UViT(cfg, image_channels=, image_size=, num_classes=)``;
    ``forward(z, logsnr, labels, context, context_mask, extra_emb)``."""

    def __init__(self, cfg: UViTConfig, *, image_channels: int, image_size: int | tuple[int, int], num_classes: int):
        super().__init__()
        self.cfg = cfg
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_shape = (image_channels, *size)
        self.num_classes = num_classes
        ch = tuple(cfg.channels)
        emb_dim = cfg.emb_dim or cfg.dim
        self.cond = ConditionEmbedding(emb_dim, num_classes)
        self.context = ContextEncoder(cfg.context_dim, cfg.dim) if cfg.context_dim > 0 else None
        c0 = ch[0] if ch else cfg.dim

        # input / output transforms
        self.wavelet = None
        if cfg.input_transform == "patch":
            in_factor = cfg.patch_size
            self.stem = nn.Conv2d(image_channels, c0, cfg.patch_size, stride=cfg.patch_size)
            head = nn.ConvTranspose2d(c0, image_channels, cfg.patch_size, stride=cfg.patch_size)
        else:
            levels = cfg.wavelet_levels if cfg.input_transform == "wavelet" else 0
            in_factor = 2**levels
            if levels:
                self.wavelet = Wavelet53(levels)
            self.stem = nn.Conv2d(image_channels * 4**levels, c0, 3, padding=1)
            head = nn.Conv2d(c0, image_channels * 4**levels, 3, padding=1)
        self.norm_out = nn.GroupNorm(num_groups(c0), c0)
        self.head = zero_init(head)
        self.multiple = in_factor * 2 ** len(ch)
        self.grid = tuple(-(-s // self.multiple) for s in size)

        # convolutional stages
        widths = (*ch, cfg.dim)
        self.down_blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i, c in enumerate(ch):
            self.down_blocks.append(nn.ModuleList(ResBlock(c, c, emb_dim) for _ in range(cfg.num_res_blocks)))
            self.downs.append(nn.Conv2d(c, widths[i + 1], 2, stride=2))
            self.ups.append(nn.ConvTranspose2d(widths[i + 1], c, 2, stride=2))
            c_in = c if cfg.residual else 2 * c
            self.up_blocks.append(nn.ModuleList(ResBlock(c_in, c, emb_dim) for _ in range(cfg.num_res_blocks)))

        # transformer stack
        n_tok = self.grid[0] * self.grid[1]
        if cfg.pos_emb == "learned":
            self.pos = nn.Parameter(torch.randn(1, n_tok, cfg.dim) * 0.02)
        else:
            self.register_buffer("pos", sincos_2d(*self.grid, cfg.dim)[None], persistent=False)
        ctx_w = cfg.dim if cfg.context_dim > 0 else None
        self.blocks = nn.ModuleList(
            TransformerBlock(
                cfg.dim, cfg.num_heads, emb_dim, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout, qk_norm=cfg.qk_norm,
                parallel=cfg.parallel_block, conditioning=cfg.conditioning, context_width=ctx_w,
            )
            for _ in range(cfg.depth)
        )

    def _pos(self, gh: int, gw: int, like: Tensor) -> Tensor:
        if (gh, gw) == self.grid:
            return self.pos.to(like.dtype)
        if self.cfg.pos_emb == "learned":
            raise ValueError(f"learned position embedding is for a {self.grid} token grid, got {(gh, gw)}; "
                             f"use pos_emb='sincos' for other image sizes")
        return sincos_2d(gh, gw, self.cfg.dim, device=like.device, dtype=like.dtype)[None]

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
        if self.wavelet is not None:
            x = self.wavelet(x)
        h = self.stem(x)

        saved: list[Tensor] = []  # U-ViT: block outputs; residual: (h_before, h_after) per level
        for blocks, down in zip(self.down_blocks, self.downs):
            for blk in blocks:
                h = blk(h, emb)
                if not self.cfg.residual:
                    saved.append(h)
            if self.cfg.residual:
                saved.append(h)
            h = down(h)
            if self.cfg.residual:
                saved.append(h)

        b, c, gh, gw = h.shape
        t = h.flatten(2).transpose(1, 2) + self._pos(gh, gw, h)
        for blk in self.blocks:
            t = blk(t, emb, ctx, mask)
        h = t.transpose(1, 2).reshape(b, c, gh, gw)

        for i in reversed(range(len(self.ups))):
            if self.cfg.residual:
                h_after = saved.pop()
                h = self.ups[i](h - h_after) + saved.pop()
                for blk in self.up_blocks[i]:
                    h = blk(h, emb)
            else:
                h = self.ups[i](h)
                for blk in self.up_blocks[i]:
                    h = blk(torch.cat([h, saved.pop()], dim=1), emb)

        out = self.head(F.silu(self.norm_out(h)))
        if self.wavelet is not None:
            out = self.wavelet.inverse(out)
        return self.crop(out, z)
