"""Blurring diffusion: the closed forms of Hoogeboom & Salimans (2023) checked in float64 on small images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch

from simdiff.configuration import ConfigError
from simdiff.losses import DiffusionLoss
from simdiff.process import alpha_sigma, ddpm_step
from simdiff.processes import BlurringDiffusion, build_process
from simdiff.processes.blurring import heat_eigenvalues
from simdiff.samplers import get_sampler, solve_reference
from simdiff.schedules import get_schedule
from simdiff.toy import GaussianMixture
from simdiff.weighting import get_weighting

D64 = torch.float64
H, W = 4, 5  # not square, not powers of two
SCHED = get_schedule("shifted_cosine", image_size=8, noise_size=16)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def decode_matrix():
    """``[D, D]``: columns are the data-space images of the DCT basis vectors (scipy's orthonormal IDCT)."""
    d = H * W
    cols = [scipy.fft.idctn(np.eye(d)[j].reshape(H, W), norm="ortho").reshape(-1) for j in range(d)]
    return torch.tensor(np.stack(cols, 1), dtype=D64)


def closed_form(proc, lam):
    """``(alpha [B, D], sigma [B])`` from the paper's formulas, independently of the process class."""
    t = SCHED.t_from_logsnr(lam)
    tau = 0.5 * (proc.sigma_B_max * torch.sin(t * math.pi / 2) ** 2) ** 2
    fy, fx = math.pi * torch.arange(H, dtype=D64) / H, math.pi * torch.arange(W, dtype=D64) / W
    big_lambda = (fy[:, None] ** 2 + fx[None, :] ** 2).reshape(-1)
    d = (1 - proc.d_min) * torch.exp(-big_lambda[None] * tau[:, None]) + proc.d_min
    return torch.sigmoid(lam).sqrt()[:, None] * d, torch.sigmoid(-lam).sqrt()


def test_coefficients_follow_the_paper():
    proc = BlurringDiffusion(SCHED, image_size=[H, W], sigma_B_max=3.0, d_min=0.01)
    lam = torch.tensor([-6.0, -1.0, 0.0, 2.5, 7.0], dtype=D64)
    a, s = proc.alpha_sigma(lam)
    ref_a, ref_s = closed_form(proc, lam)
    assert a.shape == (5, 1, H, W) and s.shape == (5, 1, H, W)
    torch.testing.assert_close(a.reshape(5, -1), ref_a, rtol=1e-13, atol=0)
    torch.testing.assert_close(s.reshape(5, -1), ref_s[:, None].expand(5, H * W), rtol=1e-13, atol=0)
    assert bool((a[:, 0, 0, 0] > a[:, 0, -1, -1]).all())  # fine frequencies are dissipated more
    assert torch.equal(heat_eigenvalues(H, W)[0, 0], torch.tensor(0.0, dtype=D64))  # the mean is never blurred


def test_sigma_b_zero_is_standard_diffusion():
    """``sigma_B_max = 0``: the coefficients, one reverse step, the loss and whole sampling runs equal the isotropic
    process to 1e-12."""
    proc = BlurringDiffusion(SCHED, image_size=[H, W], sigma_B_max=0.0)
    g = _gen(1)
    x, eps, z = (torch.randn(6, 1, H, W, generator=g, dtype=D64) for _ in range(3))
    lam_t = torch.linspace(-5, 5, 6, dtype=D64)
    lam_s = lam_t + 0.7
    torch.testing.assert_close(proc.add_noise(x, eps, lam=lam_t),
                               alpha_sigma(lam_t)[0].reshape(6, 1, 1, 1) * x
                               + alpha_sigma(lam_t)[1].reshape(6, 1, 1, 1) * eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(proc.ddpm_step(z_t=z, x=x, lam_s=lam_s, lam_t=lam_t, noise=eps),
                               ddpm_step(z_t=z, x=x, logsnr_s=lam_s, logsnr_t=lam_t, noise=eps), rtol=0, atol=1e-12)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.linspace(-1, 1, H * W, dtype=D64).reshape(1, 1, H, W))

        def forward(self, z, lam, **_):
            from simdiff.process import to_output

            return to_output("v", torch.tanh(z * self.w + lam.reshape(-1, 1, 1, 1) / 10), z=z, logsnr=lam)

    batch = {"x": x}
    kw = dict(jacobian=True, stratified=True)
    iso = DiffusionLoss(SCHED, get_weighting("sigmoid"), **kw)(Net(), batch, _gen(3))
    blur = DiffusionLoss(SCHED, get_weighting("sigmoid"), process=proc, **kw)(Net(), batch, _gen(3))
    torch.testing.assert_close(blur, iso, rtol=1e-12, atol=0)
    gm = GaussianMixture(torch.randn(3, H * W, generator=g, dtype=D64) * 0.5, 0.1)

    def den(z, lam, **_):
        out = gm.denoise(z.reshape(z.shape[0], -1), lam)
        return type(out)(*(v.reshape(z.shape) for v in (out.x, out.eps, out.v)))

    grid = torch.cat([torch.linspace(-6, 6, 9, dtype=D64), torch.tensor([math.inf], dtype=D64)])
    for name, opts in (("ddim", {}), ("ddim", {"eta": 1.0}), ("ddpm", {}), ("dpmpp_2m", {})):
        a = get_sampler(name)(den, z, grid, generator=_gen(4), process=proc, **opts)
        b = get_sampler(name)(den, z, grid, generator=_gen(4), **opts)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_forward_marginals_from_draws():
    """Mean and per-frequency variance of 10^5 draws of ``z_t | x`` within a few standard errors."""
    proc = BlurringDiffusion(SCHED, image_size=[H, W], sigma_B_max=3.0)
    n = 100_000
    x = torch.randn(1, 1, H, W, generator=_gen(5), dtype=D64)
    lam = torch.full((n,), -0.5, dtype=D64)
    eps = torch.randn(n, 1, H, W, generator=_gen(6), dtype=D64)
    z = proc.add_noise(x.expand(n, 1, H, W), eps, lam=lam)
    bm = decode_matrix()
    u = z.reshape(n, -1) @ bm  # scipy DCT coordinates (bm is orthonormal: encode = bm^T)
    a, s = closed_form(proc, lam[:1])
    mean_ref = a[0] * (bm.T @ x.reshape(-1))
    se_mean = s[0] / math.sqrt(n)
    assert bool(((u.mean(0) - mean_ref).abs() < 4.5 * se_mean).all())
    var = u.var(0)
    se_var = s[0] ** 2 * math.sqrt(2 / (n - 1))
    assert bool(((var - s[0] ** 2).abs() < 4.5 * se_var).all())


def test_reverse_step_is_gaussian_conditioning_and_the_papers_step():
    """``q(z_s | z_t, x)`` equals conditioning the joint Gaussian of ``(z_s, z_t)`` in data space (1e-10), and the
    appendix's ancestral step in DCT space (written from its eps-form coefficients) gives the same mean and
    variance."""
    proc = BlurringDiffusion(SCHED, image_size=[H, W], sigma_B_max=4.0, d_min=0.001)
    bm = decode_matrix()
    g = _gen(7)
    b = 3
    x, z_t = (torch.randn(b, 1, H, W, generator=g, dtype=D64) for _ in range(2))
    lam_t = torch.tensor([-3.0, 0.0, 2.0], dtype=D64)
    lam_s = lam_t + torch.tensor([0.5, 1.5, 3.0], dtype=D64)
    mean, var = proc.posterior(z_t=z_t, x=x, lam_s=lam_s, lam_t=lam_t)
    a_s, s_s = closed_form(proc, lam_s)
    a_t, s_t = closed_form(proc, lam_t)
    eye = torch.eye(H * W, dtype=D64)
    for i in range(b):
        xu = bm.T @ x[i].reshape(-1)
        m_s, m_t = bm @ (a_s[i] * xu), bm @ (a_t[i] * xu)
        c_ts = bm @ torch.diag(a_t[i] / a_s[i]) @ bm.T * s_s[i] ** 2  # Markov step s -> t, per frequency
        gain = c_ts.T / s_t[i] ** 2
        cond_mean = m_s + gain @ (z_t[i].reshape(-1) - m_t)
        cond_cov = s_s[i] ** 2 * eye - gain @ c_ts
        torch.testing.assert_close(mean[i].reshape(-1), cond_mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(bm @ torch.diag(var[i].reshape(-1)) @ bm.T, cond_cov, rtol=0, atol=1e-10)
        # the paper's step: alpha_ts, sigma2_ts, sigma2_den, c1, c2 in DCT space with eps = (u_t - alpha_t x) / sigma_t
        u_t = bm.T @ z_t[i].reshape(-1)
        eps_u = (u_t - a_t[i] * xu) / s_t[i]
        alpha_ts = a_t[i] / a_s[i]
        sigma2_ts = s_t[i] ** 2 - alpha_ts**2 * s_s[i] ** 2
        sigma2_den = 1 / (1 / s_s[i] ** 2 + alpha_ts**2 / sigma2_ts)
        c1 = alpha_ts * sigma2_den / sigma2_ts
        c2 = (1 / alpha_ts) * sigma2_den / s_s[i] ** 2
        mu = bm @ (c1 * u_t + c2 * (u_t - s_t[i] * eps_u))
        torch.testing.assert_close(mean[i].reshape(-1), mu, rtol=0, atol=1e-10)
        torch.testing.assert_close(var[i].reshape(-1), sigma2_den, rtol=1e-10, atol=0)


LO, HI = -7.0, 7.0


def _grid(n):
    return torch.cat([torch.linspace(LO, HI, n, dtype=D64), torch.tensor([math.inf], dtype=D64)])


def test_samplers_converge_on_the_exact_mixture_denoiser():
    """DDIM (order 1) and DPM-Solver++(2M) (order 2) against the probability-flow ODE of the blurring process, on
    the exact denoiser of a Gaussian mixture under that process (per-component isotropic variances, so the DCT
    basis keeps every component diagonal)."""
    proc = BlurringDiffusion(SCHED, image_size=[H, W], sigma_B_max=2.0)
    g = _gen(8)
    gm = GaussianMixture(torch.randn(6, H * W, generator=g, dtype=D64) * 0.5,
                         0.5 * (0.5 + torch.rand(6, generator=g, dtype=D64)))  # wide: no mode flips
    den = gm.denoise_for(proc)
    z0 = torch.randn(64, 1, H, W, generator=_gen(9), dtype=D64)
    ref = solve_reference(den, z0, logsnr_start=LO, logsnr_end=HI, rtol=1e-11, atol=1e-11, process=proc)

    def err(name, n):
        return float((get_sampler(name)(den, z0, _grid(n), process=proc) - ref).pow(2).mean().sqrt())

    # measured: ddim 64 -> 256 steps 0.0677 -> 0.0173 (slope 0.98); dpmpp_2m 32 -> 128 steps 0.0426 -> 0.0023 (2.1).
    # (With narrow components, 0.1 variance, a few trajectories switch components until ~4000 DDIM steps.)
    for name, n1, n2, lo, hi in (("ddim", 64, 256, 0.8, 1.3), ("dpmpp_2m", 32, 128, 1.7, 2.4)):
        e1, e2 = err(name, n1), err(name, n2)
        slope = math.log(e1 / e2) / math.log(n2 / n1)
        assert lo <= slope <= hi, (name, e1, e2, slope)
    iso = solve_reference(gm.denoise, z0.reshape(64, -1), logsnr_start=LO, logsnr_end=HI, rtol=1e-9, atol=1e-9)
    assert float((iso.reshape(ref.shape) - ref).pow(2).mean().sqrt()) > 0.05  # the blur changes the flow


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="image_size"):
        build_process({"name": "blurring", "image_size": "big"}, SCHED)
    with pytest.raises(ConfigError, match="sigma_B_max"):
        build_process({"name": "blurring", "image_size": 8, "sigma_B_max": -1}, SCHED)
    with pytest.raises(ConfigError, match="bad parameters"):
        build_process({"name": "blurring"}, SCHED)  # image_size is required
    proc = build_process({"name": "blurring", "image_size": 8}, SCHED)
    assert proc.to_dict() == {"name": "blurring", "image_size": 8}
    with pytest.raises(ConfigError, match="8x8 images"):
        proc.check_data_shape((1, 28, 28))
