"""The Gaussian-mixture test bed: its denoiser is the true posterior mean, its distances behave."""

import math

import pytest
import torch

from simdiff import process as P
from simdiff.toy import GaussianMixture, mmd_rbf, sliced_wasserstein


def test_single_gaussian_posterior_mean_closed_form():
    mu = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    var = torch.tensor([[0.3, 2.0, 1.0]], dtype=torch.float64)
    gm = GaussianMixture(mu, var)
    z = torch.randn(10, 3, dtype=torch.float64)
    lam = torch.linspace(-5, 5, 10, dtype=torch.float64)
    a, s = P.alpha_sigma(lam[:, None])
    expected = mu + a * var / (a**2 * var + s**2) * (z - a * mu)
    torch.testing.assert_close(gm.posterior_mean(z, lam), expected, rtol=1e-12, atol=1e-12)


def test_posterior_mean_is_monte_carlo_regression():
    """E[x | z] from Bayes' rule agrees with the empirical mean of x over samples sharing z's bin (1-D)."""
    gm = GaussianMixture(torch.tensor([[-1.0], [1.5]], dtype=torch.float64), 0.05, torch.tensor([0.3, 0.7]))
    g = torch.Generator().manual_seed(0)
    x, _ = gm.sample(1_000_000, generator=g)
    lam = torch.tensor(0.0, dtype=torch.float64)
    z = P.add_noise(x, torch.randn(x.shape, generator=g, dtype=torch.float64), logsnr=lam)
    for lo in (-0.5, 0.0, 0.5):
        m = (z[:, 0] > lo) & (z[:, 0] < lo + 0.04)
        zc = torch.full((1, 1), lo + 0.02, dtype=torch.float64)
        assert abs(float(x[m].mean() - gm.posterior_mean(zc, lam.reshape(1)))) < 0.04  # about 4 standard errors


def test_class_conditional_restricts_components():
    gm = GaussianMixture.random(2, 6, num_classes=3, seed=1)
    x, labels = gm.sample(300, labels=torch.full((300,), 2), generator=torch.Generator().manual_seed(0))
    assert set(labels.tolist()) == {2}
    # at very high noise the conditional posterior mean is the class mean (weighted)
    z = torch.zeros(1, 2, dtype=torch.float64)
    out = gm.posterior_mean(z, torch.tensor([-30.0], dtype=torch.float64), labels=torch.tensor([2]))
    comps = gm.classes == 2
    w = gm.log_weights[comps].softmax(0)
    torch.testing.assert_close(out[0], (w[:, None] * gm.means[comps]).sum(0), rtol=1e-6, atol=1e-8)


def test_denoiser_at_clean_end_is_identity():
    gm = GaussianMixture.random(4, 5)
    x, _ = gm.sample(50)
    out = gm.denoise(x, torch.full((50,), 40.0, dtype=torch.float64))
    torch.testing.assert_close(out.x, x, rtol=0, atol=1e-6)


def test_distances():
    gm = GaussianMixture.random(3, 4, seed=3)
    g = torch.Generator().manual_seed(0)
    a, _ = gm.sample(2000, generator=g)
    b, _ = gm.sample(2000, generator=g)
    sw_same = sliced_wasserstein(a, b, generator=torch.Generator().manual_seed(1))
    sw_shift = sliced_wasserstein(a, b + 1.0, generator=torch.Generator().manual_seed(1))
    # SW2 between two finite samples of a multimodal law is dominated by mode-weight noise (~0.1 at n=2000)
    assert sw_same < 0.2 < 0.4 < sw_shift
    # a pure shift by c along every axis: SW2 = |c| * sqrt(E[(theta . 1)^2]) = |c| * 1 for unit theta in 3-D
    assert abs(float(sliced_wasserstein(a, a + 0.5, num_projections=4096)) - 0.5) < 0.02
    assert abs(float(mmd_rbf(a[:500], b[:500]))) < 0.01 < float(mmd_rbf(a[:500], b[:500] + 1.0))
    with pytest.raises(ValueError, match="dims differ"):
        sliced_wasserstein(a, b[:, :2])


def test_bad_input():
    with pytest.raises(ValueError, match="variances"):
        GaussianMixture(torch.zeros(2, 2), 0.0)
    gm = GaussianMixture.random(2, 3)
    with pytest.raises(ValueError, match="features per example"):
        gm.posterior_mean(torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4))
    assert math.isclose(float(gm.log_weights.exp().sum()), 1.0)


def test_shared_logsnr_fast_path_matches_general_path():
    gm = GaussianMixture.random(5, 6, num_classes=3, seed=4)
    z = torch.randn(40, 5, dtype=torch.float64)
    labels = torch.arange(40) % 3
    for lam in (-6.0, 0.5, 9.0):
        shared = torch.tensor(lam, dtype=torch.float64).expand(40)  # stride 0: the fast path
        general = torch.full((40,), lam, dtype=torch.float64)  # contiguous: the general path
        for lab in (None, labels):
            torch.testing.assert_close(gm.posterior_mean(z, shared, lab), gm.posterior_mean(z, general, lab),
                                       rtol=0, atol=1e-12)


def test_denoise_for_isotropic_process_is_denoise_and_dct_needs_isotropic_variances():
    from simdiff.processes import DCTBasis, IsotropicGaussian
    from simdiff.processes.base import GaussianProcess

    gm = GaussianMixture.random(6, 5, num_classes=2, seed=5)
    z = torch.randn(12, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lam = torch.linspace(-6, 6, 12, dtype=torch.float64)
    labels = torch.arange(12) % 2
    a = gm.denoise_for(IsotropicGaussian())(z, lam, labels=labels)
    b = gm.denoise(z, lam, labels=labels)
    for view in ("x", "eps", "v"):
        torch.testing.assert_close(a.get(view), b.get(view), rtol=0, atol=1e-12)

    class DctVP(GaussianProcess):
        name = "dct_vp"

        def log_alpha_sigma(self, lam):
            return P.log_alpha_sigma(lam)

    with pytest.raises(ValueError, match="non-identity basis needs per-component isotropic variances"):
        gm.denoise_for(DctVP(basis=DCTBasis()))(z.reshape(12, 2, 3), lam)
    # with isotropic variances the DCT (a rotation) changes nothing for an isotropic-coefficient process
    iso = GaussianMixture(gm.means, gm.variances[:, 0], gm.log_weights.exp())
    x_dct = iso.denoise_for(DctVP(basis=DCTBasis()))(z.reshape(12, 2, 3), lam).x.reshape(12, 6)
    torch.testing.assert_close(x_dct, iso.denoise(z, lam).x, rtol=0, atol=1e-12)
