"""Distortion measures: PSNR, SSIM and MS-SSIM (Wang, Simoncelli & Bovik 2003) in torch.

SSIM (Wang et al. 2004, eq. 13) with an 11-tap Gaussian window of std 1.5, ``K1 = 0.01``, ``K2 = 0.03``, local
statistics over the *valid* part of the image (no padding) and population (biased) variances. MS-SSIM
(Wang et al. 2003, eq. 7) multiplies the contrast-structure term ``cs_j`` of scales ``j = 1..M-1`` and the full
SSIM term ``l_M cs_M`` of the coarsest scale, each raised to the paper's exponents
``(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)``; between scales the images are 2x2 average-pooled (an odd side is
padded by repeating its last row/column; pytorch_msssim pads with zeros there, so odd sizes differ slightly).
Negative ``cs`` values are clamped to 0 before the powers (the paper leaves them undefined).
Colour images: each channel separately, then the mean over channels.

Five scales with an 11-tap window need sides of at least 161 pixels; ``scales`` may be lowered for small
patches (the first ``scales`` exponents, renormalised to sum to one) -- say which when reporting numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MS_SSIM_WEIGHTS", "psnr", "mse", "ssim", "ms_ssim", "gaussian_window"]

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"images must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(x.shape)}")


def mse(x: Tensor, y: Tensor) -> Tensor:
    """Per-image mean squared error ``[B]`` of ``[B, C, H, W]`` images."""
    _check_pair(x, y)
    return (x - y).pow(2).flatten(1).mean(1)


def psnr(x: Tensor, y: Tensor, *, data_range: float = 255.0) -> Tensor:
    """Per-image PSNR in dB ``[B]``: ``10 log10(data_range^2 / MSE)`` (``inf`` for identical images)."""
    return 10.0 * torch.log10(data_range**2 / mse(x.double(), y.double()))


def gaussian_window(size: int = 11, sigma: float = 1.5, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Normalised 1-D Gaussian taps ``[size]`` centred on the middle tap."""
    r = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: Tensor, win: Tensor) -> Tensor:
    """Separable valid filtering of ``[B, C, H, W]`` per channel."""
    c = x.shape[1]
    k = win.to(x)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _ssim_terms(x: Tensor, y: Tensor, win: Tensor, data_range: float, k1: float, k2: float) -> tuple[Tensor, Tensor]:
    """Channel-wise mean SSIM and mean contrast-structure ``([B, C], [B, C])``."""
    if min(x.shape[-2:]) < win.numel():
        raise ValueError(f"image side {min(x.shape[-2:])} is smaller than the {win.numel()}-tap SSIM window "
                         "(use fewer MS-SSIM scales or a smaller window)")
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mx, my = _blur(x, win), _blur(y, win)
    vx = _blur(x * x, win) - mx * mx
    vy = _blur(y * y, win) - my * my
    cxy = _blur(x * y, win) - mx * my
    cs = (2 * cxy + c2) / (vx + vy + c2)
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    return (lum * cs).flatten(2).mean(-1), cs.flatten(2).mean(-1)


def _halve(x: Tensor) -> Tensor:
    """2x2 average pooling; an odd side is first padded by repeating its last row/column."""
    pad = (0, x.shape[-1] % 2, 0, x.shape[-2] % 2)
    return F.avg_pool2d(F.pad(x, pad, mode="replicate") if any(pad) else x, 2)


def ssim(x: Tensor, y: Tensor, *, data_range: float = 255.0, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Mean SSIM per image ``[B]`` (channels averaged), computed in float64."""
    _check_pair(x, y)
    s, _ = _ssim_terms(x.double(), y.double(), gaussian_window(win_size, sigma), data_range, k1, k2)
    return s.mean(1)


def ms_ssim(x: Tensor, y: Tensor, *, data_range: float = 255.0, scales: int = 5, win_size: int = 11,
            sigma: float = 1.5, weights: tuple[float, ...] | None = None, k1: float = 0.01,
            k2: float = 0.03) -> Tensor:
    """MS-SSIM per image ``[B]`` of ``[B, C, H, W]`` images with values in ``[0, data_range]``; float64.

    Args:
        x, y: the two images (symmetric).
        data_range: the value range (255 for uint8 levels, 2 for [-1, 1]).
        scales: number of scales ``M`` (1..5); the exponents are the first ``M`` of :data:`MS_SSIM_WEIGHTS`
            renormalised to sum to one unless ``weights`` is given.
        weights: explicit exponents, one per scale.
    """
    _check_pair(x, y)
    if weights is None:
        if not 1 <= scales <= len(MS_SSIM_WEIGHTS):
            raise ValueError(f"scales must be in 1..{len(MS_SSIM_WEIGHTS)} without explicit weights, got {scales}")
        w = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float64)
        w = w / w.sum()
    else:
        w = torch.tensor(weights, dtype=torch.float64)
        scales = w.numel()
    need = (win_size - 1) * 2 ** (scales - 1) + 1
    if min(x.shape[-2:]) < need:
        raise ValueError(f"MS-SSIM with {scales} scales and a {win_size}-tap window needs sides >= {need}, got "
                         f"{tuple(x.shape[-2:])}")
    win = gaussian_window(win_size, sigma)
    x, y = x.double(), y.double()
    out = torch.ones(x.shape[:2], dtype=torch.float64, device=x.device)
    for j in range(scales):
        full, cs = _ssim_terms(x, y, win, data_range, k1, k2)
        term = full if j == scales - 1 else cs
        out = out * term.clamp_min(0).pow(w[j].item())
        if j < scales - 1:
            x, y = _halve(x), _halve(y)
    return out.mean(1)
