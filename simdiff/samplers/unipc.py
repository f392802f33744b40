"""UniPC: unified predictor-corrector, bh1 / bh2 variants, data prediction (Zhao et al., NeurIPS 2023, Alg. 1-3).

Step t -> s with ``h = lambda_s - lambda_t`` (``lambda = logsnr / 2``), stored x-predictions x_0 (at t, newest) and
older x_m at normalised offsets ``r_m = (lambda_m - lambda_t) / h`` (negative), ``D_m = (x_m - x_0) / r_m``:

    UniP-p:  z_s = (sigma_s / sigma_t) z_t + alpha_s m_0 (x_0 + sum_{m < p} a_m D_m)
    UniC-p:  same with one more node, the x-prediction at the predicted z_s (r = 1), then z_s is replaced;
             that network call is reused by the next predictor, so the corrector costs no extra call.

``m_k = h^-k int_0^h e^(u - h) u^k du`` (so ``m_0 = 1 - e^-h`` = ``-B(h)`` for bh2, ``B(h) = e^-h - 1`` in data
prediction form); the coefficients solve ``R a = b`` with ``R_km = r_m^k`` and ``b_k = m_(k+1) / m_0`` (the paper's
``R_p^-1 g_p / B(h)``). For the lowest orders the paper fixes ``a = 1/2`` (predictor p = 2, corrector p = 1), which
is where the variants differ: the update adds ``-B(h) a_m D_m``, so with ``a = 1/2`` the coefficient on ``D`` is
``m_0 / 2`` for bh2 (``B(h) = e^-h - 1``) and ``h / 2`` for bh1 (``B(h) = -h`` in the data-prediction sign, i.e.
the paper's ``B(h) = h``); where ``a`` is solved from ``R a = b`` the product ``B(h) a`` does not depend on B (the
paper's ``b`` carries ``1 / B(h)``). Verified against diffusers' ``UniPCMultistepScheduler`` source (``B_h = hh``
for "bh1", ``expm1(hh)`` for "bh2", ``rho = 0.5`` at the lowest orders); the paper's text itself was not re-read
here. With p = 2 the bh2 predictor is DPM-Solver++(2M). The corrector is skipped on the last finite
step (its result would not be re-evaluated). Order ramps 1, 2, 3; the last finite step before +inf uses <= 2.
Isotropic process only (the node positions would differ per coordinate).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from simdiff.processes import GaussianProcess
from simdiff.samplers._common import Callback, Net, phi_moments, prepare_grid, require_isotropic, to_state
from simdiff.samplers.dpm_solver import multistep_loop, step_orders

__all__ = ["sample_unipc", "unipc_weights", "VARIANTS"]


VARIANTS = ("bh1", "bh2")


def _combine(nodes: Tensor, m0: Tensor, c: Tensor) -> Tensor:
    """Weights on (x at each node, ..., x_0) from ``m0 x_0 + sum c_m (x_m - x_0) / r_m``."""
    w = c / nodes
    return torch.cat([w, (m0 - w.sum())[None]])


def _solve(nodes: Tensor, m: Tensor, h: Tensor, fixed_half: bool, variant: str) -> Tensor:
    """The coefficients ``-B(h) a`` on the divided differences."""
    if fixed_half:
        return torch.full_like(nodes, 0.5) * (h if variant == "bh1" else m[0])
    k = nodes.shape[0]
    vander = nodes[None, :] ** torch.arange(k, dtype=nodes.dtype)[:, None]
    return torch.linalg.solve(vander, m[1 : k + 1])


def unipc_weights(lam: Tensor, orders: list[int], variant: str = "bh2") -> tuple[list[Tensor], list[Tensor | None]]:
    """Per-step predictor weights ``[p]`` (newest x first) and corrector weights ``[1 + p]`` (new x first)."""
    h = 0.5 * torch.diff(lam)
    preds: list[Tensor] = []
    corrs: list[Tensor | None] = []
    for i, p in enumerate(orders):
        m = phi_moments(h[i], p + 1)
        old = (lam[i - p + 1 : i].flip(0) - lam[i]) / (2 * h[i])  # r_1 .. r_(p-1), newest first
        if p == 1:
            preds.append(m[:1])
        else:
            w = _combine(old, m[0], _solve(old, m, h[i], fixed_half=p == 2, variant=variant))
            preds.append(torch.cat([w[-1:], w[:-1]]))  # x_0 first, then older
        if i == len(orders) - 1:
            corrs.append(None)
            continue
        nodes = torch.cat([torch.ones_like(h[i])[None], old])
        w = _combine(nodes, m[0], _solve(nodes, m, h[i], fixed_half=p == 1, variant=variant))
        corrs.append(torch.cat([w[:1], w[-1:], w[1:-1]]))  # new x, x_0, older
    return preds, corrs


def sample_unipc(
    denoise: Callable,
    z: Tensor,
    logsnrs: Tensor,
    *,
    order: int = 3,
    variant: str = "bh2",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
) -> Tensor:
    """UniPC (UniP-p + UniC), data prediction, ``order`` in {1, 2, 3}, ``variant`` "bh1" (``B(h) = h``) or "bh2"
    (``B(h) = e^h - 1``); one network call per step.

    Signature as :func:`simdiff.samplers.sample_ddim` (decreasing finite grids invert); ``generator`` is unused;
    isotropic process only.
    """
    require_isotropic(process, "unipc")
    if order not in (1, 2, 3):
        raise ValueError(f"unipc: order must be 1, 2 or 3, got {order}")
    if variant not in VARIANTS:
        raise ValueError(f"unipc: unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    grid = prepare_grid(logsnrs, name="unipc", allow_decreasing=True)
    net = Net(denoise, z, grid, cond, process)
    ratio, a_s, _ = (to_state(t, z) for t in net.process.ei_coefficients(grid.lam))
    preds, corrs = unipc_weights(grid.lam, step_orders(grid, order), variant)
    return multistep_loop(
        net,
        net.encode(z),
        grid,
        ratio=ratio,
        alpha_next=a_s,
        weights=[to_state(w, z) for w in preds],
        corrector=[None if w is None else to_state(w, z) for w in corrs],
        callback=callback,
    )
