"""Tuned step grids: the grid itself as a fitted choice (what it buys at 4-10 steps is in the tests/benchmarks).

* :func:`optimize_grid` - gradient descent on the interior log-SNRs through the (differentiable) sampler, to
  minimise the final error against a reference PF-ODE solution on a calibration batch. The interior points are
  ``cumsum(softmax(theta))`` of the normalised range (in log-SNR or in t), so they stay increasing and inside
  the schedule's range for every theta. Same idea as learned/optimised solver schedules (e.g. Watson et al. 2021,
  "Learning fast samplers"; Sabour et al. 2024, "Align your steps"), with a plain regression loss.
* :func:`error_balanced_grid` - cheap, no gradients: one fine pilot DDIM run measures
  ``f(lambda) = rms ||d^p x_hat / dlambda^p||`` along the trajectory; for an order-p exponential integrator the
  global error is ~ ``int h(lambda)^p f dlambda``, minimised at fixed step count by the density
  ``1/h ~ f^(1/(p+1))`` (the classical error-equidistributing mesh, de Boor 1973). Isotropic process only (the
  measurement uses ``lambda = logsnr / 2``).
* :func:`fit_grids` - robust tuned grids for a list of step counts: many starting grids (fixed kinds, the
  default policy with several ends, refinements of the smaller counts' choices), the best few fitted (restarts),
  selection on a validation batch; the refinements keep the error (nearly always) monotone in the number of calls.

:func:`optimize_grid` passes ``process`` on to the sampler, which refuses a process it has no form for.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from simdiff.processes import GaussianProcess
from simdiff.samplers._common import require_isotropic
from simdiff.samplers.grids import make_grid

__all__ = ["optimize_grid", "error_balanced_grid", "fit_grids", "SAMPLER_ORDER"]

SAMPLER_ORDER = {"ddim": 1, "euler": 1, "heun": 2, "dpmpp_2m": 2, "dpmpp_3m": 3, "unipc": 3}
_SPACES = ("logsnr", "t")


def _deterministic(name: str) -> Callable:
    from simdiff.samplers import STOCHASTIC, get_sampler  # late import: the package imports this module

    fn = get_sampler(name)
    if name in STOCHASTIC:
        raise ValueError(f"grid tuning needs a deterministic sampler; {name!r} is stochastic")
    return fn


def _to_unit(schedule, logsnr: Tensor, space: str) -> Tensor:
    lo, hi = float(schedule.logsnr_min), float(schedule.logsnr_max)
    if space == "logsnr":
        return (logsnr - lo) / (hi - lo)
    return 1 - schedule.t_from_logsnr(logsnr)


def _from_unit(schedule, u: Tensor, space: str) -> Tensor:
    lo, hi = float(schedule.logsnr_min), float(schedule.logsnr_max)
    if space == "logsnr":
        return lo + (hi - lo) * u
    return schedule.logsnr(1 - u).to(torch.float64)


def _assemble(schedule, interior: Tensor) -> Tensor:
    lo = torch.tensor([float(schedule.logsnr_min)], dtype=torch.float64)
    return torch.cat([lo, interior, torch.tensor([float("inf")], dtype=torch.float64)])


def optimize_grid(
    denoise: Callable,
    sampler_name: str,
    schedule,
    steps: int,
    *,
    z: Tensor,
    reference: Tensor,
    iters: int = 150,
    lr: float = 0.05,
    init: str = "uniform_t",
    init_grid: Tensor | None = None,
    space: str = "logsnr",
    cond: dict | None = None,
    sampler_kwargs: dict | None = None,
    val_z: Tensor | None = None,
    val_reference: Tensor | None = None,
    eval_every: int = 10,
    process: GaussianProcess | None = None,
) -> Tensor:
    """Fit the ``steps - 1`` interior points of a grid to minimise ``mean (sample(z) - reference)^2``.

    Args:
        denoise: denoiser callable; must be differentiable in ``logsnr`` (the toy and nets are).
        sampler_name: a deterministic sampler from ``SAMPLERS`` ("ddim", "euler", "heun", "dpmpp_2m", ...).
        schedule: gives the range ``[logsnr_min, logsnr_max]`` (and ``logsnr(t)`` for ``space="t"``).
        steps: sampler steps; the grid is ``[logsnr_min, interior..., +inf]`` as :func:`make_grid`.
        z: ``[B, ...]`` calibration noise; reference: ``[B, ...]`` target samples (e.g. :func:`solve_reference`
            at ``logsnr_end = schedule.logsnr_max``).
        iters, lr: Adam iterations and learning rate on the softmax logits of the increments.
        init: a :data:`GRID_KINDS` name for the starting grid (default "uniform_t": on the toy it led to 2-10x
            lower held-out error than starting from "uniform_logsnr", a worse local optimum); space: "logsnr" or
            "t" (where the increments live).
        val_z, val_reference: optional held-out validation noise / reference (same shapes as each other). Given,
            the returned grid is the one with the lowest *validation* loss among the init and every
            ``eval_every``-th iterate (early stopping; on the toy, tuning longer on a small batch overfits it).
        init_grid: a starting grid ``[steps + 1]`` (as :func:`make_grid` lays it out) instead of ``init``.
        process: passed to the sampler (``None``: isotropic); the grid's range is the schedule's either way.

    Returns:
        float64 ``[steps + 1]`` grid with the lowest calibration loss seen, or the lowest validation loss when
        ``val_z`` is given (either way, evaluate it on a third, held-out batch).
    """
    sampler = _deterministic(sampler_name)
    if space not in _SPACES:
        raise ValueError(f"optimize_grid: unknown space {space!r}; valid: {', '.join(_SPACES)}")
    if z.shape != reference.shape:
        raise ValueError(f"optimize_grid: z {tuple(z.shape)} and reference {tuple(reference.shape)} differ in shape")
    if (val_z is None) != (val_reference is None):
        raise ValueError("optimize_grid: give both val_z and val_reference, or neither")
    if val_z is not None and val_z.shape != val_reference.shape:
        raise ValueError(f"optimize_grid: val_z {tuple(val_z.shape)} and val_reference {tuple(val_reference.shape)} "
                         "differ in shape")
    if eval_every < 1:
        raise ValueError(f"optimize_grid: eval_every must be >= 1, got {eval_every}")
    grid0 = make_grid(schedule, steps, kind=init) if init_grid is None else init_grid.detach().to(torch.float64)
    if grid0.shape != (steps + 1,):
        raise ValueError(f"optimize_grid: init_grid must have {steps + 1} points, got {tuple(grid0.shape)}")
    if steps < 2:
        return grid0
    kwargs = dict(sampler_kwargs or {})
    if process is not None:
        kwargs["process"] = process
    u0 = _to_unit(schedule, grid0[1:-1], space).clamp(0, 1)
    incr = torch.diff(torch.cat([u0.new_zeros(1), u0, u0.new_ones(1)])).clamp_min(1e-4)
    theta = incr.log().clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    target = reference.detach().to(z.dtype)

    def build(th: Tensor) -> Tensor:
        u = torch.cumsum(torch.softmax(th, 0), 0)[:-1]
        return _assemble(schedule, _from_unit(schedule, u, space))

    val_target = None if val_reference is None else val_reference.detach().to(val_z.dtype)

    def val_loss(th: Tensor) -> float:
        with torch.no_grad():
            value = float((sampler(denoise, val_z, build(th), cond=cond, **kwargs) - val_target).pow(2).mean())
        return value if math.isfinite(value) else float("inf")

    best, best_loss = theta.detach().clone(), float("inf")
    for it in range(iters + 1):
        opt.zero_grad()
        if val_z is not None and (it % eval_every == 0 or it == iters):
            value = val_loss(theta)
            if value < best_loss:
                best, best_loss = theta.detach().clone(), value
        if it == iters:
            break
        out = sampler(denoise, z, build(theta), cond=cond, **kwargs)
        loss = (out - target).pow(2).mean()
        value = float(loss.detach())
        if val_z is None and value < best_loss:
            best, best_loss = theta.detach().clone(), value
        if not torch.isfinite(loss):
            break
        loss.backward()
        opt.step()
    with torch.no_grad():
        return build(best).detach()


def error_balanced_grid(
    denoise: Callable,
    schedule,
    steps: int,
    *,
    z: Tensor,
    order: int,
    pilot_steps: int = 256,
    cond: dict | None = None,
    process: GaussianProcess | None = None,
) -> Tensor:
    """Grid whose points equidistribute ``f(lambda)^(1/(order+1))`` measured on one pilot DDIM run (see module doc).

    ``order``: the solver's order (:data:`SAMPLER_ORDER`). Costs ``pilot_steps`` network calls on ``z``.
    Returns a float64 ``[steps + 1]`` grid ``[logsnr_min, interior..., +inf]``.
    """
    from simdiff.samplers.first_order import sample_ddim

    require_isotropic(process, "error_balanced_grid")
    if order < 1 or pilot_steps < order + 2:
        raise ValueError(f"error_balanced_grid: need order >= 1 and pilot_steps >= order + 2, got {order}, "
                         f"{pilot_steps}")
    lo, hi = float(schedule.logsnr_min), float(schedule.logsnr_max)
    pilot = torch.linspace(lo, hi, pilot_steps + 1, dtype=torch.float64)
    xs: list[Tensor] = []
    with torch.no_grad():
        sample_ddim(denoise, z, pilot, callback=lambda d: xs.append(d["x"].to(torch.float64)), cond=cond)
    h = 0.5 * (hi - lo) / pilot_steps  # step in lambda = logsnr / 2
    deriv = torch.diff(torch.stack(xs), n=order, dim=0) / h**order  # [P - order, B, ...]
    f = deriv.pow(2).flatten(1).mean(1).sqrt()
    dens = (f + 1e-12 * f.max()) ** (1.0 / (order + 1))
    centers = pilot[: dens.shape[0]] + 0.5 * order * (pilot[1] - pilot[0])
    knots = torch.cat([pilot[:1], centers, pilot[-1:]])
    dens = torch.cat([dens[:1], dens, dens[-1:]])
    cum = torch.cat([dens.new_zeros(1), torch.cumsum(0.5 * (dens[1:] + dens[:-1]) * torch.diff(knots), 0)])
    levels = cum[-1] * torch.arange(1, steps, dtype=torch.float64) / steps
    idx = torch.searchsorted(cum, levels).clamp(1, cum.shape[0] - 1)
    w = (levels - cum[idx - 1]) / (cum[idx] - cum[idx - 1])
    interior = knots[idx - 1] + w * (knots[idx] - knots[idx - 1])
    return _assemble(schedule, interior)


def _insert_point(grid: Tensor, i: int | None = None) -> Tensor:
    """A grid with one more step: finite interval ``i`` (default: the widest, in log-SNR) split at its midpoint."""
    lam = grid[:-1]
    if i is None:
        i = int(torch.argmax(torch.diff(lam)))
    return torch.cat([lam[: i + 1], 0.5 * (lam[i : i + 1] + lam[i + 1 : i + 2]), lam[i + 1 :], grid[-1:]])


def _policy_family(schedule, steps: int, ends: tuple[float, ...]) -> list[Tensor]:
    """The "auto" grid's logistic levels with other ends (inside the schedule's range)."""
    from simdiff.samplers.policy import logistic_levels

    lo, hi = float(schedule.logsnr_min), float(schedule.logsnr_max)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    return [torch.cat([logistic_levels(lo, min(e, hi), steps), inf]) for e in ends if min(e, hi) > lo]


def fit_grids(
    denoise: Callable,
    sampler_name: str,
    schedule,
    steps_list: list[int],
    *,
    z: Tensor,
    reference: Tensor,
    val_z: Tensor,
    val_reference: Tensor,
    inits: tuple[str, ...] = ("auto", "uniform_t", "quadratic_t"),
    ends: tuple[float, ...] = (3.0, 5.0, 7.0, 10.0),
    restarts: int = 3,
    iters: int = 60,
    lr: float = 0.05,
    cond: dict | None = None,
    sampler_kwargs: dict | None = None,
) -> dict[int, tuple[Tensor, float]]:
    """Robust tuned grids for several step counts: many starting grids, several fits, validation selection.

    For each ``steps`` (in increasing order) the starting candidates are the fixed grid kinds ``inits``, the
    "auto" grid's logistic levels ending at each of ``ends``, and the chosen grid of every smaller step count
    refined to ``steps`` (the previous count's with each of its intervals split in turn, older ones by splitting
    their widest intervals). All are scored on the validation batch; the best
    ``restarts`` of them are each fitted by :func:`optimize_grid` (Adam on the calibration batch ``z``,
    early-stopped on the validation batch), and the candidate (fitted or not) with the lowest validation RMSE is
    kept. Monotonicity in calls comes from the refined candidates (a refinement of an earlier choice is usually no
    worse than it); it is measured, not forced: the returned errors are the true validation RMSEs (optimistic for
    the chosen grid, which was selected on them: report on a third batch).

    Returns:
        ``{steps: (grid [steps + 1], validation RMSE)}``.
    """
    sampler = _deterministic(sampler_name)
    kwargs = dict(sampler_kwargs or {})
    if restarts < 1:
        raise ValueError(f"fit_grids: restarts must be >= 1, got {restarts}")

    def val_rmse(grid: Tensor) -> float:
        with torch.no_grad():
            pred = sampler(denoise, val_z, grid, cond=cond, **kwargs)
        value = float((pred - val_reference.to(pred.dtype)).pow(2).mean().sqrt())
        return value if math.isfinite(value) else float("inf")

    out: dict[int, tuple[Tensor, float]] = {}
    for steps in sorted(set(steps_list)):
        cands = [make_grid(schedule, steps, kind=k) for k in inits]
        if steps >= 2:
            cands += _policy_family(schedule, steps, ends)
        for chosen, _ in out.values():
            if chosen.shape[0] == steps and chosen.shape[0] >= 3:  # one step fewer: every single split
                cands += [_insert_point(chosen, i) for i in range(chosen.shape[0] - 2)]
                continue
            split = chosen
            while split.shape[0] < steps + 1:
                split = _insert_point(split)
            cands.append(split)
        errs = [val_rmse(g) for g in cands]
        if steps >= 2:
            for i in sorted(range(len(cands)), key=lambda j: errs[j])[:restarts]:
                fitted = optimize_grid(denoise, sampler_name, schedule, steps, z=z, reference=reference, iters=iters,
                                       lr=lr, init_grid=cands[i], cond=cond, sampler_kwargs=sampler_kwargs,
                                       val_z=val_z, val_reference=val_reference)
                cands.append(fitted)
                errs.append(val_rmse(fitted))
        best = min(range(len(cands)), key=lambda i: errs[i])
        out[steps] = (cands[best], errs[best])
    return out
