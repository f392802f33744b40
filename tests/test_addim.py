"""aDDIM (Heek et al. 2024, Algorithm 3): reductions to DDIM, the stated norm inflation, per-example norms."""

import math

import pytest
import torch

from simdiff.process import add_noise, alpha_sigma, ddim_step, sigma_ratio
from simdiff.samplers import make_grid, sample_ddim
from simdiff.samplers.addim import addim_step, analytic_x_var, estimated_x_var, sample_addim
from simdiff.schedules import get_schedule
from simdiff.toy import GaussianMixture

D = torch.float64


def _state(b=5, d=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=D), torch.randn(b, d, generator=g, dtype=D)


def test_zero_variance_is_ddim():
    z, x = _state()
    lt, ls = torch.full((5,), -1.0, dtype=D), torch.full((5,), 2.0, dtype=D)
    out = addim_step(z_t=z, x=x, logsnr_s=ls, logsnr_t=lt, x_var=0.0)
    torch.testing.assert_close(out, ddim_step(z_t=z, x=x, logsnr_s=ls, logsnr_t=lt), rtol=0, atol=1e-14)


def test_reduces_to_ddim_as_s_to_t():
    z, x = _state()
    lt = torch.full((5,), 0.5, dtype=D)
    gaps = []
    for h in (1e-2, 1e-3, 1e-4):
        ls = lt + h
        a = addim_step(z_t=z, x=x, logsnr_s=ls, logsnr_t=lt, x_var=0.3)
        gaps.append(float((a - ddim_step(z_t=z, x=x, logsnr_s=ls, logsnr_t=lt)).abs().max()))
    # the correction is O(h^2): (alpha_s - alpha_t sigma_s / sigma_t) = O(h) enters squared under a sqrt
    assert gaps[2] < 1e-8
    assert gaps[0] / gaps[1] == pytest.approx(100, rel=0.05) and gaps[1] / gaps[2] == pytest.approx(100, rel=0.05)


def test_inflates_noise_norm_by_stated_amount():
    z, x = _state(b=4, d=9)
    lt, ls = torch.tensor([-2.0, -0.5, 0.0, 1.0], dtype=D), torch.tensor([-1.0, 1.0, 3.0, 1.5], dtype=D)
    x_var = torch.tensor([0.1, 0.02, 0.5, 0.0], dtype=D)
    a_s, _ = alpha_sigma(ls)
    a_t, _ = alpha_sigma(lt)
    coef = a_s - a_t * sigma_ratio(logsnr_s=ls, logsnr_t=lt)
    za = addim_step(z_t=z, x=x, logsnr_s=ls, logsnr_t=lt, x_var=x_var)
    zd = ddim_step(z_t=z, x=x, logsnr_s=ls, logsnr_t=lt)
    gain = (za - a_s[:, None] * x).pow(2).sum(1) - (zd - a_s[:, None] * x).pow(2).sum(1)
    torch.testing.assert_close(gain, 9 * coef**2 * x_var, rtol=1e-12, atol=1e-14)  # d * z_s_var (eq. 12-13)


def test_per_example_norm_not_batch_wide():
    z, x = _state(b=6, d=4)
    lt, ls = torch.full((6,), -0.3, dtype=D), torch.full((6,), 1.2, dtype=D)
    full = addim_step(z_t=z, x=x, logsnr_s=ls, logsnr_t=lt, x_var=0.2)
    one = torch.cat([addim_step(z_t=z[i:i + 1], x=x[i:i + 1], logsnr_s=ls[:1], logsnr_t=lt[:1], x_var=0.2)
                     for i in range(6)])
    torch.testing.assert_close(full, one, rtol=1e-13, atol=1e-14)


def test_final_step_to_data_returns_x():
    z, x = _state()
    out = addim_step(z_t=z, x=x, logsnr_s=torch.full((5,), math.inf, dtype=D), logsnr_t=torch.zeros(5, dtype=D),
                     x_var=0.3)
    torch.testing.assert_close(out, x)


