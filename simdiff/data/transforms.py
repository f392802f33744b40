"""Batched image transforms on ``[N, C, H, W]`` tensors in ``[-1, 1]``.

Pixel convention: uint8 ``u`` <-> float ``x = u / 127.5 - 1`` (so 0 -> -1 and 255 -> +1 exactly); the inverse is
``round((x + 1) * 127.5)`` clipped to 0..255 (see :func:`simdiff.images.to_uint8`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LUMA", "uint8_to_float", "float_to_uint8", "convert_channels", "resize_images", "random_hflip"]

#: ITU-R BT.601 luma weights, the same ones Pillow's ``convert("L")`` uses, so grey conversion agrees everywhere.
LUMA = (0.299, 0.587, 0.114)


def uint8_to_float(u: np.ndarray | Tensor) -> Tensor:
    """uint8 ``[N, H, W, C]`` (or ``[N, C, H, W]`` tensor of the same values) -> float32 in [-1, 1].

    NumPy input is taken as channels-last and permuted to ``[N, C, H, W]``; tensor input keeps its layout.
    """
    if isinstance(u, np.ndarray):
        if u.ndim != 4:
            raise ValueError(f"expected a uint8 array [N, H, W, C], got shape {u.shape}")
        u = torch.from_numpy(np.ascontiguousarray(u)).permute(0, 3, 1, 2)
    return u.to(torch.float32).div_(127.5).sub_(1.0).contiguous()


def float_to_uint8(x: Tensor) -> Tensor:
    """Float in [-1, 1] (any shape) -> uint8 tensor of the same shape, rounded and clipped."""
    return ((x.detach().to(torch.float32).clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)


def convert_channels(x: Tensor, channels: int | None) -> Tensor:
    """Grey <-> RGB for ``[N, C, H, W]``: 1 -> 3 repeats the plane, 3 -> 1 takes BT.601 luminance."""
    if x.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(x.shape)}")
    c = x.shape[1]
    if channels is None or channels == c:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels (supported: 1 and 3)")


def resize_images(x: Tensor, size: int | tuple[int, int], *, chunk: int = 4096) -> Tensor:
    """Resize ``[N, C, H, W]`` to ``size`` with antialiased bilinear interpolation, in chunks to bound memory.

    Antialiasing makes downsampling average over the footprint instead of aliasing (the filter weights are
    non-negative, so values stay inside the input range; we clamp to [-1, 1] for rounding safety).
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if x.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(x.shape)}")
    if tuple(x.shape[-2:]) == hw:
        return x
    parts = [
        F.interpolate(x[i : i + chunk], size=hw, mode="bilinear", antialias=True, align_corners=False)
        for i in range(0, x.shape[0], chunk)
    ]
    return torch.cat(parts).clamp_(-1, 1) if parts else x.new_empty(x.shape[0], x.shape[1], *hw)


def random_hflip(x: Tensor, *, generator: torch.Generator | None, p: float = 0.5) -> Tensor:
    """Flip each example of ``x [B, ..., W]`` left-right independently with probability ``p``.

    One uniform draw per example from ``generator`` (on the generator's device), so the flips are
    reproducible under a seeded generator and independent of the image content.
    """
    if x.dim() < 2:
        raise ValueError(f"expected a batch [B, ..., W], got shape {tuple(x.shape)}")
    device = generator.device if generator is not None else torch.device("cpu")
    flip = (torch.rand(x.shape[0], generator=generator, device=device) < p).to(x.device)
    flip = flip.view(-1, *([1] * (x.dim() - 1)))
    return torch.where(flip, x.flip(-1), x)
