"""DPM-Solver++ multistep samplers (data prediction, exponential integrators in ``lambda = logsnr / 2``).

Exact solution of the PF-ODE from t to s in data-prediction form (Lu et al. 2022, DPM-Solver++, eq. 9):

    z_s = (sigma_s / sigma_t) z_t + alpha_s int_0^h e^(u - h) x_hat(lambda_t + u) du,   h = lambda_s - lambda_t.

"dpmpp_2m" is DPM-Solver++(2M) exactly as published (Lu et al. 2022, Alg. 2):
``D = (1 + 1/(2r)) x_i - 1/(2r) x_(i-1)``, ``r = h_(i-1) / h_i``,
``z_s = (sigma_s/sigma_t) z_t + alpha_s (1 - e^-h) D``;
first step first order. "dpmpp_3m" is the third-order member of the same multistep family: the integral is taken
exactly over the quadratic through the last three x-predictions (exponential Adams-Bashforth; the published 3M
update agrees with it to leading order). Orders ramp up 1, 2, 3 over the first steps, and the last finite step
before a final +inf uses order <= 2 ("lower_order_final", as in DPM-Solver / diffusers) for stability at few steps.
A final +inf step returns x_hat at the last finite point (the h -> inf limit of the first-order update).

"dpmpp_2m" runs on any diagonal process: per basis coordinate the same formulas hold with that coordinate's
``sigma_s / sigma_t``, ``alpha_s`` and ``h`` (``lambda = log alpha - log sigma``), including ``r = h_(i-1) / h_i``
(:meth:`simdiff.processes.GaussianProcess.ei_coefficients`). "dpmpp_3m" needs the isotropic process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from simdiff.processes import GaussianProcess
from simdiff.samplers._common import (
    Callback,
    Grid,
    Net,
    adams_weights,
    land,
    phi_moments,
    prepare_grid,
    require_isotropic,
    to_state,
)
from simdiff.samplers.noise import NoiseSource

__all__ = ["sample_dpmpp_2m", "sample_dpmpp_3m", "multistep_loop", "step_orders"]


def step_orders(grid: Grid, order: int) -> list[int]:
    """Per finite step order: ramp ``min(order, i + 1)``; the last finite step before +inf capped at 2."""
    m = grid.steps
    cap = [m - i + 1 if grid.final_inf else order for i in range(m)]
    return [max(1, min(order, i + 1, cap[i])) for i in range(m)]


def multistep_loop(
    net: Net,
    z: Tensor,
    grid: Grid,
    *,
    ratio: Tensor,
    alpha_next: Tensor,
    weights: list[Tensor],
    corrector: list[Tensor | None] | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    source: NoiseSource | None = None,
) -> Tensor:
    """Run ``z <- ratio_i z + alpha_next_i sum_j w_ij x_(i-j)`` (+ ``noise_i * N(0, I)``) over the grid.

    The standard normals come from ``source(z, lam_i, lam_(i+1))`` when given (:mod:`simdiff.samplers.noise`),
    else from ``torch.randn`` with ``generator``.

    ``weights[i]``: ``[k_i]`` weights on the stored x-predictions, newest first. ``corrector[i]`` (optional):
    ``[1 + k_i]`` weights on (x at the predicted new point, then the stored ones); the corrected state replaces the
    predicted one and the new x-prediction is reused by the next step (UniC, Zhao et al. 2023). Coefficients are
    already on the state's device/dtype (each entry ``[*coef_shape]``, broadcast against the state, which is in
    basis coordinates): the loop does no host syncs. Returns the sample in data space.
    """
    m = grid.steps
    x_cur = net.x(z, 0) if m > 0 or grid.final_inf else None
    xs: list[Tensor] = []
    for i in range(m):
        xs = [x_cur] + xs[:2]
        w = weights[i]
        z_pred = ratio[i] * z + alpha_next[i] * sum(w[j] * xs[j] for j in range(w.shape[0]))
        if noise is not None:
            if source is None:
                xi = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
            else:
                xi = source(z, float(net.host_lam[i]), float(net.host_lam[i + 1]))
            z_pred = z_pred + noise[i] * xi
        if i < m - 1 or grid.final_inf:
            x_cur = net.x(z_pred, i + 1)
            wc = None if corrector is None else corrector[i]
            if wc is not None:
                acc = wc[0] * x_cur + sum(wc[j + 1] * xs[j] for j in range(wc.shape[0] - 1))
                z_pred = ratio[i] * z + alpha_next[i] * acc
        z = z_pred
        net.emit(callback, i, z, xs[0], net.lam[i + 1])
    return land(net, z, grid, callback, x=x_cur)


def _half_steps(lam: Tensor) -> Tensor:
    return 0.5 * torch.diff(lam)


def dpmpp_2m_weights(h: Tensor, *, scale: Tensor | None = None) -> list[Tensor]:
    """Published DPM-Solver++(2M) weights ``scale_i * [1 + 1/(2r), -1/(2r)]`` (first step ``[scale_0]``).

    ``h``: ``[M, *coef_shape]`` steps in ``lambda`` (per coordinate; ``[M]`` for the isotropic process), so each
    entry is ``[k_i, *coef_shape]``. ``scale`` defaults to ``1 - e^-h`` (the ODE); the SDE variant passes
    ``1 - e^-((1 + eta) h)``.
    """
    scale = -torch.expm1(-h) if scale is None else scale
    out = [scale[:1]]
    for i in range(1, h.shape[0]):
        r = h[i - 1] / h[i]
        out.append(scale[i] * torch.stack([1 + 0.5 / r, -0.5 / r]))
    return out


def exact_multistep_weights(lam: Tensor, orders: list[int]) -> list[Tensor]:
    """Exponential Adams-Bashforth weights of the given per-step orders (see :func:`adams_weights`)."""
    h = _half_steps(lam)
    out = []
    for i, k in enumerate(orders):
        nodes = (lam[i - k + 1 : i + 1].flip(0) - lam[i]) / (2 * h[i])  # newest (0) first
        out.append(adams_weights(nodes, phi_moments(h[i], k)))
    return out


def _run(denoise, z, logsnrs, weights_fn, *, name, callback, cond, process) -> Tensor:
    grid = prepare_grid(logsnrs, name=name, allow_decreasing=True)
    net = Net(denoise, z, grid, cond, process)
    ratio, a_s, h = net.process.ei_coefficients(grid.lam)
    weights = [to_state(w, z) for w in weights_fn(grid, h)]
    u = net.encode(z)
    return multistep_loop(
        net, u, grid, ratio=to_state(ratio, z), alpha_next=to_state(a_s, z), weights=weights, callback=callback
    )


def sample_dpmpp_2m(
    denoise: Callable,
    z: Tensor,
    logsnrs: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), one call per step; decreasing finite grids invert; any diagonal
    process. Signature as :func:`simdiff.samplers.sample_ddim`; ``generator`` is unused."""
    return _run(denoise, z, logsnrs, lambda g, h: dpmpp_2m_weights(h), name="dpmpp_2m", callback=callback, cond=cond,
                process=process)


def sample_dpmpp_3m(
    denoise: Callable,
    z: Tensor,
    logsnrs: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
) -> Tensor:
    """Third-order data-prediction multistep (DPM-Solver++(3M) family, exact exponential Adams weights).
    One call per step; orders 1, 2, 3, ..., 3, 2 (before a final +inf). ``generator`` is unused; isotropic
    process only."""
    require_isotropic(process, "dpmpp_3m")

    def weights(g: Grid, h: Tensor) -> list[Tensor]:
        return exact_multistep_weights(g.lam, step_orders(g, 3))

    return _run(denoise, z, logsnrs, weights, name="dpmpp_3m", callback=callback, cond=cond, process=process)