def test_exact_posterior_variance_corrects_ddim_norm_deficit():
    # x ~ N(0, v I): E[x|z] = a v z / (a^2 v + s^2), Var[x|z] = v s^2 / (a^2 v + s^2) per dim (exact).
    d, v, b = 512, 0.3, 64
    g = torch.Generator().manual_seed(1)
    lt, ls = torch.full((b,), -1.0, dtype=D), torch.full((b,), 1.5, dtype=D)
    x = torch.randn(b, d, generator=g, dtype=D) * math.sqrt(v)
    z = add_noise(x, torch.randn(b, d, generator=g, dtype=D), logsnr=lt)
    a, s = alpha_sigma(lt[:1])
    x_hat = a * v * z / (a**2 * v + s**2)
    x_var = v * s**2 / (a**2 * v + s**2)
    a_s, s_s = alpha_sigma(ls[:1])
    true = float(a_s**2 * v + s_s**2)  # E||z_s||^2 / d of the true marginal
    za = addim_step(z_t=z, x=x_hat, logsnr_s=ls, logsnr_t=lt, x_var=x_var.expand(b))
    zd = ddim_step(z_t=z, x=x_hat, logsnr_s=ls, logsnr_t=lt)
    # DDIM + exact tr Var (eq. 12): the true E||z_s||^2 = E||z_ddim||^2 + d coef^2 x_var (residual _|_ z_t).
    coef = a_s - a * sigma_ratio(logsnr_s=ls[:1], logsnr_t=lt[:1])
    assert float(zd.pow(2).mean() + coef**2 * x_var) == pytest.approx(true, rel=0.01)
    # aDDIM adds that variance along eps_hat; here x_hat and eps_hat are both prop. to z (not orthogonal as in high-dim
    # data), so the cross term overshoots a little: seen 0.4635 (aDDIM) vs 0.4277 (true) vs 0.3134 (DDIM).
    err_a, err_d = abs(float(za.pow(2).mean()) - true), abs(float(zd.pow(2).mean()) - true)
    assert err_a < err_d and float(zd.pow(2).mean()) < 0.95 * true


def test_x_var_helpers():
    lam = torch.tensor([-3.0, 0.0, 4.0], dtype=D)
    torch.testing.assert_close(analytic_x_var(lam), 0.1 / (2 + torch.exp(lam)))
    x, xh = _state(b=3, d=4)
    torch.testing.assert_close(estimated_x_var(x, xh, eta=0.75), 0.75 * (x - xh).pow(2).mean(1))
    with pytest.raises(ValueError, match="differ"):
        estimated_x_var(x, xh[:, :2])


def test_sample_addim_matches_ddim_with_zero_variance_and_validates_grid():
    mix = GaussianMixture.random(2, 3, seed=0)
    grid = make_grid(get_schedule("cosine"), 4, kind="uniform_t")
    z = torch.randn(50, 2, generator=torch.Generator().manual_seed(2), dtype=D)
    calls = []
    out = sample_addim(mix.denoise, z, grid, x_var_fn=lambda lam: 0.0, callback=calls.append)
    torch.testing.assert_close(out, sample_ddim(mix.denoise, z, grid), rtol=1e-12, atol=1e-12)
    assert len(calls) == 4
    assert not torch.allclose(sample_addim(mix.denoise, z, grid), out)
    with pytest.raises(ValueError, match="needs an increasing logsnr grid"):
        sample_addim(mix.denoise, z, grid.flip(0)[1:])


def test_addim_is_a_core_sampler_through_generate():
    """``sampler: addim`` works wherever a core sampler does (registry, nfe, generate)."""
    from simdiff.generate import SampleConfig, generate
    from simdiff.samplers import SAMPLERS, get_sampler, nfe

    assert get_sampler("addim") is sample_addim and "addim" in SAMPLERS and nfe("addim", 6) == 6
    mix = GaussianMixture.random(2, 3, seed=0)
    calls = []

    def denoise(z, lam, **kw):
        calls.append(1)
        return mix.denoise(z.double(), lam.double())

    cfg = SampleConfig(sampler="addim", steps=5, grid="uniform_t", num=16, seed=0)
    x = generate(denoise, get_schedule("cosine"), (2,), cfg)
    assert x.shape == (16, 2) and bool(torch.isfinite(x).all()) and len(calls) == 5
