"""Likelihoods against closed forms (float64): the VDM ELBO and the probability-flow ODE likelihood on a Gaussian
and on Gaussian mixtures with their exact denoisers, the variance reduction of the ELBO estimator, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from simdiff.likelihood import LogSNRProposal, elbo, fit_proposal, mixture_log_prob, ode_likelihood
from simdiff.toy import GaussianMixture

F64 = torch.float64
MU = torch.tensor([[0.3, -0.5, 0.1]], dtype=F64)
VAR = torch.tensor([[0.04, 0.25, 1.0]], dtype=F64)


def _sigmoid(lam: float) -> float:
    return 1.0 / (1.0 + math.exp(-lam))


def _gaussian_elbo_nll(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Closed-form negative ELBO ("gaussian" decoder) of N(MU, VAR) data with the exact denoiser.

    Per dimension, with r = SNR and d = x - mu: the diffusion term 1/2 int (d^2 + r s^4) / (1 + r s^2)^2 dr equals
    1/2 [-d^2 / (s^2 (1 + r s^2)) + log(1 + r s^2) + 1 / (1 + r s^2)] between exp(lo) and exp(hi)."""
    d2, s2 = (x - MU) ** 2, VAR

    def antiderivative(r: float) -> torch.Tensor:
        return 0.5 * (-d2 / (s2 * (1 + r * s2)) + torch.log(1 + r * s2) + 1 / (1 + r * s2))

    diffusion = antiderivative(math.exp(hi)) - antiderivative(math.exp(lo))
    prior = 0.5 * (_sigmoid(lo) * (x**2 - 1) + math.log1p(math.exp(lo)))
    recon = 0.5 * (math.log(2 * math.pi) - hi + 1)
    return (diffusion + prior + recon).sum(1)


