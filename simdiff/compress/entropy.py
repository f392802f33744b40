"""Entropy models of the scale hyperprior (Ballé, Minnen, Singh, Hwang & Johnston 2018) and their range coding.

* :class:`FactorizedDensity`: the per-channel "non-parametric" density of the hyper-latent ``z`` (Ballé et al.
  2018, appendix 6.1): a monotone cumulative ``c(x) = f_K(...f_1(x))`` with ``f_k(x) = g_k(H_k x + b_k)``,
  ``g_k(x) = x + tanh(a_k) * tanh(x)``, ``H_k = softplus(H'_k)`` (so ``c`` increases) and a final sigmoid; the
  mass of an integer bin is ``sigmoid(c(x + 1/2)) - sigmoid(c(x - 1/2))``. Filters ``(3, 3, 3)`` as in the paper;
  the initialisation follows the paper's description loosely (not verified against its code).
* :func:`gaussian_likelihood`: the zero-mean Gaussian of ``y`` given its scale, convolved with a unit box (the
  noise proxy) / integrated over the integer bin (rounding).
* :func:`encode_latents` / :func:`decode_latents`: one range-coded stream (``constriction.stream.queue``) holding
  ``z`` (categorical tables computed from :class:`FactorizedDensity`) then ``y`` (quantized Gaussians). The scales
  of ``y`` are snapped to the 64-entry log-spaced :data:`SCALE_TABLE` before coding, so the encoder and decoder
  agree on each symbol's distribution even if a float differs in the last place between two runs; the exact
  agreement of the ``z`` tables still relies on the same floating-point results on both sides (the same machine
  and library versions), as in every learned codec that codes with float-computed tables.

Likelihoods are floored at ``LIKELIHOOD_FLOOR`` so rates stay finite.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simdiff.configuration import ConfigError

from .format import varint as _varint

__all__ = ["FactorizedDensity", "gaussian_likelihood", "quantize", "SCALE_TABLE", "SCALE_MIN", "snap_scales",
           "encode_latents", "decode_latents", "LIKELIHOOD_FLOOR"]

LIKELIHOOD_FLOOR = 1e-9
SCALE_MIN = 0.11
SCALE_TABLE = torch.exp(torch.linspace(math.log(SCALE_MIN), math.log(256.0), 64, dtype=torch.float64))


def quantize(x: Tensor, *, noise: bool, generator: torch.Generator | None = None) -> Tensor:
    """Additive uniform noise ``U(-1/2, 1/2)`` (the training proxy for rounding) or rounding."""
    if not noise:
        return torch.round(x)
    u = torch.rand(x.shape, generator=generator, device=x.device if generator is None else generator.device)
    return x + (u.to(x) - 0.5)


class FactorizedDensity(nn.Module):
    """Per-channel learned density of ``channels`` independent scalars (Ballé et al. 2018, appendix 6.1).

    Args:
        channels: number of channels (one density each).
        filters: widths of the hidden layers of the cumulative.
        init_scale: roughly the initial spread of the density.
    """

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3), init_scale: float = 10.0):
        super().__init__()
        dims = (1, *filters, 1)
        scale = init_scale ** (1.0 / (len(dims) - 1))
        self.matrices, self.biases, self.factors = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        for i in range(len(dims) - 1):
            init = math.log(math.expm1(1.0 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, dims[i + 1], 1) - 0.5))
            if i < len(dims) - 2:
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))
        self.channels = channels

    def logits_cdf(self, x: Tensor) -> Tensor:
        """``x`` ``[C, 1, N]`` -> the cumulative's logit ``c(x)`` ``[C, 1, N]``."""
        h = x
        for i, (m, b) in enumerate(zip(self.matrices, self.biases)):
            h = torch.matmul(F.softplus(m).to(h), h) + b.to(h)
            if i < len(self.factors):
                h = h + torch.tanh(self.factors[i]).to(h) * torch.tanh(h)
        return h

    def likelihood(self, z: Tensor) -> Tensor:
        """Mass of the unit bin around each value of ``z`` ``[B, C, H, W]`` (same shape), floored."""
        b, c, h, w = z.shape
        flat = z.permute(1, 0, 2, 3).reshape(c, 1, -1)
        lower, upper = self.logits_cdf(flat - 0.5), self.logits_cdf(flat + 0.5)
        sign = -torch.sign(lower + upper).detach()  # evaluate in the tail where the sigmoids are accurate
        p = (torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).abs()
        return p.clamp_min(LIKELIHOOD_FLOOR).reshape(c, b, h, w).permute(1, 0, 2, 3)

    def pmf_tables(self, radius: int) -> np.ndarray:
        """float64 ``[C, 2 radius + 1]``: each channel's bin masses on the integers ``-radius..radius``."""
        support = torch.arange(-radius, radius + 1, dtype=torch.float64)
        grid = support.view(1, 1, 1, -1).expand(1, self.channels, 1, -1)
        with torch.no_grad():
            probs = self.likelihood(grid)
        return probs.reshape(self.channels, -1).numpy().astype(np.float64)


