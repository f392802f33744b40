"""Noise sources for stochastic samplers: i.i.d. draws, or one Brownian path sampled at any grid (Brownian tree).

A stochastic sampler asks its source for the standard normal of the step from level ``lam_t`` to ``lam_s``:
``source(z, lam_t, lam_s) -> Tensor`` shaped like ``z``. :class:`IIDNoise` draws fresh ``N(0, I)`` from a
generator (what the samplers do without a source). :class:`BrownianTreeNoise` returns the normalised increment
``(W(tau_s) - W(tau_t)) / sqrt(tau_s - tau_t)`` of one fixed Brownian motion ``W`` in the clock ``tau = exp(logsnr -
logsnr_max)``, so runs on different grids see the same path and a stochastic sampler converges to the SDE's
solution for that path as the grid is refined.

Why that clock: the reverse SDE's first-order exponential-integrator step from ``lambda_t`` to ``lambda_s``
(``lambda = logsnr / 2``; DPM-Solver++ SDE, Lu et al. 2022, sec. 5) has the noise term
``sigma_s sqrt(2) e^-lambda_s int e^u dW_u``; ``int e^u dW_u`` is a Brownian increment in ``tau ~ e^(2 lambda)``,
so with ``tau = SNR`` (up to a constant) the normalised increment *is* that Ito integral, not an approximation.

:class:`BrownianTree` is the "virtual Brownian tree" of Li et al. 2020 ("Scalable gradients for stochastic
differential equations", sec. 4 / Alg. 3, reimplemented from the description): the value at a query point is found
by bisecting ``[p0, p1]`` from the root, each midpoint drawn from the Brownian bridge between its parent's ends
with a generator seeded by (seed, node index), so every query sees the same path without storing it; below the
leaf width ``tol`` the path is the bridge mean (linear in the clock). Exact consequences (tested): ``W`` is a
function of the query point, so increments over adjacent intervals add up exactly, and ``Var[W(b) - W(a)] =
c(b) - c(a)`` for leaf-aligned points (within ``tol`` of it otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["BrownianTree", "BrownianTreeNoise", "IIDNoise", "NoiseSource"]

NoiseSource = Callable[[Tensor, float, float], Tensor]
_MASK = (1 << 63) - 1


def _node_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for tree node ``index`` (splitmix64 finaliser)."""
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (x ^ (x >> 31)) & _MASK