def _gaussian_ode_nll(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Closed-form -log p(x) of the PF-ODE model: the exact flow is affine per dimension, z_lam = m + sd * xi."""

    def moments(lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        a2 = _sigmoid(lam)
        return math.sqrt(a2) * MU, (a2 * VAR + 1 - a2).sqrt()

    (m_lo, s_lo), (m_hi, s_hi) = moments(lo), moments(hi)
    z_lo = m_lo + s_lo / s_hi * (x - m_hi)
    return -(-0.5 * z_lo**2 - 0.5 * math.log(2 * math.pi) + torch.log(s_lo / s_hi)).sum(1)


def _gaussian_nll(x: torch.Tensor) -> torch.Tensor:
    return -(-0.5 * (x - MU) ** 2 / VAR - 0.5 * torch.log(2 * math.pi * VAR)).sum(1)


def test_gaussian_ode_likelihood_is_exact_in_closed_form() -> None:
    gm = GaussianMixture(MU, VAR)
    x, _ = gm.sample(8, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    r = ode_likelihood(gm, x, probes=3, steps=40, logsnr_min=-10, logsnr_max=10, dequantization="none", generator=g)
    # the Jacobian of the exact Gaussian denoiser is diagonal: Rademacher probes give the trace exactly
    assert float(r.mc_se.abs().max()) < 1e-12
    err40 = float((r.nll - _gaussian_ode_nll(x, -10, 10)).abs().max())
    r80 = ode_likelihood(gm, x, probes=1, steps=80, logsnr_min=-10, logsnr_max=10, dequantization="none")
    err80 = float((r80.nll - _gaussian_ode_nll(x, -10, 10)).abs().max())
    assert err40 < 1e-4 and err80 < err40 / 10  # RK4: fourth order (measured 3e-5, ratio ~16)
    # over a wide range the model density is the data density
    wide = ode_likelihood(gm, x, probes=1, solver="adaptive", rtol=1e-9, atol=1e-9, logsnr_min=-30, logsnr_max=30,
                          dequantization="none", generator=g)
    assert torch.allclose(wide.nll, _gaussian_nll(x), atol=1e-5, rtol=0)


def test_gaussian_elbo_matches_its_closed_form_and_the_gap_is_only_the_ends() -> None:
    gm = GaussianMixture(MU, VAR)
    lo, hi = -8.0, 8.0
    x, _ = gm.sample(400, generator=torch.Generator().manual_seed(2))
    r = elbo(gm, x, num_times=256, logsnr_min=lo, logsnr_max=hi, decoder="gaussian",
             generator=torch.Generator().manual_seed(3), max_batch=1 << 16)
    err = r.nll - _gaussian_elbo_nll(x, lo, hi)
    se = float(r.mc_se.pow(2).sum().sqrt()) / x.shape[0]
    assert abs(float(err.mean())) < 4 * se and se < 0.05
    # closed form: the data-averaged gap E[-ELBO] - E[-log q(x)] is KL(q(z_min) || N(0, I)) + E KL(q(x|z_max) ||
    # p(x|z_max)): with the exact denoiser the continuous-time reverse process reproduces the forward path
    a2_lo, a2_hi = _sigmoid(lo), _sigmoid(hi)
    # linear in d^2 and x^2: the two points mu +- s have the data's first two moments
    mean_nll = 0.5 * (_gaussian_elbo_nll(MU + VAR.sqrt(), lo, hi) + _gaussian_elbo_nll(MU - VAR.sqrt(), lo, hi))
    entropy = 0.5 * torch.log(2 * math.pi * math.e * VAR).sum()
    v = a2_lo * VAR + 1 - a2_lo
    kl_prior = 0.5 * (a2_lo * MU**2 + v - 1 - torch.log(v)).sum()
    a, s2 = math.sqrt(a2_hi), 1 - a2_hi
    tot = a2_hi * VAR + s2
    tau2, rho2 = VAR * s2 / tot, s2 / a2_hi
    gain = a * VAR / tot
    kl_dec = (0.5 * torch.log(rho2 / tau2) + (tau2 + (gain - 1 / a) ** 2 * tot) / (2 * rho2) - 0.5).sum()
    assert float(mean_nll - entropy) == pytest.approx(float(kl_prior + kl_dec), rel=1e-9, abs=1e-12)
    assert float(kl_prior + kl_dec) > 0
    # tight only in the limit: at +-30 the closed form equals -log N(x) to 1e-9
    assert torch.allclose(_gaussian_elbo_nll(x[:5], -30, 30), _gaussian_nll(x[:5]), atol=1e-9, rtol=0)


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    return GaussianMixture.random(2, 6, std=0.15, seed=4)


def test_mixture_ode_likelihood_matches_the_closed_form_density(mixture: GaussianMixture) -> None:
    lo, hi = -20.0, 9.0
    x, _ = mixture.sample(48, generator=torch.Generator().manual_seed(5))
    truth = -mixture_log_prob(mixture, x, logsnr=hi)  # the marginal at lam_max, which the ODE model targets
    exact = ode_likelihood(mixture, x, trace="exact", solver="adaptive", rtol=1e-8, atol=1e-8, logsnr_min=lo,
                           logsnr_max=hi, dequantization="none")
    assert float((exact.nll - truth).abs().max()) < 1e-4
    # the clean mixture, nearly (sigma^2 / alpha^2 = 1.2e-4 at lam_max = 9 against component variances >= 0.006)
    assert float((exact.nll + mixture_log_prob(mixture, x)).abs().max()) < 0.05
    hutch = ode_likelihood(mixture, x, probes=6, solver="rk4", steps=48, logsnr_min=lo, logsnr_max=hi,
                           dequantization="none", generator=torch.Generator().manual_seed(6))
    assert float(hutch.mc_se.min()) > 0  # the mixture's Jacobian is not diagonal: the probes disagree
    z = (hutch.nll - truth) / hutch.mc_se
    assert float(z.abs().max()) < 5 and abs(float(z.mean())) < 4 / math.sqrt(x.shape[0])


def test_mixture_elbo_is_a_tight_bound(mixture: GaussianMixture) -> None:
    lo, hi = -10.0, 10.0
    x, _ = mixture.sample(200, generator=torch.Generator().manual_seed(7))
    r = elbo(mixture, x, num_times=512, logsnr_min=lo, logsnr_max=hi, decoder="gaussian",
             generator=torch.Generator().manual_seed(8), max_batch=1 << 16)
    gap = r.nll + mixture_log_prob(mixture, x)  # -ELBO - (-log p): >= 0 in expectation
    se = float(r.mc_se.pow(2).sum().sqrt()) / x.shape[0]
    assert se < 0.05
    assert float(gap.mean()) > -3 * se
    assert float(gap.mean()) < 3 * se + 0.02


def test_variance_reduction_lowers_the_standard_error() -> None:
    # near-discrete data (tiny components): the integrand vanishes at high log-SNR, as for 8-bit images
    nd = GaussianMixture.random(2, 5, std=1e-3, seed=9)
    x, _ = nd.sample(16, generator=torch.Generator().manual_seed(10))
    lo, hi = -10.0, 10.0
    pilot, _ = nd.sample(16, generator=torch.Generator().manual_seed(11))
    fitted = fit_proposal(nd, pilot, logsnr_min=lo, logsnr_max=hi, generator=torch.Generator().manual_seed(12),
                          max_batch=1 << 16)

    reported = {}

    def spread(sampling: str, proposal) -> float:
        results = [elbo(nd, x, num_times=16, sampling=sampling, proposal=proposal, decoder="gaussian",
                        logsnr_min=lo, logsnr_max=hi, generator=torch.Generator().manual_seed(100 + s),
                        max_batch=1 << 16) for s in range(24)]
        runs = torch.stack([r.terms["diffusion"] for r in results])
        reported[sampling, proposal.name] = float(torch.stack([r.mc_se for r in results]).pow(2).mean().sqrt())
        return float(runs.std(0).pow(2).mean().sqrt())  # empirical standard error of one example's estimate

    naive = spread("iid", LogSNRProposal.uniform(lo, hi))
    stratified = spread("stratified", LogSNRProposal.uniform(lo, hi))
    antithetic = spread("antithetic", LogSNRProposal.uniform(lo, hi))
    both = spread("stratified", fitted)
    assert stratified < 0.95 * naive and antithetic < 0.95 * naive  # measured: 0.93 and 0.79
    assert both < 0.6 * naive and both < 0.7 * stratified  # measured: 0.48 and 0.52
    # the reported errors: unbiased for iid and antithetic draws, conservative (collapsed strata) for stratified
    assert reported["iid", "uniform"] == pytest.approx(naive, rel=0.25)
    assert reported["antithetic", "uniform"] == pytest.approx(antithetic, rel=0.25)
    assert reported["stratified", "fitted"] > 0.9 * both


def test_proposals_are_densities() -> None:
    from simdiff.schedules import CosineSchedule

    u = (torch.arange(4000, dtype=F64) + 0.5) / 4000
    for prop in (LogSNRProposal.uniform(-5, 7), LogSNRProposal(torch.tensor([-5.0, 0.0, 1.0, 7.0]),
                                                               torch.tensor([0.2, 0.5, 0.3])),
                 LogSNRProposal.from_schedule(CosineSchedule(), -5, 7)):
        lam, log_q = prop.sample(u)
        assert float(lam.min()) >= -5 - 1e-9 and float(lam.max()) <= 7 + 1e-9
        assert bool((torch.diff(lam) >= 0).all())
        assert torch.allclose(prop.log_density(lam[5:-5]), log_q[5:-5], atol=1e-6)
        # midpoint rule in u: E_q[1 / q] = length of the range; E_q[lam / q] = int lam dlam
        assert float(torch.exp(-log_q).mean()) == pytest.approx(12.0, rel=1e-3)
        assert float((lam * torch.exp(-log_q)).mean()) == pytest.approx((49 - 25) / 2, rel=1e-2)


def test_discrete_decoder_and_bpd_units() -> None:
    # a denoiser that returns the truth at every level cannot be built without x, so use a Gaussian on 8-bit data:
    # the discrete decoder's term is ~0 at a high lam_max and the bound is finite and positive
    gm = GaussianMixture(torch.zeros(1, 4, dtype=F64), 0.25)
    k = torch.randint(0, 256, (6, 4), generator=torch.Generator().manual_seed(13))
    x = k.double() / 127.5 - 1
    r = elbo(gm, x, num_times=8, logsnr_min=-10, logsnr_max=14, generator=torch.Generator().manual_seed(14))
    assert float(r.terms["reconstruction"].max()) < 1e-3
    assert torch.allclose(r.bpd, r.nll / (4 * math.log(2)))
    s = r.summary()
    assert s["num"] == 6 and s["bpd"] > 0 and s["bpd_se"] > 0
    # a lam_max of 4 leaves sigma / alpha = 0.14, i.e. ~18 bins: the decoder then costs several bits per pixel
    low = elbo(gm, x, num_times=8, logsnr_min=-10, logsnr_max=4, generator=torch.Generator().manual_seed(14))
    assert float(low.terms["reconstruction"].mean()) / (4 * math.log(2)) > 3
    # uniform dequantisation adds D log(2/255) nats
    ode = ode_likelihood(gm, x, probes=1, steps=8, logsnr_min=-10, logsnr_max=10)
    assert torch.allclose(ode.terms["dequantization"], torch.full((6,), -4 * math.log(2 / 255), dtype=F64))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda gm, x: elbo(gm, x + 0.001, logsnr_min=-5, logsnr_max=5), "8-bit|256-level"),
        (lambda gm, x: elbo(gm, x, num_times=7, logsnr_min=-5, logsnr_max=5), "even"),
        (lambda gm, x: elbo(gm, x, sampling="sobol", logsnr_min=-5, logsnr_max=5), "unknown sampling"),
        (lambda gm, x: elbo(gm, x), "logsnr_min and logsnr_max"),
        (lambda gm, x: elbo(gm, x, logsnr_min=5, logsnr_max=-5), "logsnr_min < logsnr_max"),
        (lambda gm, x: ode_likelihood(gm, x, solver="rk45", logsnr_min=-5, logsnr_max=5), "unknown solver"),
        (lambda gm, x: ode_likelihood(gm, x, probes=0, logsnr_min=-5, logsnr_max=5), "probes"),
        (lambda gm, x: ode_likelihood(gm, x + 0.001, logsnr_min=-5, logsnr_max=5), "256-level"),
    ],
)
def test_bad_input_is_one_line(call, match: str) -> None:
    gm = GaussianMixture(torch.zeros(1, 2, dtype=F64), 0.25)
    x = torch.tensor([[0.0, 1.0], [-1.0, 1 / 127.5]], dtype=F64) + 1 / 255  # 8-bit values k / 127.5 - 1
    x = (x + 1).mul(127.5).round() / 127.5 - 1
    with pytest.raises(ValueError, match=match) as info:
        call(gm, x)
    assert "\n" not in str(info.value)


def test_non_isotropic_process_is_refused() -> None:
    from simdiff.processes import build_process
    from simdiff.schedules import CosineSchedule

    process = build_process({"name": "blurring", "image_size": 4}, CosineSchedule())
    gm = GaussianMixture(torch.zeros(1, 16, dtype=F64), 0.25)
    with pytest.raises(ValueError, match="isotropic"):
        elbo(gm, torch.zeros(2, 1, 4, 4, dtype=F64), logsnr_min=-5, logsnr_max=5, process=process)
