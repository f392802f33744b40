"""Conditioning inputs of the backbones: log-SNR, class labels and cross-attention context tokens.

* log-SNR: Fourier features of ``u = clamp(logsnr, -c, c) / c`` (``c = 20`` by default, so ``+-inf`` -- clean data
  or pure noise -- map to the end points), frequencies geometric in ``[1, max_freq]``, then a 2-layer MLP
  (VDM, Kingma et al. 2021, conditions the network on the noise level through such features).
* labels: ``nn.Embedding(num_classes + 1, E)``; the last row (index ``num_classes``) is the null / unconditional
  class used by classifier-free guidance (Ho & Salimans 2022). ``labels=None`` means "null" for the whole batch.
* context: ``[B, L, C_ctx]`` tokens are normalised and projected to the model's context width, and a learned
  "null" token is prepended that every query may always attend to. So a fully masked context (e.g. dropped for
  CFG) stays well defined instead of giving a softmax over nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LogSNREmbedding", "ConditionEmbedding", "ContextEncoder", "batch_logsnr", "encode_context"]


def batch_logsnr(logsnr: Tensor | float, z: Tensor) -> Tensor:
    """Return log-SNR as a float32 ``[B]`` tensor for ``z`` ``[B, ...]`` (a scalar is repeated)."""
    b = z.shape[0]
    if not torch.is_tensor(logsnr):
        logsnr = torch.tensor(float(logsnr), device=z.device)
    logsnr = logsnr.to(device=z.device, dtype=torch.float32)
    if logsnr.dim() == 0 or logsnr.shape == (1,):
        return logsnr.reshape(1).expand(b)
    if logsnr.shape != (b,):
        raise ValueError(f"logsnr of shape {tuple(logsnr.shape)} does not match z of shape {tuple(z.shape)}; "
                         f"expected [{b}]")
    return logsnr


class LogSNREmbedding(nn.Module):
    """``logsnr [B] -> [B, emb_dim]``: Fourier features of the clamped, rescaled log-SNR, then an MLP."""

    def __init__(self, emb_dim: int, *, num_freqs: int = 64, max_freq: float = 1000.0, clamp: float = 20.0):
        super().__init__()
        self.clamp = float(clamp)
        freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), num_freqs))
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def features(self, logsnr: Tensor) -> Tensor:
        """Raw sin/cos features ``[B, 2 * num_freqs]`` (float32)."""
        u = logsnr.float().clamp(-self.clamp, self.clamp) / self.clamp
        ang = u[:, None] * self.freqs[None, :]
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    def forward(self, logsnr: Tensor) -> Tensor:
        return self.mlp(self.features(logsnr))


class ConditionEmbedding(nn.Module):
    """The per-example conditioning vector ``SiLU(emb(logsnr) + extra + emb(label))`` ``[B, emb_dim]``.

    ``extra`` is an optional additional embedding ``[B, emb_dim]`` supplied by a wrapper (e.g. the guidance-weight
    embedding of a guided-distillation student, :class:`simdiff.nets.students.GuidanceConditioned`).
    """

    def __init__(self, emb_dim: int, num_classes: int):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.logsnr = LogSNREmbedding(emb_dim)
        self.label = nn.Embedding(num_classes + 1, emb_dim)
        # Class rows at unit scale: they are added to the log-SNR embedding (norm ~1.5 at init, ~10 after training),
        # and rows initialised at 0.02 stay ~10x smaller than it through a short run, so the network learns to ignore
        # the label (class accuracy 0.15 -> 0.74 unguided, 0.24 -> 0.98 at w = 2 in a controlled 800-step MNIST run;
        # BENCHMARKS.md §3). An unconditional model keeps its single null row small.
        nn.init.normal_(self.label.weight, std=1.0 if num_classes > 0 else 0.02)

    def forward(self, logsnr: Tensor, labels: Tensor | None, extra: Tensor | None = None) -> Tensor:
        """``logsnr`` ``[B]``; ``labels`` LongTensor ``[B]`` or None (null class); ``extra`` ``[B, E]`` or None."""
        b = logsnr.shape[0]
        emb = self.logsnr(logsnr)
        if extra is not None:
            if extra.shape != emb.shape:
                raise ValueError(f"extra conditioning embedding of shape {tuple(extra.shape)} does not match "
                                 f"{tuple(emb.shape)}")
            emb = emb + extra.to(emb.dtype)
        if labels is None:
            lab = self.label.weight[self.num_classes].expand(b, -1)
        else:
            if labels.shape != (b,):
                raise ValueError(f"labels of shape {tuple(labels.shape)} do not match batch size {b}")
            lab = self.label(labels)
        return F.silu(emb + lab)


class ContextEncoder(nn.Module):
    """``context [B, L, C_ctx]`` -> ``([B, L + 1, width], mask [B, 1, 1, L + 1] or None)`` with a null token."""

    def __init__(self, context_dim: int, width: int):
        super().__init__()
        self.context_dim = context_dim
        self.norm = nn.LayerNorm(context_dim)
        self.proj = nn.Linear(context_dim, width)
        self.null = nn.Parameter(torch.randn(1, 1, width) * 0.02)

    def forward(self, context: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if context.dim() != 3 or context.shape[-1] != self.context_dim:
            raise ValueError(f"context of shape {tuple(context.shape)} is not [B, L, {self.context_dim}]")
        b, n = context.shape[:2]
        tokens = torch.cat([self.null.expand(b, -1, -1).to(context.dtype), self.proj(self.norm(context))], dim=1)
        if mask is None:
            return tokens, None
        if mask.shape != (b, n):
            raise ValueError(f"context_mask of shape {tuple(mask.shape)} does not match context {tuple(context.shape)}")
        full = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask.bool()], dim=1)
        return tokens, full[:, None, None, :]


def encode_context(
    encoder: ContextEncoder | None, context: Tensor | None, mask: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """Run ``encoder`` on ``context`` (None passes through); context given to a model without one is an error."""
    if context is None:
        return None, None
    if encoder is None:
        raise ValueError("context tokens were given but this backbone has context_dim=0 (no cross-attention)")
    return encoder(context, mask)


class BackboneInputs(nn.Module):
    """Shared front end of the backbones: input checks, conditioning embedding, context tokens, and zero-padding
    to a multiple of the total downsampling factor (cropped back by :meth:`crop`).

    Subclasses set ``self.cond`` (:class:`ConditionEmbedding`), ``self.context`` (:class:`ContextEncoder` or
    ``None``), ``self.multiple`` and ``self.image_shape``.
    """

    def prepare(
        self,
        z: Tensor,
        logsnr: Tensor,
        labels: Tensor | None,
        context: Tensor | None,
        context_mask: Tensor | None,
        extra_emb: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """-> ``(padded z, embedding [B, E], context tokens, context mask)``; ``extra_emb`` ``[B, E]`` is added to
        the log-SNR embedding (see :class:`ConditionEmbedding`)."""
        if z.dim() != 4 or z.shape[1] != self.image_shape[0]:
            raise ValueError(f"{type(self).__name__} expects [B, {self.image_shape[0]}, H, W], got {tuple(z.shape)}")
        emb = self.cond(batch_logsnr(logsnr, z), labels, extra_emb)
        ctx, mask = encode_context(self.context, context, context_mask)
        ph, pw = (-z.shape[-2]) % self.multiple, (-z.shape[-1]) % self.multiple
        x = F.pad(z, (0, pw, 0, ph)) if (ph or pw) else z
        return x, emb, ctx, mask

    @staticmethod
    def crop(out: Tensor, like: Tensor) -> Tensor:
        """Undo :meth:`prepare`'s padding: crop ``out`` to ``like``'s spatial size."""
        h, w = like.shape[-2:]
        return out if out.shape[-2:] == (h, w) else out[..., :h, :w]
