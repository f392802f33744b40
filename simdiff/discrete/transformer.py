"""A transformer over token sequences: bidirectional (the masked-diffusion denoiser) or causal (the autoregressive
baseline of the same size).

Input ids are ``0..vocab_size`` (one extra id: the mask token for the bidirectional model, the start-of-sequence
token for the causal one); the output is logits over the ``vocab_size`` data tokens at every position. The
network takes no time input: the optimal masked-diffusion denoiser does not depend on ``t`` given ``x_t`` (MDLM,
Sahoo et al. 2024; Zheng et al. 2024; the exact denoiser of :mod:`simdiff.discrete.toy` is one), which is what
makes the first-hitting sampler exact for it.
Pre-LayerNorm blocks, learned positional embeddings, GELU MLP, no weight tying.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TokenTransformerConfig", "TokenTransformer"]


@dataclass(frozen=True)
class TokenTransformerConfig:
    """``dim`` width, ``depth`` blocks, ``num_heads`` heads, MLP width ``mlp_ratio * dim``; ``causal`` masks
    attention to earlier positions (the autoregressive baseline)."""

    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    causal: bool = False


class _Block(nn.Module):
    def __init__(self, cfg: TokenTransformerConfig):
        super().__init__()
        self.heads, self.causal, self.p = cfg.num_heads, cfg.causal, cfg.dropout
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.qkv, self.proj = nn.Linear(cfg.dim, 3 * cfg.dim), nn.Linear(cfg.dim, cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim))

    def forward(self, h: Tensor) -> Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=self.p if self.training else 0.0)
        h = h + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return h + F.dropout(self.mlp(self.norm2(h)), self.p, self.training)


class TokenTransformer(nn.Module):
    """``model(x [B, *shape] long, t=None, labels=None) -> logits [B, *shape, vocab_size]`` (``t`` is accepted and
    ignored).

    Args:
        cfg: :class:`TokenTransformerConfig`.
        vocab_size: data tokens; input ids go up to ``vocab_size`` inclusive (mask / start token).
        length: tokens per example (``prod(shape)``).
        num_classes: class labels ``0..C-1`` added as a learned embedding at every position (0: unconditional);
            the extra row ``C`` is the null label, used when ``labels`` is not given.
    """

    def __init__(self, cfg: TokenTransformerConfig, *, vocab_size: int, length: int, num_classes: int = 0):
        super().__init__()
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"token transformer: dim {cfg.dim} is not divisible by num_heads {cfg.num_heads}")
        self.cfg, self.vocab_size, self.length = cfg, vocab_size, length
        self.embed = nn.Embedding(vocab_size + 1, cfg.dim)
        self.pos = nn.Parameter(torch.randn(1, length, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, vocab_size)
        self.num_classes = num_classes
        self.label_embed = nn.Embedding(num_classes + 1, cfg.dim) if num_classes > 0 else None
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, t: Tensor | None = None, labels: Tensor | None = None, **cond: Any) -> Tensor:
        b = x.shape[0]
        ids = x.reshape(b, -1)
        if ids.shape[1] != self.length:
            raise ValueError(f"token transformer built for {self.length} tokens, got {ids.shape[1]}")
        h = self.embed(ids) + self.pos
        if self.label_embed is not None:
            if labels is None:
                labels = torch.full((b,), self.num_classes, dtype=torch.long, device=x.device)
            h = h + self.label_embed(labels.long())[:, None]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)).reshape(*x.shape, self.vocab_size)
