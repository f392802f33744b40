"""The invertible LeGall 5/3 (CDF 5/3, JPEG 2000 lossless) wavelet as an input/output layer.

simple diffusion (Hoogeboom et al. 2023, sec. 3.4 "avoiding high resolution feature maps") uses the 5/3 DWT as
the first layer of the U-ViT and its inverse as the last, with the multi-level responses brought to the lowest
resolution by space-to-depth. We implement the real-valued lifting scheme (no integer rounding), along one axis:

    predict:  d[n] = x[2n+1] - (x[2n] + x[2n+2]) / 2
    update:   s[n] = x[2n]   + (d[n-1] + d[n]) / 4

with whole-sample symmetric extension at the borders (``x[N] = x[N-2]``, hence ``d[-1] = d[0]``). The inverse undoes
the two lifting steps in reverse order, so reconstruction is exact up to rounding for any even length.
2-D: the 1-D transform along W, then along H, gives bands LL, HL, LH, HH at half resolution.

Multi-level layout (``levels = L``, input ``[B, C, H, W]``, ``H, W`` divisible by ``2^L``): output
``[B, C * 4^L, H / 2^L, W / 2^L]`` = ``cat([dwt(LL, L-1), space_to_depth(details_1, 2^(L-1))])`` recursively, i.e.
channels ``[LL_L, details_L, details_{L-1} (unshuffled), ..., details_1 (unshuffled)]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["dwt53_1d", "idwt53_1d", "dwt53_2d", "idwt53_2d", "dwt53", "idwt53", "Wavelet53"]


def _shift_next(t: Tensor) -> Tensor:
    """``t[n+1]`` with the last element repeated (symmetric extension)."""
    return torch.cat([t[..., 1:], t[..., -1:]], dim=-1)


def _shift_prev(t: Tensor) -> Tensor:
    """``t[n-1]`` with the first element repeated (symmetric extension)."""
    return torch.cat([t[..., :1], t[..., :-1]], dim=-1)


def dwt53_1d(x: Tensor) -> tuple[Tensor, Tensor]:
    """Forward 5/3 lifting along the last dim (even length N) -> ``(s, d)``, each ``[..., N/2]``."""
    n = x.shape[-1]
    if n % 2:
        raise ValueError(f"5/3 wavelet needs an even length along the transformed axis, got {n}")
    even, odd = x[..., 0::2], x[..., 1::2]
    d = odd - 0.5 * (even + _shift_next(even))
    s = even + 0.25 * (_shift_prev(d) + d)
    return s, d


def idwt53_1d(s: Tensor, d: Tensor) -> Tensor:
    """Inverse of :func:`dwt53_1d`: ``(s, d)`` ``[..., M]`` -> ``[..., 2M]``."""
    even = s - 0.25 * (_shift_prev(d) + d)
    odd = d + 0.5 * (even + _shift_next(even))
    return torch.stack([even, odd], dim=-1).flatten(-2)


def dwt53_2d(x: Tensor) -> tuple[Tensor, Tensor]:
    """One 2-D level: ``[B, C, H, W]`` -> ``(LL [B, C, H/2, W/2], details [B, 3C, H/2, W/2])``."""
    lo, hi = dwt53_1d(x)  # along W
    ll, lh = (t.transpose(-1, -2) for t in dwt53_1d(lo.transpose(-1, -2)))  # along H
    hl, hh = (t.transpose(-1, -2) for t in dwt53_1d(hi.transpose(-1, -2)))
    return ll, torch.cat([lh, hl, hh], dim=1)


def idwt53_2d(ll: Tensor, details: Tensor) -> Tensor:
    """Inverse of :func:`dwt53_2d`."""
    lh, hl, hh = details.chunk(3, dim=1)
    lo = idwt53_1d(ll.transpose(-1, -2), lh.transpose(-1, -2)).transpose(-1, -2)
    hi = idwt53_1d(hl.transpose(-1, -2), hh.transpose(-1, -2)).transpose(-1, -2)
    return idwt53_1d(lo, hi)


def dwt53(x: Tensor, levels: int) -> Tensor:
    """Multi-level 5/3 DWT with space-to-depth: ``[B, C, H, W]`` -> ``[B, C 4^L, H / 2^L, W / 2^L]``."""
    if levels == 0:
        return x
    h, w = x.shape[-2:]
    if h % (2**levels) or w % (2**levels):
        raise ValueError(f"{levels}-level wavelet needs H, W divisible by {2**levels}, got {h}x{w}")
    ll, det = dwt53_2d(x)
    if levels > 1:
        det = F.pixel_unshuffle(det, 2 ** (levels - 1))
    return torch.cat([dwt53(ll, levels - 1), det], dim=1)


def idwt53(y: Tensor, levels: int) -> Tensor:
    """Inverse of :func:`dwt53`."""
    if levels == 0:
        return y
    c = y.shape[1] // 4**levels
    if c * 4**levels != y.shape[1]:
        raise ValueError(f"{levels}-level inverse wavelet needs channels divisible by {4**levels}, got {y.shape[1]}")
    rest, det = y[:, : c * 4 ** (levels - 1)], y[:, c * 4 ** (levels - 1):]
    if levels > 1:
        det = F.pixel_shuffle(det, 2 ** (levels - 1))
    return idwt53_2d(idwt53(rest, levels - 1), det)


class Wavelet53(nn.Module):
    """Parameter-free module: ``forward`` = :func:`dwt53`, ``inverse`` = :func:`idwt53` with fixed ``levels``."""

    def __init__(self, levels: int):
        super().__init__()
        if levels < 0:
            raise ValueError(f"wavelet levels must be >= 0, got {levels}")
        self.levels = levels

    def forward(self, x: Tensor) -> Tensor:
        return dwt53(x, self.levels)

    def inverse(self, y: Tensor) -> Tensor:
        return idwt53(y, self.levels)
