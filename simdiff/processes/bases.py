"""Orthonormal bases for diagonal Gaussian processes: the coordinates in which alpha and sigma act per element.

* :class:`IdentityBasis`: pixel coordinates; ``encode`` and ``decode`` return their argument itself (no ops).
* :class:`DCTBasis`: the orthonormal 2-D DCT-II over the last two dims (any H, W), whose inverse is the DCT-III;
  the frequency basis of blurring diffusion (Hoogeboom & Salimans 2023, "Blurring diffusion models").

Both are orthonormal, so white noise stays white (``encode(eps) ~ N(0, I)``) and squared errors are preserved.
A per-frame process (one noise level per video frame) needs no basis of its own: its coefficients are shaped
per frame (e.g. ``[B, F, 1, 1, 1]``) and act in either basis.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["Basis", "IdentityBasis", "DCTBasis", "dct_matrix"]


class Basis(Protocol):
    """``encode(x) -> u`` and ``decode(u) -> x``, an orthonormal change of coordinates of the trailing dims."""

    name: str
    is_identity: bool

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, u: Tensor) -> Tensor: ...


class IdentityBasis:
    """The pixel basis: ``encode`` and ``decode`` return the very same tensor object."""

    name = "identity"
    is_identity = True

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, u: Tensor) -> Tensor:
        return u

    def __repr__(self) -> str:
        return "IdentityBasis()"


def dct_matrix(n: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """The ``[n, n]`` orthonormal DCT-II matrix ``C[k, j] = c_k cos(pi (2 j + 1) k / (2 n))``.

    ``c_0 = sqrt(1 / n)``, ``c_k = sqrt(2 / n)`` otherwise; ``C @ C.T = I``, so ``C.T`` is the orthonormal DCT-III
    (the exact inverse). Built in float64, then cast.
    """
    if n < 1:
        raise ValueError(f"dct_matrix: size must be >= 1, got {n}")
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * j + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] = c[0] / math.sqrt(2.0)
    return c.to(dtype=dtype, device=device)


class DCTBasis:
    """Orthonormal 2-D DCT-II over the last two dims: ``encode(x) = C_H x C_W^T``, ``decode(u) = C_H^T u C_W``.

    The matrices are built in float64 and cached per (H, W, dtype, device); inputs need >= 2 dims.
    """

    name = "dct"
    is_identity = False

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _mats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() < 2:
            raise ValueError(f"DCTBasis needs a tensor with >= 2 dims (.., H, W), got shape {tuple(x.shape)}")
        key = (x.shape[-2], x.shape[-1], x.dtype, x.device)
        if key not in self._cache:
            self._cache[key] = (
                dct_matrix(x.shape[-2], dtype=x.dtype, device=x.device),
                dct_matrix(x.shape[-1], dtype=x.dtype, device=x.device),
            )
        return self._cache[key]

    def encode(self, x: Tensor) -> Tensor:
        ch, cw = self._mats(x)
        return ch @ x @ cw.T

    def decode(self, u: Tensor) -> Tensor:
        ch, cw = self._mats(u)
        return ch.T @ u @ cw

    def __repr__(self) -> str:
        return "DCTBasis()"
