"""Process math in float64 against closed forms."""

import math

import pytest
import torch

from simdiff import process as P


@pytest.fixture(autouse=True)
def _float64():
    """float64 by default inside this module only (restored after each test)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 4, 4, generator=g)
    eps = torch.randn(64, 3, 4, 4, generator=g)
    logsnr = torch.linspace(-12, 12, 64)
    return x, eps, logsnr


def test_alpha_sigma_variance_preserving(batch):
    _, _, lam = batch
    a, s = P.alpha_sigma(lam)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(lam), rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.log(a**2 / s**2), lam, rtol=0, atol=1e-10)
    la, ls = P.log_alpha_sigma(lam)
    torch.testing.assert_close(la.exp(), a, rtol=1e-13, atol=0)
    torch.testing.assert_close(ls.exp(), s, rtol=1e-13, atol=0)


def test_alpha_sigma_infinite_ends():
    a, s = P.alpha_sigma(torch.tensor([math.inf, -math.inf]))
    assert a.tolist() == [1.0, 0.0] and s.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("kind", ["eps", "x", "v"])
def test_to_output_round_trips(batch, kind):
    x, eps, lam = batch
    z = P.add_noise(x, eps, logsnr=lam)
    truth = {"x": x, "eps": eps, "v": P.v_from_x_eps(x=x, eps=eps, logsnr=lam)}
    out = P.to_output(kind, truth[kind], z=z, logsnr=lam)
    for name in ("x", "eps", "v"):
        torch.testing.assert_close(out.get(name), truth[name], rtol=0, atol=1e-9)
    # and back again from every view
    for name in ("x", "eps", "v"):
        again = P.to_output(name, out.get(name), z=z, logsnr=lam)
        torch.testing.assert_close(again.get(kind), truth[kind], rtol=0, atol=1e-9)


def test_converters_agree_with_to_output(batch):
    x, eps, lam = batch
    z = P.add_noise(x, eps, logsnr=lam)
    v = P.v_from_x_eps(x=x, eps=eps, logsnr=lam)
    torch.testing.assert_close(P.x_from_eps(z=z, eps=eps, logsnr=lam), x, rtol=0, atol=1e-9)
    torch.testing.assert_close(P.eps_from_x(z=z, x=x, logsnr=lam), eps, rtol=0, atol=1e-9)
    torch.testing.assert_close(P.x_from_v(z=z, v=v, logsnr=lam), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(P.eps_from_v(z=z, v=v, logsnr=lam), eps, rtol=0, atol=1e-12)


def test_posterior_matches_gaussian_conditioning():
    """q(z_s | z_t, x) from the joint Gaussian of (z_s, z_t) given x, computed the textbook way."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, generator=g)
    z_t = torch.randn(5, 7, generator=g)
    ls, lt = torch.full((5,), 2.0), torch.tensor([-3.0, -1.0, 0.0, 1.0, 1.9])
    a_s, s_s = P.alpha_sigma(ls)
    a_t, s_t = P.alpha_sigma(lt)
    # z_t = (a_t/a_s) z_s + sqrt(s_t^2 - (a_t/a_s)^2 s_s^2) * n   (Markov forward step)
    a_ts = a_t / a_s
    var_ts = s_t**2 - a_ts**2 * s_s**2
    prec = 1 / s_s**2 + a_ts**2 / var_ts
    var = 1 / prec
    mean = var[:, None] * ((a_s / s_s**2)[:, None] * x + (a_ts / var_ts)[:, None] * z_t)
    m, v = P.posterior(z_t=z_t, x=x, logsnr_s=ls, logsnr_t=lt)
    torch.testing.assert_close(m, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v.reshape(-1), var, rtol=1e-10, atol=1e-14)
    _, v_large = P.posterior(z_t=z_t, x=x, logsnr_s=ls, logsnr_t=lt, variance="large")
    torch.testing.assert_close(v_large.reshape(-1), var * s_t**2 / s_s**2, rtol=1e-10, atol=0)


def test_posterior_to_data_is_x():
    x = torch.randn(3, 2)
    z = torch.randn(3, 2)
    m, v = P.posterior(z_t=z, x=x, logsnr_s=torch.full((3,), math.inf), logsnr_t=torch.zeros(3))
    torch.testing.assert_close(m, x)
    assert float(v.abs().max()) == 0.0


def test_ddim_step_is_posterior_mean_direction_and_inverse():
    g = torch.Generator().manual_seed(2)
    x, eps = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    lt, ls = torch.full((4,), -1.0), torch.full((4,), 3.0)
    z_t = P.add_noise(x, eps, logsnr=lt)
    z_s = P.ddim_step(z_t=z_t, x=x, logsnr_s=ls, logsnr_t=lt)
    # with the true x, DDIM keeps the same eps: z_s = a_s x + s_s eps
    torch.testing.assert_close(z_s, P.add_noise(x, eps, logsnr=ls), rtol=0, atol=1e-12)
    torch.testing.assert_close(P.ddim_invert_x(z_s=z_s, z_t=z_t, logsnr_s=ls, logsnr_t=lt), x, rtol=0, atol=1e-10)
    # to +inf returns x exactly
    torch.testing.assert_close(
        P.ddim_step(z_t=z_t, x=x, logsnr_s=torch.full((4,), math.inf), logsnr_t=lt), x, rtol=0, atol=1e-15
    )


def test_ddpm_step_zero_noise_is_mean():
    x, z = torch.randn(2, 3), torch.randn(2, 3)
    lt, ls = torch.zeros(2), torch.ones(2)
    m, _ = P.posterior(z_t=z, x=x, logsnr_s=ls, logsnr_t=lt)
    torch.testing.assert_close(P.ddpm_step(z_t=z, x=x, logsnr_s=ls, logsnr_t=lt, noise=torch.zeros(2, 3)), m)


def test_bad_shapes_name_both():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 3\)"):
        P.add_noise(torch.zeros(2, 3), torch.zeros(4, 3), logsnr=torch.zeros(2))
    with pytest.raises(ValueError, match=r"logsnr of shape \(5,\).*\(2, 3\)"):
        P.add_noise(torch.zeros(2, 3), torch.zeros(2, 3), logsnr=torch.zeros(5))
    with pytest.raises(ValueError, match="valid: eps, x, v"):
        P.to_output("score", torch.zeros(2), z=torch.zeros(2), logsnr=torch.zeros(2))


def test_forward_step_composes_to_the_marginal():
    """q(z_t | z_s) after q(z_s | x) is q(z_t | x): mean alpha_t x and variance sigma_t^2 (float64, closed form)."""
    from simdiff.process import alpha_sigma, expand, forward_step

    x = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(3, 2)
    ls = torch.tensor([4.0, 0.5, float("inf")], dtype=torch.float64)
    lt = torch.tensor([-1.0, -3.0, 2.0], dtype=torch.float64)
    a_s, s_s = alpha_sigma(expand(ls, x))
    a_t, s_t = alpha_sigma(expand(lt, x))
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    mean = forward_step(z_s=a_s * x, logsnr_s=ls, logsnr_t=lt, noise=zero)  # linear in (z_s, noise)
    gain = forward_step(z_s=one, logsnr_s=ls, logsnr_t=lt, noise=zero)
    kick = forward_step(z_s=zero, logsnr_s=ls, logsnr_t=lt, noise=one)
    torch.testing.assert_close(mean, a_t * x, rtol=0, atol=1e-12)
    torch.testing.assert_close(gain**2 * s_s**2 + kick**2, s_t**2 * one, rtol=0, atol=1e-12)
