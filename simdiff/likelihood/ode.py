"""Exact log-likelihood of the probability-flow ODE (Song et al. 2021, "Score-based generative modeling through
stochastic differential equations", sec. 4.3 and App. D.2) with Hutchinson's trace estimator.

For the VP process in log-SNR ``lam`` (``alpha^2 = sigmoid(lam)``) the PF-ODE with the denoiser ``x_hat`` is

    dz/dlam = f(z, lam) = 1/2 alpha (x_hat(z, lam) - alpha z),
    div f   = 1/2 alpha (tr(d x_hat / d z) - alpha D),

(the same ODE as :func:`simdiff.samplers.solve_reference`, there in ``lam / 2``). Along a solution
``d log p_lam(z_lam) / dlam = -div f`` (instantaneous change of variables, Chen et al. 2018), so integrating the
augmented state ``(z, delta)`` with ``d delta / dlam = div f`` from the data end ``lam_max`` (``z = x``) down to
``lam_min`` gives

    log p(x) = log N(z(lam_min); 0, I) + delta(lam_min).

``p`` is the model's density of ``z`` at ``lam_max``: the push-forward of ``N(0, I)`` at ``lam_min`` through the
ODE. The trace is either exact (``D`` vector-Jacobian products; small ``D`` only) or Hutchinson's estimate
``v^T (d x_hat / dz) v`` with Rademacher probes ``v`` held fixed along the trajectory (one vector-Jacobian product
per probe and evaluation; Grathwohl et al. 2019, FFJORD). The trajectory does not depend on the probes, so several
probes share one solve and their spread gives the Monte-Carlo error of the divergence integral.

Dequantisation of 8-bit data (``x = k / 127.5 - 1``, bins of width ``2/255``), each a lower bound on ``log P(k)``:
"uniform" (Song et al. 2021 use it for their bits/dim): ``x + u``, ``u ~ U(-1/255, 1/255)^D``, plus ``D log(2/255)``;
"gaussian": the forward process as the dequantiser, ``z = alpha x + sigma eps`` at ``lam_max`` with the discrete
decoder ``p(x | z)`` (:func:`~simdiff.likelihood.common.discrete_decoder_nll`):
``log P(k) >= E[log p(z) + log p(x | z) - log q(z | x)]``; "none": continuous data, ``log p(x)`` itself.

Solvers: fixed-step "euler", "heun", "rk4" (uniform in log-SNR), or "adaptive" (scipy's RK45 on the augmented
state, ``rtol`` / ``atol``, as Song et al. 2021). The state and the accumulated divergence are kept in ``dtype``
(float64 by default); the network runs in its own dtype, and only the vector-Jacobian products take gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from simdiff.likelihood.common import (
    LikelihoodResult,
    bin_width,
    check_isotropic,
    check_levels,
    data_bins,
    discrete_decoder_nll,
    model_dtype,
    standard_normal_log_prob,
)

__all__ = ["ode_likelihood", "ode_bpd", "SOLVERS", "DEQUANTIZATIONS", "TRACES"]

SOLVERS = ("euler", "heun", "rk4", "adaptive")
DEQUANTIZATIONS = ("uniform", "gaussian", "none")
TRACES = ("hutchinson", "exact")
_TABLEAU = {  # (stage offsets c, stage weights b) of explicit methods whose stage i uses only stage i - 1
    "euler": ((0.0,), (1.0,)),
    "heun": ((0.0, 1.0), (0.5, 0.5)),
    "rk4": ((0.0, 0.5, 0.5, 1.0), (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
}


def _field(model, cond: dict, probes: Tensor | None, dtype: torch.dtype, mdt: torch.dtype
           ) -> Callable[[Tensor, float], tuple[Tensor, Tensor]]:
    """``(z [B, ...], lam) -> (f [B, ...], div f [B, P])`` (P probes; exact trace when ``probes`` is None)."""

    def evaluate(z: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        b, d = z.shape[0], z[0].numel()
        lam_t = torch.tensor(lam, dtype=torch.float64)
        a = torch.sigmoid(lam_t).sqrt()
        with torch.enable_grad():
            zi = z.detach().to(mdt).requires_grad_(True)
            x_hat = model(zi, torch.full((b,), lam, dtype=mdt, device=z.device), **cond).x
            if probes is None:
                tr = torch.zeros(b, dtype=dtype, device=z.device)
                flat = x_hat.reshape(b, d)
                for j in range(d):
                    (g,) = torch.autograd.grad(flat[:, j].sum(), zi, retain_graph=j < d - 1)
                    tr += g.reshape(b, d)[:, j].to(dtype)
                tr = tr[:, None]
            else:
                tr = torch.empty(b, probes.shape[0], dtype=dtype, device=z.device)
                for p in range(probes.shape[0]):
                    (g,) = torch.autograd.grad(x_hat, zi, probes[p].to(mdt), retain_graph=p < probes.shape[0] - 1)
                    tr[:, p] = (g.to(dtype) * probes[p]).reshape(b, d).sum(1)
        f = 0.5 * a.to(dtype) * (x_hat.detach().to(dtype) - a.to(dtype) * z)
        return f, 0.5 * a.to(dtype) * (tr - a.to(dtype) * d)

    return evaluate


def _fixed_step(field, z: Tensor, lams: np.ndarray, solver: str) -> tuple[Tensor, Tensor, int]:
    c, w = _TABLEAU[solver]
    delta, calls = None, 0
    for i in range(len(lams) - 1):
        h = float(lams[i + 1] - lams[i])
        df_sum, dd_sum, k = 0.0, 0.0, None
        for ci, wi in zip(c, w):
            zi = z if k is None else z + (ci * h) * k
            k, div = field(zi, float(lams[i]) + ci * h)
            calls += 1
            df_sum = df_sum + wi * k
            dd_sum = dd_sum + wi * div
        z = z + h * df_sum
        delta = h * dd_sum if delta is None else delta + h * dd_sum
    return z, delta, calls


def _adaptive(field, z: Tensor, lo: float, hi: float, rtol: float, atol: float, n_probe: int
              ) -> tuple[Tensor, Tensor, int]:
    from scipy.integrate import solve_ivp

    shape, n = z.shape, z.numel()
    calls = [0]

    def rhs(lam: float, y: np.ndarray) -> np.ndarray:
        zt = torch.from_numpy(y[:n].copy()).view(shape).to(device=z.device, dtype=z.dtype)
        f, div = field(zt, float(lam))
        calls[0] += 1
        return np.concatenate([f.double().reshape(-1).cpu().numpy(), div.double().reshape(-1).cpu().numpy()])

    y0 = np.concatenate([z.double().reshape(-1).cpu().numpy(), np.zeros(shape[0] * n_probe)])
    sol = solve_ivp(rhs, (hi, lo), y0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"ode_likelihood: RK45 failed: {sol.message}")
    y = torch.from_numpy(sol.y[:, -1].copy())
    return (y[:n].view(shape).to(device=z.device, dtype=z.dtype), y[n:].view(shape[0], n_probe).to(z.dtype),
            calls[0])


def ode_likelihood(model, x: Tensor, *, probes: int = 4, trace: str = "hutchinson", solver: str = "rk4",
                   steps: int = 24, rtol: float = 1e-5, atol: float = 1e-5, logsnr_min: float | None = None,
                   logsnr_max: float | None = None, schedule: Any = None, dequantization: str = "uniform",
                   bins: int = 256, cond: dict | None = None, process: Any = None, dtype: torch.dtype = torch.float64,
                   generator: torch.Generator | None = None, max_batch: int = 64) -> LikelihoodResult:
    """Negative log-likelihood of each example under the probability-flow ODE, in nats (see the module docstring).

    Args:
        model: a denoiser ``model(z, lam, **cond) -> DenoiserOutput`` (isotropic VP process).
        x: ``[B, ...]`` data in ``[-1, 1]`` (8-bit values ``k / 127.5 - 1`` unless ``dequantization="none"``).
        probes: Rademacher probes per example (Hutchinson); their spread is ``mc_se``.
        trace: "hutchinson" or "exact" (``D`` vector-Jacobian products per evaluation; ``mc_se`` is 0).
        solver: "euler", "heun", "rk4" (``steps`` uniform steps in log-SNR) or "adaptive" (RK45, ``rtol``/``atol``).
        logsnr_min, logsnr_max: the ODE's range (default: the schedule's).
        dequantization: "uniform", "gaussian" or "none".
        cond: conditioning keywords, tensors ``[B, ...]``. dtype: of the state and the divergence (float64).
        max_batch: examples solved together.
    Returns:
        :class:`~simdiff.likelihood.common.LikelihoodResult` with terms ``prior`` (``-log N(z_min)``),
        ``divergence`` (``-delta``) and ``dequantization`` (the dequantiser's terms; 0 for "none").
    """
    check_isotropic(process, "ode_likelihood")
    for name, value, valid in (("solver", solver, SOLVERS), ("dequantization", dequantization, DEQUANTIZATIONS),
                               ("trace", trace, TRACES)):
        if value not in valid:
            raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    if trace == "hutchinson" and probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    if solver != "adaptive" and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if logsnr_min is None or logsnr_max is None:
        if schedule is None:
            raise ValueError("ode_likelihood needs logsnr_min and logsnr_max, or the model's schedule")
        logsnr_min = schedule.logsnr_min if logsnr_min is None else logsnr_min
        logsnr_max = schedule.logsnr_max if logsnr_max is None else logsnr_max
    lo, hi = check_levels(logsnr_min, logsnr_max, "ode_likelihood")
    b, d = x.shape[0], x[0].numel()
    mdt = model_dtype(model, dtype)
    xd = x.to(dtype)
    deq = torch.zeros(b, dtype=torch.float64)
    if dequantization == "uniform":
        data_bins(x, bins)
        width = bin_width(bins)
        u = torch.rand(x.shape, generator=generator, dtype=torch.float64) - 0.5
        xd = xd + u.to(device=x.device, dtype=dtype) * width
        deq = torch.full((b,), -d * math.log(width), dtype=torch.float64)
    elif dequantization == "gaussian":
        data_bins(x, bins)
        lam = torch.tensor(hi, dtype=torch.float64)
        a, s = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        eps = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        z = a * x.detach().cpu().double() + s * eps
        log_q = -0.5 * eps.reshape(b, -1).pow(2).sum(1) - 0.5 * d * (math.log(2 * math.pi) + 2 * math.log(float(s)))
        deq = discrete_decoder_nll(x.detach().cpu(), z, logsnr=hi, bins=bins) + log_q
        xd = z.to(device=x.device, dtype=dtype)
    n_probe = probes if trace == "hutchinson" else 1
    all_probes = (torch.randint(0, 2, (n_probe, b) + tuple(x.shape[1:]), generator=generator, dtype=torch.float64)
                  * 2 - 1).to(device=x.device, dtype=dtype)
    prior = torch.empty(b, dtype=torch.float64)
    div = torch.empty(b, n_probe, dtype=torch.float64)
    calls = 0
    lams = np.linspace(hi, lo, steps + 1)
    for i in range(0, b, max_batch):
        sl = slice(i, min(i + max_batch, b))
        ci = {k: v[sl] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in (cond or {}).items()}
        field = _field(model, ci, all_probes[:, sl] if trace == "hutchinson" else None, dtype, mdt)
        if solver == "adaptive":
            z_end, delta, n = _adaptive(field, xd[sl], lo, hi, rtol, atol, n_probe)
        else:
            z_end, delta, n = _fixed_step(field, xd[sl], lams, solver)
        prior[sl] = -standard_normal_log_prob(z_end).cpu()
        div[sl] = -delta.double().cpu()
        calls += n * (sl.stop - sl.start)
    divergence = div.mean(1)
    mc_se = div.std(1, unbiased=True) / math.sqrt(n_probe) if n_probe > 1 else torch.zeros(b, dtype=torch.float64)
    if trace == "hutchinson" and n_probe == 1:
        mc_se = torch.full((b,), float("nan"), dtype=torch.float64)
    info = {"probes": n_probe, "trace": trace, "solver": solver, "steps": None if solver == "adaptive" else steps,
            "dequantization": dequantization, "logsnr_min": lo, "logsnr_max": hi, "network_calls": calls,
            "vjps_per_call": n_probe if trace == "hutchinson" else d, "dtype": str(dtype).replace("torch.", "")}
    return LikelihoodResult(nll=prior + divergence + deq, mc_se=mc_se,
                            terms={"prior": prior, "divergence": divergence, "dequantization": deq},
                            dims=d, method="ode", info=info)


def ode_bpd(model, x: Tensor, **kwargs: Any) -> LikelihoodResult:
    """:func:`ode_likelihood` with uniform dequantisation (the default): read ``.bpd`` (``[B]``) or ``.summary()``."""
    kwargs.setdefault("dequantization", "uniform")
    return ode_likelihood(model, x, **kwargs)
