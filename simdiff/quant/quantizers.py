"""Uniform quantisers: symmetric per-channel / group-wise weights, asymmetric per-tensor activations, range finders.

Weights (``w`` viewed as ``[out, fan_in]``, symmetric, no zero point, narrow range ``[-qmax, qmax]`` with
``qmax = 2^(b-1) - 1``):

* int8 per output channel: ``s_o = max_i |w_oi| / 127``, ``q = round(w / s_o)``; nothing is clipped, so the
  reconstruction error of every element is at most ``s_o / 2``;
* int4 group-wise: the fan-in is cut into groups of ``group_size`` consecutive elements (zero-padded at the end),
  each group gets its own ``s = max |w| / 7``; codes are stored two per byte (:func:`pack_int4`).

Activations (asymmetric, per tensor, ``b`` bits): a calibrated range ``[lo, hi]`` (widened to contain 0, so 0 is
exact) gives ``s = (hi - lo) / (2^b - 1)`` and the zero point ``zp = round(-lo / s)``; ``x_hat = s (clamp(round(x /
s) + zp, 0, 2^b - 1) - zp)``. The range comes from an :class:`RangeObserver`: the running min/max ("minmax"), a
two-sided percentile of a value reservoir ("percentile"), or the clipping of the min/max range that minimises the
reservoir's squared quantisation error ("mse": a grid search over 41 shrink factors of the min/max range;
the grid is ours, not verified against Q-Diffusion's paper or code).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "ACT_RANGES",
    "quantize_per_channel",
    "dequantize_per_channel",
    "quantize_groupwise",
    "dequantize_groupwise",
    "pack_int4",
    "unpack_int4",
    "act_qparams",
    "fake_quant_act",
    "quant_act_codes",
    "RangeObserver",
]

ACT_RANGES = ("minmax", "percentile", "mse")


def _as_rows(w: Tensor) -> Tensor:
    if w.dim() < 2:
        raise ValueError(f"weight must have an output dimension and a fan-in, got shape {tuple(w.shape)}")
    return w.reshape(w.shape[0], -1)


def _float_rows(w: Tensor) -> Tensor:
    rows = _as_rows(w)
    return rows if rows.dtype == torch.float64 else rows.float()


def quantize_per_channel(w: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel quantisation of ``w`` ``[out, ...]`` -> ``(codes int8 like w, scale [out])``
    (scale float64 for float64 ``w``, else float32).

    A channel of zeros gets scale 1 (its codes are 0)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"per-channel weight bits must be in 2..8, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    rows = _float_rows(w)
    scale = rows.abs().amax(dim=1) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(rows / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return q.reshape(w.shape), scale


def dequantize_per_channel(q: Tensor, scale: Tensor) -> Tensor:
    """``codes [out, ...]`` int8, ``scale [out]`` -> weights like ``q`` in ``scale``'s dtype."""
    return (q.reshape(q.shape[0], -1).to(scale.dtype) * scale[:, None]).reshape(q.shape)


def quantize_groupwise(w: Tensor, bits: int = 4, group_size: int = 32) -> tuple[Tensor, Tensor]:
    """Symmetric group-wise quantisation along the fan-in.

    Args:
        w: ``[out, ...]`` (fan-in = product of the other dimensions, zero-padded to a multiple of ``group_size``).
    Returns:
        ``(codes int8 [out, groups * group_size], scale [out, groups])`` (float64 for float64 ``w``, else float32).
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"group-wise weight bits must be in 2..8, got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    qmax = 2 ** (bits - 1) - 1
    rows = _float_rows(w)
    fan_in = rows.shape[1]
    groups = -(-fan_in // group_size)
    padded = torch.nn.functional.pad(rows, (0, groups * group_size - fan_in)).reshape(rows.shape[0], groups, group_size)
    scale = padded.abs().amax(dim=2) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(padded / scale[..., None]).clamp_(-qmax, qmax).to(torch.int8)
    return q.reshape(rows.shape[0], groups * group_size), scale


def dequantize_groupwise(q: Tensor, scale: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`quantize_groupwise`: codes ``[out, G * g]``, scale ``[out, G]`` -> ``shape`` (in
    ``scale``'s dtype)."""
    out, groups = scale.shape
    w = (q.to(scale.dtype).reshape(out, groups, -1) * scale[..., None]).reshape(out, -1)
    return w[:, : math.prod(shape[1:])].reshape(shape)