class BrownianTree:
    """A Brownian motion ``W`` on ``[p0, p1]`` with clock ``c`` (``Var[W(b) - W(a)] = c(b) - c(a)``), ``W(p0) = 0``.

    Args:
        shape: shape of ``W`` (e.g. the sampler state's).
        p0, p1: the interval (``p0 < p1``), bisected at midpoints in ``p``.
        clock: increasing map ``p -> c`` (Python floats; default identity).
        seed: the path's seed.
        tol: leaf width in ``p``.
        dtype, device: of the returned values (draws are made on the CPU in float64, then moved).
    """

    def __init__(self, shape: tuple[int, ...], *, p0: float, p1: float, clock: Callable[[float], float] | None = None,
                 seed: int = 0, tol: float = 1e-7, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu") -> None:
        if not (math.isfinite(p0) and math.isfinite(p1) and p0 < p1):
            raise ValueError(f"BrownianTree: need finite p0 < p1, got {p0}, {p1}")
        if tol <= 0:
            raise ValueError(f"BrownianTree: tol must be > 0, got {tol}")
        self.shape, self.p0, self.p1, self.seed, self.tol = tuple(shape), float(p0), float(p1), int(seed), tol
        self.clock = clock or (lambda p: p)
        self.dtype, self.device = dtype, device
        c0, c1 = self.clock(self.p0), self.clock(self.p1)
        if not c1 > c0:
            raise ValueError("BrownianTree: the clock must increase on [p0, p1]")
        zero = torch.zeros(self.shape, dtype=torch.float64)
        self._nodes: dict[int, Tensor] = {0: zero, 1: math.sqrt(c1 - c0) * self._normal(1)}

    def _normal(self, index: int) -> Tensor:
        g = torch.Generator().manual_seed(_node_seed(self.seed, index))
        return torch.randn(self.shape, generator=g, dtype=torch.float64)

    def _value(self, p: float) -> Tensor:
        """``W(p)`` in float64 on the CPU."""
        p = min(max(float(p), self.p0), self.p1)
        a, b = self.p0, self.p1
        wa, wb = self._nodes[0], self._nodes[1]
        index = 1  # heap index of the interval [a, b]; its midpoint value is stored under 2 * index
        while b - a > self.tol:
            m = 0.5 * (a + b)
            key = 2 * index
            if key not in self._nodes:
                ca, cm, cb = self.clock(a), self.clock(m), self.clock(b)
                mean = wa + (cm - ca) / (cb - ca) * (wb - wa)
                std = math.sqrt(max((cm - ca) * (cb - cm) / (cb - ca), 0.0))
                self._nodes[key] = mean + std * self._normal(key)
            wm = self._nodes[key]
            if p == m:
                return wm
            if p < m:
                b, wb, index = m, wm, 2 * index
            else:
                a, wa, index = m, wm, 2 * index + 1
        ca, cp, cb = self.clock(a), self.clock(p), self.clock(b)
        return wa + (cp - ca) / (cb - ca) * (wb - wa)

    def __call__(self, p: float) -> Tensor:
        """``W(p)`` (clamped to ``[p0, p1]``), in the tree's dtype and device."""
        return self._value(p).to(dtype=self.dtype, device=self.device)

    def increment(self, a: float, b: float) -> Tensor:
        """``W(b) - W(a)``."""
        return (self._value(b) - self._value(a)).to(dtype=self.dtype, device=self.device)


class BrownianTreeNoise:
    """Brownian-tree noise source over log-SNR levels ``[logsnr_min, logsnr_max]`` (see module doc).

    The tree is built on the first call, for the shape, dtype and device of that ``z``; it covers
    ``[logsnr_min - 2, logsnr_max]`` (the margin holds EDM's churned levels, at most ``2 log sqrt(2)`` below a grid
    point) and levels outside are clamped to it. Use one instance per sampling run (it caches the visited nodes).
    """

    MARGIN = 2.0

    def __init__(self, *, logsnr_min: float, logsnr_max: float, seed: int = 0, tol: float = 1e-7) -> None:
        if not (math.isfinite(logsnr_min) and math.isfinite(logsnr_max) and logsnr_min < logsnr_max):
            raise ValueError(f"BrownianTreeNoise: need finite logsnr_min < logsnr_max, got {logsnr_min}, "
                             f"{logsnr_max}")
        self.lo, self.hi, self.seed, self.tol = float(logsnr_min), float(logsnr_max), int(seed), tol
        self.tree: BrownianTree | None = None

    def clock(self, lam: float) -> float:
        """``tau = exp(logsnr - logsnr_max)`` (SNR up to a constant)."""
        return math.exp(lam - self.hi)

    def __call__(self, z: Tensor, lam_t: float, lam_s: float) -> Tensor:
        if self.tree is None or self.tree.shape != tuple(z.shape):
            self.tree = BrownianTree(tuple(z.shape), p0=self.lo - self.MARGIN, p1=self.hi, clock=self.clock,
                                     seed=self.seed, tol=self.tol, dtype=z.dtype, device=z.device)
        a, b = (min(max(float(v), self.lo - self.MARGIN), self.hi) for v in (lam_t, lam_s))
        length = abs(self.clock(b) - self.clock(a))
        if length == 0.0:
            raise ValueError(f"BrownianTreeNoise: empty step {lam_t} -> {lam_s} (inside the tree's range)")
        return self.tree.increment(a, b) / math.sqrt(length)


class IIDNoise:
    """Fresh ``N(0, I)`` per step from ``generator`` (what the samplers do without a source)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, z: Tensor, lam_t: float, lam_s: float) -> Tensor:
        return torch.randn(z.shape, generator=self.generator, dtype=z.dtype, device=z.device)