def gaussian_likelihood(y: Tensor, scale: Tensor) -> Tensor:
    """Mass of ``N(0, scale^2)`` on ``[y - 1/2, y + 1/2]`` (computed on the lower tail for accuracy), floored."""
    scale = scale.clamp_min(SCALE_MIN)
    a = y.abs()
    upper = torch.special.ndtr((0.5 - a) / scale)
    lower = torch.special.ndtr((-0.5 - a) / scale)
    return (upper - lower).clamp_min(LIKELIHOOD_FLOOR)


def snap_scales(scale: Tensor) -> Tensor:
    """Each scale replaced by the smallest :data:`SCALE_TABLE` entry at or above it (the last entry caps it)."""
    idx = torch.searchsorted(SCALE_TABLE, scale.detach().double().clamp_min(SCALE_MIN).flatten().contiguous())
    return SCALE_TABLE[idx.clamp_max(len(SCALE_TABLE) - 1)].view(scale.shape)


def _constriction():
    try:
        import constriction
    except ImportError:
        raise ConfigError("the learned codec needs the range coder package; install it with: pip install "
                          "constriction") from None
    return constriction


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= len(data):
            raise ConfigError("corrupted payload (truncated integer)")
        byte = data[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return n, pos
        if shift > 35:
            raise ConfigError("corrupted payload (bad integer)")


def _z_params(density: FactorizedDensity, radius: int, shape: tuple[int, ...]) -> np.ndarray:
    """Per-symbol categorical tables ``[numel, 2 radius + 1]`` (float32) for ``z`` of ``shape [1, C, h, w]``."""
    tables = density.pmf_tables(radius)  # [C, K]
    reps = int(np.prod(shape[2:]))
    return np.repeat(tables, reps, axis=0).astype(np.float32)


def encode_latents(y_hat: Tensor, y_scale: Tensor, z_hat: Tensor, density: FactorizedDensity) -> bytes:
    """Range-code rounded latents. ``y_hat`` ``[1, M, h, w]`` integers, ``y_scale`` like it (snapped to the table
    here), ``z_hat`` ``[1, N, h', w']`` integers. Returns ``varint(Ry) varint(Rz) words...`` (little-endian uint32)."""
    cs = _constriction()
    y = y_hat.detach().to(torch.int64).flatten().numpy()
    z = z_hat.detach().to(torch.int64).permute(1, 0, 2, 3).flatten().numpy()  # channel-major, as the tables
    ry = int(np.abs(y).max(initial=0)) + 1
    rz = int(np.abs(z).max(initial=0)) + 1
    enc = cs.stream.queue.RangeEncoder()
    enc.encode((z + rz).astype(np.int32), cs.stream.model.Categorical(perfect=False),
               _z_params(density, rz, tuple(z_hat.shape)))
    stds = snap_scales(y_scale).flatten().numpy().astype(np.float64)
    enc.encode(y.astype(np.int32), cs.stream.model.QuantizedGaussian(-ry, ry), np.zeros_like(stds), stds)
    words = enc.get_compressed().astype("<u4")
    return _varint(ry) + _varint(rz) + words.tobytes()


def decode_latents(data: bytes, *, z_shape: tuple[int, ...], density: FactorizedDensity, scale_fn) -> tuple[
        Tensor, Tensor]:
    """Inverse of :func:`encode_latents`. ``scale_fn(z_hat) -> y_scale [1, M, h, w]`` runs the hyper-synthesis.

    Returns ``(y_hat, z_hat)`` as float32 tensors of integers. Raises ConfigError on a malformed payload.
    """
    cs = _constriction()
    ry, pos = _read_varint(data, 0)
    rz, pos = _read_varint(data, pos)
    if (len(data) - pos) % 4 or ry > 1 << 20 or rz > 1 << 16:
        raise ConfigError("corrupted payload (bad latent ranges or stream length)")
    words = np.frombuffer(data[pos:], dtype="<u4").astype(np.uint32)
    dec = cs.stream.queue.RangeDecoder(words)
    try:
        z = dec.decode(cs.stream.model.Categorical(perfect=False), _z_params(density, rz, z_shape)) - rz
        z_hat = torch.from_numpy(z.astype(np.float32)).view(z_shape[1], z_shape[0], *z_shape[2:]).permute(1, 0, 2, 3)
        y_scale = scale_fn(z_hat.contiguous())
        stds = snap_scales(y_scale).flatten().numpy().astype(np.float64)
        y = dec.decode(cs.stream.model.QuantizedGaussian(-ry, ry), np.zeros_like(stds), stds)
    except (ValueError, RuntimeError, AssertionError) as e:
        raise ConfigError(f"corrupted payload ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return torch.from_numpy(y.astype(np.float32)).view(y_scale.shape), z_hat.contiguous()