def pack_int4(q: Tensor) -> Tensor:
    """int8 codes in ``[-8, 7]`` ``[out, n]`` (``n`` even) -> uint8 ``[out, n / 2]``, two codes per byte
    (low nibble = even index)."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of codes per row, got {q.shape[-1]}")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4` -> int8 codes ``[out, 2 * n]``."""
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], -1)


def act_qparams(lo: float, hi: float, bits: int = 8) -> tuple[float, float]:
    """Asymmetric ``(scale, zero_point)`` for the range ``[lo, hi]`` (widened to contain 0); zero point integer."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    levels = 2**bits - 1
    scale = (hi - lo) / levels
    if not scale > 0 or not math.isfinite(scale):
        return 1.0, 0.0
    return scale, float(min(max(round(-lo / scale), 0), levels))


def quant_act_codes(x: Tensor, scale: Tensor | float, zero_point: Tensor | float, bits: int = 8) -> Tensor:
    """Integer codes (as floats) ``clamp(round(x / s) + zp, 0, 2^b - 1)``."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 2**bits - 1)


def fake_quant_act(x: Tensor, scale: Tensor | float, zero_point: Tensor | float, bits: int = 8) -> Tensor:
    """Quantise-dequantise ``x`` with per-tensor ``scale`` / ``zero_point`` (same dtype as ``x``)."""
    return (quant_act_codes(x, scale, zero_point, bits) - zero_point) * scale


class RangeObserver:
    """Collects an activation's range over calibration batches and turns it into ``[lo, hi]``.

    Keeps the exact running min / max and, for "percentile" / "mse", a reservoir of at most ``max_values`` values
    (a fixed-seed random subset of each batch, at most ``per_batch`` per update).
    """

    def __init__(self, method: str = "minmax", *, percentile: float = 99.99, bits: int = 8,
                 max_values: int = 1 << 16, per_batch: int = 4096, seed: int = 0):
        if method not in ACT_RANGES:
            raise ValueError(f"unknown activation range method {method!r}; valid: {', '.join(ACT_RANGES)}")
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.method, self.percentile, self.bits = method, float(percentile), bits
        self.max_values, self.per_batch = max_values, per_batch
        self.lo, self.hi = math.inf, -math.inf
        self.count = 0
        self._values: list[Tensor] = []
        self._kept = 0
        self._gen = torch.Generator().manual_seed(seed)

    def update(self, x: Tensor) -> None:
        """Add a batch of activation values (any shape)."""
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        self.lo = min(self.lo, float(flat.min()))
        self.hi = max(self.hi, float(flat.max()))
        self.count += flat.numel()
        if self.method != "minmax" and self._kept < self.max_values:
            take = min(self.per_batch, flat.numel(), self.max_values - self._kept)
            idx = torch.randperm(flat.numel(), generator=self._gen)[:take]
            self._values.append(flat.cpu()[idx])
            self._kept += take

    def range(self) -> tuple[float, float]:
        """The calibrated ``(lo, hi)``; raises ValueError when nothing was observed."""
        if self.count == 0:
            raise ValueError("activation observer saw no data (is the layer reached by the calibration inputs?)")
        if self.method == "minmax" or not self._values:
            return self.lo, self.hi
        vals = torch.cat(self._values)
        if self.method == "percentile":
            q = torch.quantile(vals.double(), torch.tensor([1 - self.percentile / 100, self.percentile / 100],
                                                           dtype=torch.float64))
            return max(float(q[0]), self.lo), min(float(q[1]), self.hi)
        best, best_err = (self.lo, self.hi), math.inf
        for shrink in torch.linspace(0.2, 1.0, 41).tolist():
            lo, hi = self.lo * shrink, self.hi * shrink
            scale, zp = act_qparams(lo, hi, self.bits)
            err = float((fake_quant_act(vals, scale, zp, self.bits) - vals).square().mean())
            if err < best_err:
                best, best_err = (lo, hi), err
        return best
