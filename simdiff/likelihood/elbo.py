"""The continuous-time variational bound of Kingma et al. 2021 ("Variational Diffusion Models", VDM).

For the VP process ``z = alpha x + sigma eps`` between the log-SNRs ``lam_min`` (noise end) and ``lam_max`` (data
end), the negative ELBO of the continuous-time model (T -> infinity) is the sum of three terms (VDM sec. 3-4):

* prior: ``KL(q(z_min | x) || N(0, I))`` at ``lam_min`` (closed form, :func:`~simdiff.likelihood.common.prior_kl`);
* reconstruction: ``-E_{q(z_max | x)} log p(x | z_max)`` at ``lam_max``;
* diffusion: ``-1/2 E_{t, eps} SNR'(t) ||x - x_hat(z_t)||^2``, which with ``lam = log SNR`` as the integration
  variable is  ``1/2 int_{lam_min}^{lam_max} e^lam E_eps ||x - x_hat(z_lam, lam)||^2 dlam``
  ``= 1/2 int E_eps ||eps - eps_hat(z_lam, lam)||^2 dlam``  (VP: ``x - x_hat = (sigma / alpha)(eps_hat - eps)``).

The integral does not depend on the schedule between the endpoints (VDM's invariance result), so it is estimated by
importance sampling in log-SNR: ``lam ~ q(lam)`` and the integrand divided by ``q(lam)``. Proposals
(:class:`LogSNRProposal`): uniform in log-SNR, the training schedule's time (``t ~ U``, VDM's estimator, density
``1 / |dlam/dt|``), or a piecewise-constant density fitted on a pilot batch (:func:`fit_proposal`, bins weighted by
the root-mean-square of the integrand, the variance-minimising choice for a piecewise-constant density). The uniform
variable ``u`` behind each draw is iid, antithetic (``u, 1 - u``) or stratified (one ``u`` per stratum
``[i/n, (i+1)/n)``), a per-example form of VDM's low-discrepancy sampler.

Decoders: "discrete" for 8-bit data ``x = k / 127.5 - 1`` (256 values), ``p(x_i = x_k | z_i)`` proportional to
``q(z_i | x_k) = N(z_i; alpha x_k, sigma^2)`` normalised over the 256 values (the posterior of a uniform prior over
the values, as VDM's decoder; its exact normalisation in the VDM code is not verified here), giving a bound on
``-log P(k)`` directly (no dequantisation); "gaussian" for continuous data, ``p(x | z) = N(z / alpha,
sigma^2 / alpha^2)``, whose expectation is closed form (``D/2 (log 2 pi - lam_max + 1)``), giving a bound on
``-log p(x)`` (a density).

Exactness (used by the tests): for Gaussian data and the exact denoiser every term has a closed form at finite
endpoints, and as ``lam_min -> -inf``, ``lam_max -> +inf`` the "gaussian"-decoder bound tends to ``-log N(x)`` for
every ``x``: the ELBO is tight only in that limit. At finite endpoints its data average differs from the data
log-density by exactly ``KL(q(z_min) || N(0, I)) + E_{z_max} KL(q(x | z_max) || p(x | z_max))`` (the
continuous-time reverse process with the exact denoiser reproduces the forward path; only the two ends mismatch).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from simdiff.likelihood.common import (
    LikelihoodResult,
    check_isotropic,
    check_levels,
    discrete_decoder_nll,
    model_dtype,
    prior_kl,
)
from simdiff.process import alpha_sigma, expand

__all__ = ["LogSNRProposal", "elbo", "elbo_bpd", "fit_proposal", "diffusion_integrand", "SAMPLINGS", "DECODERS"]

SAMPLINGS = ("iid", "antithetic", "stratified")
DECODERS = ("discrete", "gaussian")


class LogSNRProposal:
    """A density ``q(lam)`` on ``[lam_min, lam_max]`` sampled by a monotone map of ``u in [0, 1)``.

    Either piecewise constant (``edges [K + 1]`` increasing, ``probs [K]`` summing to 1; :meth:`uniform`,
    :func:`fit_proposal`) or a schedule's time (:meth:`from_schedule`: ``t`` uniform on the times that span the
    range, ``lam = schedule.logsnr(t)``, ``q(lam) = 1 / ((t_hi - t_lo) |dlam/dt|)``).
    """

    def __init__(self, edges: Tensor, probs: Tensor, *, schedule: Any = None, name: str = "piecewise") -> None:
        self.edges = torch.as_tensor(edges, dtype=torch.float64)
        self.probs = torch.as_tensor(probs, dtype=torch.float64)
        if self.edges.dim() != 1 or self.probs.shape != (self.edges.numel() - 1,):
            raise ValueError(f"proposal needs edges [K+1] and probs [K], got {tuple(self.edges.shape)} and "
                             f"{tuple(self.probs.shape)}")
        if not bool((torch.diff(self.edges) > 0).all()) or not bool((self.probs > 0).all()):
            raise ValueError("proposal needs strictly increasing edges and positive probabilities")
        self.probs = self.probs / self.probs.sum()
        self.schedule, self.name = schedule, name

    @property
    def logsnr_min(self) -> float:
        return float(self.edges[0])

    @property
    def logsnr_max(self) -> float:
        return float(self.edges[-1])

    @classmethod
    def uniform(cls, logsnr_min: float, logsnr_max: float) -> LogSNRProposal:
        """Uniform in log-SNR on ``[logsnr_min, logsnr_max]``."""
        lo, hi = check_levels(logsnr_min, logsnr_max, "uniform proposal")
        return cls(torch.tensor([lo, hi]), torch.ones(1), name="uniform")

    @classmethod
    def from_schedule(cls, schedule: Any, logsnr_min: float | None = None,
                      logsnr_max: float | None = None) -> LogSNRProposal:
        """The schedule's time, uniform over the times whose log-SNR lies in the range (default: its whole range)."""
        lo = schedule.logsnr_min if logsnr_min is None else logsnr_min
        hi = schedule.logsnr_max if logsnr_max is None else logsnr_max
        lo, hi = check_levels(lo, hi, "schedule proposal")
        return cls(torch.tensor([lo, hi]), torch.ones(1), schedule=schedule, name="schedule")

    def sample(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``u`` (float64, in [0, 1)) -> ``(lam, log q(lam))``, both shaped like ``u``; increasing in ``u``."""
        u = u.double()
        if self.schedule is not None:
            lo, hi = torch.tensor([self.logsnr_min, self.logsnr_max], dtype=torch.float64)
            t_hi, t_lo = self.schedule.t_from_logsnr(lo), self.schedule.t_from_logsnr(hi)
            t = t_hi - u * (t_hi - t_lo)  # u = 0 -> lam_min, increasing lam with u
            lam = self.schedule.logsnr(t).clamp(self.logsnr_min, self.logsnr_max)
            return lam, -torch.log((t_hi - t_lo) * self.schedule.dlogsnr_dt(t).abs())
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(self.probs, 0)])
        cdf[-1] = 1.0
        k = (torch.searchsorted(cdf, u.reshape(-1).contiguous(), right=True) - 1).clamp(0, self.probs.numel() - 1)
        k = k.reshape(u.shape)
        width = self.edges[k + 1] - self.edges[k]
        frac = ((u - cdf[k]) / self.probs[k]).clamp(0, 1)
        return self.edges[k] + frac * width, torch.log(self.probs[k] / width)

    def log_density(self, lam: Tensor) -> Tensor:
        """``log q(lam)`` for levels inside the range (float64, shaped like ``lam``)."""
        lam = lam.double()
        if self.schedule is not None:
            lo, hi = torch.tensor([self.logsnr_min, self.logsnr_max], dtype=torch.float64)
            width = self.schedule.t_from_logsnr(lo) - self.schedule.t_from_logsnr(hi)
            t = self.schedule.t_from_logsnr(lam)
            return -torch.log(width * self.schedule.dlogsnr_dt(t).abs())
        k = (torch.searchsorted(self.edges, lam.reshape(-1).contiguous(), right=True) - 1)
        k = k.clamp(0, self.probs.numel() - 1).reshape(lam.shape)
        return torch.log(self.probs[k] / (self.edges[k + 1] - self.edges[k]))

    def __repr__(self) -> str:
        return f"LogSNRProposal({self.name}, [{self.logsnr_min:g}, {self.logsnr_max:g}], {self.probs.numel()} bins)"


def _repeat_cond(cond: dict | None, n: int) -> dict:
    return {k: v.repeat_interleave(n, 0) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in (cond or {}).items()}


def diffusion_integrand(model, x: Tensor, lam: Tensor, *, cond: dict | None = None,
                        generator: torch.Generator | None = None, max_batch: int = 256) -> Tensor:
    """``1/2 ||eps - eps_hat(z_lam, lam)||^2`` for each example and level (one noise draw each).

    Args:
        x: ``[B, ...]`` data. lam: ``[B, n]`` log-SNR levels per example. cond: ``[B, ...]`` conditioning keywords.
    Returns:
        ``[B, n]`` float64 (nats per unit log-SNR).
    """
    b, n = lam.shape
    mdt = model_dtype(model, x.dtype)
    rows_x = x.repeat_interleave(n, 0)
    rows_lam = lam.reshape(-1)
    rows_cond = _repeat_cond(cond, n)
    out = torch.empty(b * n, dtype=torch.float64)
    for i in range(0, b * n, max_batch):
        sl = slice(i, min(i + max_batch, b * n))
        xi = rows_x[sl].double()
        eps = torch.randn(xi.shape, generator=generator, dtype=torch.float64).to(x.device)
        li = rows_lam[sl].to(x.device)
        a, s = alpha_sigma(expand(li, xi))
        z = a * xi + s * eps
        ci = {k: v[sl] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in rows_cond.items()}
        with torch.no_grad():
            eps_hat = model(z.to(mdt), li.to(mdt), **ci).eps.double()
        out[sl] = 0.5 * (eps - eps_hat).reshape(eps.shape[0], -1).pow(2).sum(1).cpu()
    return out.reshape(b, n)


def _uniforms(b: int, n: int, sampling: str, generator: torch.Generator | None) -> Tensor:
    if sampling == "iid":
        return torch.rand(b, n, generator=generator, dtype=torch.float64)
    if sampling == "antithetic":
        u = torch.rand(b, n // 2, generator=generator, dtype=torch.float64)
        return torch.cat([u, 1 - u], 1).clamp(max=1 - 1e-16)
    jitter = torch.rand(b, n, generator=generator, dtype=torch.float64)
    return (torch.arange(n, dtype=torch.float64) + jitter) / n


def _mean_and_var(w: Tensor, sampling: str) -> tuple[Tensor, Tensor]:
    """Per-row mean of the weighted draws and the variance of that mean (``[B]`` each)."""
    n = w.shape[1]
    if sampling == "iid":
        return w.mean(1), w.var(1, unbiased=True) / n
    if sampling == "antithetic":
        pairs = 0.5 * (w[:, : n // 2] + w[:, n // 2:])
        return pairs.mean(1), pairs.var(1, unbiased=True) / pairs.shape[1]
    # stratified: collapse neighbouring strata in pairs (conservative: also counts their difference in means)
    d = w[:, 0::2] - w[:, 1::2]
    return w.mean(1), d.pow(2).sum(1) / n**2


def fit_proposal(model, x: Tensor, *, logsnr_min: float, logsnr_max: float, bins: int = 24, points: int = 2,
                 floor: float = 0.1, cond: dict | None = None, generator: torch.Generator | None = None,
                 max_batch: int = 256) -> LogSNRProposal:
    """Fit a piecewise-constant importance proposal on the pilot batch ``x`` ``[B, ...]``.

    The integrand is evaluated at ``points`` stratified levels per bin and example; bin ``j`` gets mass proportional
    to ``width_j * sqrt(mean f^2)`` (for a density constant on each bin, the one that minimises the estimator's
    variance), mixed with the uniform density: ``(1 - floor) * fitted + floor * uniform``, so no level is starved.
    Costs ``B * bins * points`` network evaluations.
    """
    lo, hi = check_levels(logsnr_min, logsnr_max, "fit_proposal")
    if bins < 1 or points < 1 or not 0 < floor <= 1:
        raise ValueError(f"fit_proposal: need bins >= 1, points >= 1 and 0 < floor <= 1, got {bins}, {points}, "
                         f"{floor}")
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    u = (torch.arange(bins * points, dtype=torch.float64) + torch.rand(x.shape[0], bins * points,
                                                                        generator=generator, dtype=torch.float64))
    lam = lo + u / (bins * points) * (hi - lo)
    f = diffusion_integrand(model, x, lam, cond=cond, generator=generator, max_batch=max_batch)
    rms = f.reshape(x.shape[0], bins, points).pow(2).mean((0, 2)).sqrt()
    width = torch.diff(edges)
    fitted = width * rms
    fitted = fitted / fitted.sum() if float(fitted.sum()) > 0 else width / width.sum()
    return LogSNRProposal(edges, (1 - floor) * fitted + floor * width / width.sum(), name="fitted")


def _reconstruction(x: Tensor, logsnr_max: float, decoder: str, bins: int,
                    generator: torch.Generator | None) -> Tensor:
    """``-E log p(x | z_max)`` per example (nats): one draw of ``z_max`` ("discrete"), closed form ("gaussian")."""
    d = x[0].numel()
    if decoder == "gaussian":
        return torch.full((x.shape[0],), 0.5 * d * (math.log(2 * math.pi) - logsnr_max + 1), dtype=torch.float64)
    lam = torch.tensor(float(logsnr_max), dtype=torch.float64)
    a, s = alpha_sigma(lam)
    xc = x.detach().cpu().double()
    z = a * xc + s * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    return discrete_decoder_nll(xc, z, logsnr=logsnr_max, bins=bins)


def elbo(model, x: Tensor, *, num_times: int = 32, sampling: str = "stratified",
         proposal: LogSNRProposal | str = "uniform", logsnr_min: float | None = None,
         logsnr_max: float | None = None, schedule: Any = None, decoder: str = "discrete", bins: int = 256,
         cond: dict | None = None, process: Any = None, generator: torch.Generator | None = None,
         max_batch: int = 256) -> LikelihoodResult:
    """The VDM negative ELBO of each example, in nats (see the module docstring).

    Args:
        model: a denoiser ``model(z, lam, **cond) -> DenoiserOutput`` (isotropic VP process).
        x: ``[B, ...]`` data in ``[-1, 1]`` (8-bit values ``k / 127.5 - 1`` for the "discrete" decoder).
        num_times: log-SNR draws per example for the diffusion term (even for "antithetic" and "stratified").
        sampling: "iid", "antithetic" or "stratified" uniforms behind the draws.
        proposal: a :class:`LogSNRProposal`, "uniform" (in log-SNR) or "schedule" (the schedule's time, VDM).
        logsnr_min, logsnr_max: the range (default: the proposal's, else the schedule's).
        schedule: the model's schedule (for the default range and the "schedule" proposal).
        decoder: "discrete" (8-bit data, ``bins`` values) or "gaussian" (continuous data).
        cond: conditioning keywords, tensors ``[B, ...]``. process: ``None`` or the isotropic process.
    Returns:
        :class:`~simdiff.likelihood.common.LikelihoodResult` with terms ``prior``, ``reconstruction``,
        ``diffusion``; ``mc_se`` is the standard error of the diffusion term's estimate (the reconstruction's single
        draw is not counted: at the usual ``lam_max`` its spread is negligible).
    """
    check_isotropic(process, "elbo")
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; valid: {', '.join(SAMPLINGS)}")
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; valid: {', '.join(DECODERS)}")
    if num_times < 2 or (sampling != "iid" and num_times % 2):
        raise ValueError(f"num_times must be >= 2 (and even for {sampling!r} sampling), got {num_times}")
    if isinstance(proposal, LogSNRProposal):
        lo = proposal.logsnr_min if logsnr_min is None else logsnr_min
        hi = proposal.logsnr_max if logsnr_max is None else logsnr_max
        if (lo, hi) != (proposal.logsnr_min, proposal.logsnr_max):
            raise ValueError(f"the proposal covers [{proposal.logsnr_min:g}, {proposal.logsnr_max:g}], not the "
                             f"requested range [{lo:g}, {hi:g}]")
    else:
        if logsnr_min is None or logsnr_max is None:
            if schedule is None:
                raise ValueError("elbo needs logsnr_min and logsnr_max, or the model's schedule")
            logsnr_min = schedule.logsnr_min if logsnr_min is None else logsnr_min
            logsnr_max = schedule.logsnr_max if logsnr_max is None else logsnr_max
        if proposal == "uniform":
            proposal = LogSNRProposal.uniform(logsnr_min, logsnr_max)
        elif proposal == "schedule":
            if schedule is None:
                raise ValueError("proposal 'schedule' needs the model's schedule")
            proposal = LogSNRProposal.from_schedule(schedule, logsnr_min, logsnr_max)
        else:
            raise ValueError(f"unknown proposal {proposal!r}; valid: uniform, schedule, or a LogSNRProposal")
    lo, hi = check_levels(proposal.logsnr_min, proposal.logsnr_max, "elbo")
    b = x.shape[0]
    u = _uniforms(b, num_times, sampling, generator)
    lam, log_q = proposal.sample(u)
    f = diffusion_integrand(model, x, lam, cond=cond, generator=generator, max_batch=max_batch)
    diffusion, var = _mean_and_var(f * torch.exp(-log_q), sampling)
    prior = prior_kl(x.detach().cpu(), lo)
    recon = _reconstruction(x, hi, decoder, bins, generator)
    info = {"num_times": num_times, "sampling": sampling, "proposal": repr(proposal), "decoder": decoder,
            "logsnr_min": lo, "logsnr_max": hi, "network_calls": b * num_times}
    return LikelihoodResult(nll=prior + recon + diffusion, mc_se=var.sqrt(),
                            terms={"prior": prior, "reconstruction": recon, "diffusion": diffusion},
                            dims=x[0].numel(), method="elbo", info=info)


def elbo_bpd(model, x: Tensor, **kwargs: Any) -> LikelihoodResult:
    """:func:`elbo` with the "discrete" decoder (the default): read ``.bpd`` (``[B]``) or ``.summary()``."""
    kwargs.setdefault("decoder", "discrete")
    return elbo(model, x, **kwargs)
