"""U-ViT / residual U-ViT for text conditioning: cross-attention to token states plus a pooled vector in adaLN.

The U-ViT (:class:`simdiff.nets.uvit.UViT`) already attends to context tokens in every transformer block when
``context_dim > 0`` (keys/values from the normalised, projected tokens with a learned null token always attendable,
:class:`simdiff.nets.conditioning.ContextEncoder`; padding masked out). :class:`TextUViT` adds the global path:
the mean of the **raw** token states over the valid (unmasked) tokens -- the sentence embedding all-MiniLM-L6-v2 is
trained to produce (mean pooling) -- goes through ``LayerNorm -> Linear -> SiLU -> Linear`` to the conditioning
width and is added to the log-SNR embedding, so it reaches every ResBlock's scale/shift and every transformer
block's adaLN modulation (the pooled-text path of Imagen, Saharia et al. 2022, sec. 2.2 / appendix, with a
frozen text encoder). The pooled vector is computed from ``context`` and ``context_mask`` inside the backbone, so
the denoiser's keywords stay ``context`` / ``context_mask``.

The backbone ``text_uvit`` (residual SiD2 skips by default; ``residual: false`` for U-ViT skips) is added to
``BACKBONES`` by :func:`register` (importing :mod:`simdiff.text` calls it).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .uvit import UViT, UViTConfig

__all__ = ["TextUViTConfig", "TextUViT", "pooled_context", "register"]


@dataclass(frozen=True)
class TextUViTConfig(UViTConfig):
    """:class:`UViTConfig` with cross-attention on (``context_dim`` = 384, all-MiniLM-L6-v2's width), SiD2
    residual skips, and ``pooled``: add the mean-pooled context to the conditioning embedding (adaLN)."""

    context_dim: int = 384
    residual: bool = True
    pooled: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.context_dim < 1:
            raise ValueError(f"TextUViTConfig.context_dim must be >= 1 (the text encoder's width), got "
                             f"{self.context_dim}")


def pooled_context(context: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``context`` ``[B, L, C]`` over the tokens where ``mask`` ``[B, L]`` is true (all when None) -> [B, C].

    A row with no valid token gives zeros."""
    if mask is None:
        return context.mean(1)
    m = mask.to(context.dtype).unsqueeze(-1)
    return (context * m).sum(1) / m.sum(1).clamp_min(1.0)


class TextUViT(UViT):
    """``TextUViT(cfg, image_channels=, image_size=, num_classes=)``; ``forward`` as :class:`UViT`."""

    def __init__(self, cfg: TextUViTConfig, *, image_channels: int, image_size: int | tuple[int, int],
                 num_classes: int):
        super().__init__(cfg, image_channels=image_channels, image_size=image_size, num_classes=num_classes)
        emb_dim = cfg.emb_dim or cfg.dim
        self.pooled = None
        if cfg.pooled:
            self.pooled = nn.Sequential(nn.LayerNorm(cfg.context_dim), nn.Linear(cfg.context_dim, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))

    def forward(
        self,
        z: Tensor,
        logsnr: Tensor,
        labels: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        extra_emb: Tensor | None = None,
    ) -> Tensor:
        """As :meth:`UViT.forward`; with a context, its pooled embedding is added to ``extra_emb``."""
        if self.pooled is not None and context is not None:
            pooled = self.pooled(pooled_context(context, context_mask))
            extra_emb = pooled if extra_emb is None else extra_emb + pooled
        return super().forward(z, logsnr, labels, context, context_mask, extra_emb)


def register() -> None:
    """Add ``text_uvit`` to :data:`simdiff.nets.denoiser.BACKBONES` (idempotent)."""
    from .denoiser import BACKBONES

    BACKBONES.setdefault("text_uvit", (TextUViTConfig, TextUViT))
