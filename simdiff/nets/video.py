"""A video backbone: a ViT over frame windows with factorised space-time attention and per-frame noise levels.

``VideoUViT(z [B, F, C, H, W], logsnr [B, F]) -> [B, F, C, H, W]``. Each frame is cut into ``p x p`` patches
(one strided convolution, shared over frames); tokens get a fixed 2-D sin-cos position code and a learned embedding
of their frame index. Every block applies, with pre-LayerNorm residuals,

    spatial attention   among the ``N`` patches of one frame        (sequences [B * F, N, D])
    temporal attention  among the ``F`` frames at one patch position (sequences [B * N, F, D])
    MLP                 per token

(the factorised attention of e.g. Ho et al. 2022, "Video diffusion models", and Bertasius et al. 2021,
"TimeSformer"), attention through ``F.scaled_dot_product_attention``. The per-frame log-SNR ``[B, F]`` (what
:meth:`simdiff.processes.RollingDiffusion.net_cond` gives) is embedded per frame (Fourier features + MLP,
:class:`~simdiff.nets.conditioning.LogSNREmbedding`) and added to every token of that frame at the input and before
each block, so frames at different noise levels are told apart. Frames exchange information only in the temporal
attention layers (every other layer acts on one frame at a time). A global log-SNR ``[B]`` or a scalar is used for
every frame. The output projection is zero-initialised. Sizes: ``H`` and ``W`` divisible by ``patch_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conditioning import LogSNREmbedding
from .layers import sincos_2d, zero_init

__all__ = ["VideoUViTConfig", "VideoUViT"]


@dataclass(frozen=True)
class VideoUViTConfig:
    """Width ``dim``, ``depth`` blocks of (spatial attention, temporal attention, MLP), ``heads``, ``patch_size``,
    MLP width ``mlp_ratio * dim``; ``temporal: false`` drops the temporal attention (frames then never interact)."""

    dim: int = 128
    depth: int = 4
    heads: int = 4
    patch_size: int = 4
    mlp_ratio: float = 4.0
    temporal: bool = True

    def __post_init__(self) -> None:
        from simdiff.configuration import ConfigError

        if self.dim < 1 or self.depth < 1 or self.heads < 1 or self.patch_size < 1 or self.mlp_ratio <= 0:
            raise ConfigError(f"video_uvit: dim, depth, heads, patch_size must be >= 1 and mlp_ratio > 0, got {self}")
        if self.dim % self.heads or self.dim % 4:
            raise ConfigError(f"video_uvit: dim {self.dim} must be divisible by heads {self.heads} and by 4")


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = zero_init(nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        """``x [S, L, D]``: attention within each of the ``S`` sequences of length ``L``."""
        s, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(s, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(y.transpose(1, 2).reshape(s, n, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, temporal: bool):
        super().__init__()
        self.spatial = _SelfAttention(dim, heads)
        self.temporal = _SelfAttention(dim, heads) if temporal else None
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), zero_init(nn.Linear(hidden, dim)))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``x [B, F, N, D]``, ``emb [B, F, 1, D]``."""
        b, f, n, d = x.shape
        x = x + emb
        x = self.spatial(x.reshape(b * f, n, d)).view(b, f, n, d)
        if self.temporal is not None:
            x = self.temporal(x.transpose(1, 2).reshape(b * n, f, d)).view(b, n, f, d).transpose(1, 2)
        return x + self.mlp(self.norm(x))


class VideoUViT(nn.Module):
    """The video backbone (module docstring). Data arguments (from ``RollingDiffusion.network_kwargs``):
    ``frames`` per window, ``channels``, ``size`` (int or ``(H, W)``), ``num_classes`` (a label embedding added to
    every token when > 0; row ``num_classes`` is the null label)."""

    def __init__(self, cfg: VideoUViTConfig, *, frames: int, channels: int, size: int | tuple[int, int],
                 num_classes: int = 0):
        super().__init__()
        from simdiff.configuration import ConfigError

        h, w = (size, size) if isinstance(size, int) else tuple(size)
        p = cfg.patch_size
        if h % p or w % p:
            raise ConfigError(f"video_uvit: frame size {h}x{w} must be divisible by patch_size {p}")
        self.cfg, self.frames, self.channels, self.size = cfg, frames, channels, (h, w)
        self.num_classes = num_classes
        self.grid = (h // p, w // p)
        self.patch = nn.Conv2d(channels, cfg.dim, p, stride=p)
        self.register_buffer("pos", sincos_2d(*self.grid, cfg.dim), persistent=False)
        self.frame_emb = nn.Parameter(0.02 * torch.randn(frames, cfg.dim))
        self.logsnr_emb = LogSNREmbedding(cfg.dim)
        self.label_emb = nn.Embedding(num_classes + 1, cfg.dim) if num_classes > 0 else None
        hidden = int(cfg.mlp_ratio * cfg.dim)
        self.blocks = nn.ModuleList(_Block(cfg.dim, cfg.heads, hidden, cfg.temporal) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = zero_init(nn.Linear(cfg.dim, p * p * channels))

    @property
    def image_shape(self) -> tuple[int, ...]:
        return (self.frames, self.channels, *self.size)

    def forward(self, z: Tensor, logsnr: Tensor, labels: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, extra_emb: Tensor | None = None) -> Tensor:
        if z.dim() != 5 or tuple(z.shape[1:]) != self.image_shape:
            raise ValueError(f"video_uvit: z must be [B, {', '.join(map(str, self.image_shape))}], got "
                             f"{tuple(z.shape)}")
        if context is not None:
            raise ValueError("video_uvit takes no context tokens")
        b, f, c, h, w = z.shape
        lam = torch.as_tensor(logsnr, device=z.device, dtype=torch.float32)
        lam = lam.reshape(-1, 1).expand(b, f) if lam.dim() <= 1 else lam
        if lam.shape != (b, f):
            raise ValueError(f"video_uvit: logsnr must be [B, F] = [{b}, {f}], [B] or a scalar, got "
                             f"{tuple(lam.shape)}")
        emb = self.logsnr_emb(lam.reshape(-1)).view(b, f, 1, -1)
        if extra_emb is not None:
            emb = emb + extra_emb.view(b, 1, 1, -1)
        if self.label_emb is not None and labels is not None:
            emb = emb + self.label_emb(labels).view(b, 1, 1, -1)
        x = self.patch(z.reshape(b * f, c, h, w))  # [B F, D, h', w']
        gh, gw = self.grid
        x = x.flatten(2).transpose(1, 2).reshape(b, f, gh * gw, -1)
        x = x + self.pos.to(x.dtype) + self.frame_emb.view(1, f, 1, -1)
        for block in self.blocks:
            x = block(x, emb)
        x = self.head(self.norm(x))  # [B, F, N, p p C]
        p = self.cfg.patch_size
        x = x.view(b, f, gh, gw, p, p, c).permute(0, 1, 6, 2, 4, 3, 5)
        return x.reshape(b, f, c, h, w)
