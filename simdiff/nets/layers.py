"""Building blocks shared by the simdiff backbones (U-Net, U-ViT, residual U-ViT).

Everything is batched tensor code; attention goes through ``F.scaled_dot_product_attention`` (fused kernels on
GPU, exact softmax(QK^T / sqrt(d)) V on CPU). Shapes: images ``[B, C, H, W]``, tokens ``[B, N, C]``, conditioning
vector ``emb`` ``[B, E]`` (already passed through SiLU by the backbone, so each block only applies a Linear).

References: Ho et al. 2020 / Dhariwal & Nichol 2021 (ResBlock with scale-shift norm); Peebles & Xie 2023 (adaLN-Zero);
Dehghani et al. 2023 "Scaling ViTs to 22B" (QK-normalisation, parallel attention+MLP block, fused input projection).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "QK_NORMS",
    "zero_init",
    "num_groups",
    "HeadNorm",
    "make_qk_norm",
    "attend",
    "additive_mask",
    "Attention",
    "MLP",
    "TransformerBlock",
    "ResBlock",
    "SpatialAttention",
    "sincos_2d",
]

QK_NORMS = ("none", "layer", "rms")


def zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (residual-branch outputs / final projections start at 0)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def num_groups(channels: int, max_groups: int = 32) -> int:
    """GroupNorm group count: the largest divisor of ``channels`` that is <= ``max_groups``."""
    return math.gcd(channels, max_groups)


class HeadNorm(nn.Module):
    """LayerNorm ("layer") or RMSNorm ("rms") over the head dimension with a learned gain.

    The gain is cast to the input's dtype so bf16 activations under autocast keep the fused kernel.
    """

    def __init__(self, kind: str, dim: int, eps: float = 1e-6):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype)
        if self.kind == "rms":
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        return F.layer_norm(x, (x.shape[-1],), w, None, self.eps)


def make_qk_norm(kind: str, head_dim: int) -> nn.Module:
    """Per-head normalisation of queries/keys (ViT-22B QK-norm): "none", "layer" (LayerNorm) or "rms" (RMSNorm)."""
    if kind == "none":
        return nn.Identity()
    if kind in ("layer", "rms"):
        return HeadNorm(kind, head_dim)
    raise ValueError(f"unknown qk_norm {kind!r}; valid: {', '.join(QK_NORMS)}")


def attend(
    q: Tensor, k: Tensor, v: Tensor, *, num_heads: int, q_norm: nn.Module, k_norm: nn.Module, mask: Tensor | None
) -> Tensor:
    """Multi-head attention ``softmax(Q K^T / sqrt(d)) V`` via SDPA.

    Args:
        q: ``[B, N, C]``; k, v: ``[B, L, C]``; ``C`` divisible by ``num_heads``.
        mask: optional ``[B, 1, 1, L]``, broadcast over heads and queries: bool (True = attend) or an additive
            float mask (0 = attend, -inf = not). A bool mask is turned into the additive form (:func:`additive_mask`)
            in the query dtype, which SDPA's memory-efficient CUDA kernel takes; with no mask (no padding) SDPA can
            also use the flash kernel. Every query must be able to attend to at least one key.
    Returns:
        ``[B, N, C]``.
    """
    b, n, c = q.shape
    d = c // num_heads
    q = q_norm(q.view(b, n, num_heads, d).transpose(1, 2))
    k = k_norm(k.view(b, k.shape[1], num_heads, d).transpose(1, 2))
    v = v.view(b, v.shape[1], num_heads, d).transpose(1, 2)
    if mask is not None and mask.dtype == torch.bool:
        mask = additive_mask(mask, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, c)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool attention mask (True = attend) -> additive float mask of ``dtype`` (0 where True, -inf where False).

    Softmax with ``-inf`` logits gives those keys weight exactly 0, as the bool mask does."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class Attention(nn.Module):
    """Self-attention (fused qkv projection) or, with ``context_width``, cross-attention to context tokens."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        context_width: int | None = None,
        qk_norm: str = "none",
        zero_out: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.cross = context_width is not None
        if self.cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(context_width, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = make_qk_norm(qk_norm, dim // num_heads)
        self.k_norm = make_qk_norm(qk_norm, dim // num_heads)
        self.proj = nn.Linear(dim, dim)
        if zero_out:
            zero_init(self.proj)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """``x`` ``[B, N, C]``; ``context`` ``[B, L, context_width]`` (cross only); returns ``[B, N, C]``."""
        if self.cross:
            q = self.q(x)
            k, v = self.kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        out = attend(q, k, v, num_heads=self.num_heads, q_norm=self.q_norm, k_norm=self.k_norm, mask=mask)
        return self.proj(out)


class MLP(nn.Module):
    """``Linear -> GELU(tanh) -> Dropout -> Linear``."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, zero_out: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        if zero_out:
            zero_init(self.fc2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x), approximate="tanh")))


class TransformerBlock(nn.Module):
    """Pre-LN transformer block with logsnr/class conditioning and optional cross-attention.

    ``conditioning="adaln"``: LayerNorms without affine, shift/scale/gate from ``emb`` (adaLN-Zero, Peebles & Xie
    2023; gates start at 0 so the block starts as the identity). ``"additive"``: ``x + Linear(emb)`` then a plain
    pre-LN block whose output projections start at 0. ``parallel=True`` is the ViT-22B parallel block
    ``y = x + Attn(LN x) + MLP(LN x)`` with one fused input projection for q, k, v and the MLP.
    Dropout is applied to the MLP hidden layer and to both residual branches.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        emb_dim: int,
        *,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        qk_norm: str = "none",
        parallel: bool = False,
        conditioning: str = "adaln",
        context_width: int | None = None,
    ):
        super().__init__()
        if conditioning not in ("adaln", "additive"):
            raise ValueError(f"unknown conditioning {conditioning!r}; valid: adaln, additive")
        self.dim, self.num_heads, self.parallel = dim, num_heads, parallel
        self.adaln = conditioning == "adaln"
        hidden = int(dim * mlp_ratio)
        self.hidden = hidden
        zero_out = not self.adaln  # with adaLN-Zero the gates are the zero-initialised part
        affine = not self.adaln
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=affine)
        if parallel:
            self.in_proj = nn.Linear(dim, 3 * dim + hidden)
            self.attn_out = nn.Linear(dim, dim)
            self.mlp_out = nn.Linear(hidden, dim)
            self.q_norm = make_qk_norm(qk_norm, dim // num_heads)
            self.k_norm = make_qk_norm(qk_norm, dim // num_heads)
            if dim % num_heads:
                raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
            if zero_out:
                zero_init(self.attn_out)
                zero_init(self.mlp_out)
            n_mod = 4
        else:
            self.attn = Attention(dim, num_heads, qk_norm=qk_norm, zero_out=zero_out)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=affine)
            self.mlp = MLP(dim, hidden, dropout, zero_out=zero_out)
            n_mod = 6
        self.mod = nn.Linear(emb_dim, n_mod * dim if self.adaln else dim)
        if self.adaln:
            zero_init(self.mod)
        self.drop = nn.Dropout(dropout)
        self.cross = None
        if context_width is not None:
            self.cross_norm = nn.LayerNorm(dim)
            self.cross = Attention(dim, num_heads, context_width=context_width, qk_norm=qk_norm, zero_out=True)

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """``x`` ``[B, N, D]``, ``emb`` ``[B, E]``, ``context`` ``[B, L, Cc]``, ``mask`` ``[B, 1, 1, L]``."""
        mod = self.mod(emb)[:, None, :]
        if self.adaln:
            mods = mod.chunk(4 if self.parallel else 6, dim=-1)
        else:
            x = x + mod
        if self.cross is not None and context is not None:
            x = x + self.cross(self.cross_norm(x), context, mask)
        h = self.norm1(x)
        if self.parallel:
            if self.adaln:
                shift, scale, gate_a, gate_m = mods
                h = h * (1 + scale) + shift
            q, k, v, m = self.in_proj(h).split([self.dim, self.dim, self.dim, self.hidden], dim=-1)
            a = self.attn_out(attend(q, k, v, num_heads=self.num_heads, q_norm=self.q_norm, k_norm=self.k_norm,
                                     mask=None))
            m = self.mlp_out(self.drop(F.gelu(m, approximate="tanh")))
            if self.adaln:
                a, m = gate_a * a, gate_m * m
            return x + self.drop(a) + self.drop(m)
        if self.adaln:
            shift1, scale1, gate1, shift2, scale2, gate2 = mods
            a = gate1 * self.attn(h * (1 + scale1) + shift1)
            x = x + self.drop(a)
            m = gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)
            return x + self.drop(m)
        x = x + self.drop(self.attn(h))
        return x + self.drop(self.mlp(self.norm2(x)))


class ResBlock(nn.Module):
    """Convolutional residual block with scale-shift conditioning (Dhariwal & Nichol 2021, "BigGAN"-style ResBlock).

    ``h = conv1(SiLU(GN x)); h = GN(h) * (1 + scale) + shift; out = skip(x) + conv2(Dropout(SiLU h))``, with
    ``(scale, shift) = Linear(emb)`` and ``conv2`` zero-initialised.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(num_groups(out_ch), out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(self.drop(F.silu(h)))


class SpatialAttention(nn.Module):
    """Self-attention (and optional cross-attention) over the pixels of a feature map, residual, for U-Nets."""

    def __init__(self, ch: int, num_heads: int, *, qk_norm: str = "none", context_width: int | None = None):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups(ch), ch)
        self.attn = Attention(ch, num_heads, qk_norm=qk_norm, zero_out=True)
        self.cross = None
        if context_width is not None:
            self.cross_norm = nn.LayerNorm(ch)
            self.cross = Attention(ch, num_heads, context_width=context_width, qk_norm=qk_norm, zero_out=True)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(self.norm(x).flatten(2).transpose(1, 2))
        if self.cross is not None and context is not None:
            t = t + self.cross(self.cross_norm(t), context, mask)
        return t.transpose(1, 2).reshape(b, c, h, w)


def sincos_2d(h: int, w: int, dim: int, *, device=None, dtype=torch.float32) -> Tensor:
    """Fixed 2-D sine-cosine position embedding ``[h * w, dim]`` (MAE/ViT style; half the channels per axis)."""
    if dim % 4:
        raise ValueError(f"sincos position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float64), torch.arange(w, device=device, dtype=torch.float64),
        indexing="ij",
    )
    ay = ys.reshape(-1, 1) * omega
    ax = xs.reshape(-1, 1) * omega
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1).to(dtype)
