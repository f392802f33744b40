"""Diagonal Gaussian processes (simdiff.processes) in float64: bases, closed-form conditioning, the isotropic
special case, and samplers on the exact mixture denoiser of a per-coordinate, non-VP process."""

import math

import numpy as np
import pytest
import scipy.fft
import torch
import torch.nn.functional as F

from simdiff.configuration import ConfigError
from simdiff.processes import PROCESSES, DCTBasis, GaussianProcess, IdentityBasis, IsotropicGaussian, build_process
from simdiff.processes.bases import dct_matrix
from simdiff.samplers import SAMPLERS, get_sampler, make_grid, solve_reference
from simdiff.samplers.tuned import error_balanced_grid
from simdiff.schedules import get_schedule
from simdiff.toy import GaussianMixture, sliced_wasserstein

D64 = torch.float64
LO, HI = -15.0, 8.0
SHAPE = (2, 3)  # one example; non-square and not a power of two, so the DCT is exercised in general


class EqualLogSNR(GaussianProcess):
    """The VP process written through the generic base-class math, one (equal) coefficient per coordinate."""

    name = "equal_vp"

    def __init__(self, coef_shape):
        super().__init__()
        self.coef_shape = tuple(coef_shape)

    def log_alpha_sigma(self, lam):
        lam = lam.reshape(lam.shape + (1,) * len(self.coef_shape)).expand(lam.shape + self.coef_shape)
        return 0.5 * F.logsigmoid(lam), 0.5 * F.logsigmoid(-lam)


class Shifted(GaussianProcess):
    """Per-coordinate levels and non-VP coefficients: ``alpha_d = s_d sqrt(sigmoid(lam + b_d))``,
    ``sigma_d = sqrt(sigmoid(-(lam + b_d)))``."""

    name = "shifted"

    def __init__(self, basis=None):
        super().__init__(get_schedule("cosine"), basis=basis)
        self.b = torch.tensor([[-1.0, 0.5, 2.0], [0.0, -2.0, 1.0]], dtype=D64)
        self.scale = torch.tensor([[1.0, 0.5, 2.0], [1.5, 0.8, 1.0]], dtype=D64)
        self.coef_shape = SHAPE

    def log_alpha_sigma(self, lam):
        lev = lam.reshape(lam.shape + (1, 1)) + self.b
        return self.scale.log() + 0.5 * F.logsigmoid(lev), 0.5 * F.logsigmoid(-lev)

    def closed_form(self, lam):
        """``(alpha, sigma)`` ``[B, D]`` straight from the definition (independent of log_alpha_sigma)."""
        lev = lam[:, None] + self.b.reshape(-1)
        return self.scale.reshape(-1) * torch.sigmoid(lev).sqrt(), torch.sigmoid(-lev).sqrt()


BASES = {"identity": IdentityBasis, "dct": DCTBasis}


def decode_matrix(basis_name):
    """``[D, D]`` matrix of decode, from scipy's orthonormal inverse DCT (independent of DCTBasis)."""
    d = math.prod(SHAPE)
    if basis_name == "identity":
        return torch.eye(d, dtype=D64)
    cols = [scipy.fft.idctn(np.eye(d)[j].reshape(SHAPE), norm="ortho").reshape(-1) for j in range(d)]
    return torch.tensor(np.stack(cols, 1), dtype=D64)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ bases
@pytest.mark.parametrize("shape", [(5, 7), (4, 6), (3, 1, 8)])
def test_dct_matches_scipy_inverts_and_is_orthonormal(shape):
    x = torch.randn(2, *shape, generator=_gen(0), dtype=D64)
    basis = DCTBasis()
    u = basis.encode(x)
    ref = scipy.fft.dctn(x.numpy(), axes=(-2, -1), norm="ortho")
    torch.testing.assert_close(u, torch.from_numpy(ref), rtol=0, atol=1e-12)
    torch.testing.assert_close(basis.decode(u), x, rtol=0, atol=1e-12)
    for n in shape[-2:]:
        c = dct_matrix(n)
        torch.testing.assert_close(c @ c.T, torch.eye(n, dtype=D64), rtol=0, atol=1e-13)
    torch.testing.assert_close(u.pow(2).sum(), x.pow(2).sum(), rtol=1e-13, atol=0)  # Parseval


def test_identity_basis_is_a_no_op():
    x = torch.randn(3, 4)
    assert IdentityBasis().encode(x) is x and IdentityBasis().decode(x) is x


# ------------------------------------------------------------------------------------------------ equal log-SNR
def test_equal_logsnr_process_reproduces_isotropic_math():
    g = _gen(1)
    x, eps = torch.randn(16, 5, generator=g, dtype=D64), torch.randn(16, 5, generator=g, dtype=D64)
    lam = torch.linspace(-10, 10, 16, dtype=D64)
    eq, iso = EqualLogSNR((5,)), IsotropicGaussian()
    close = dict(rtol=0, atol=1e-12)
    z = eq.add_noise(x, eps, lam=lam)
    torch.testing.assert_close(z, iso.add_noise(x, eps, lam=lam), **close)
    v = iso.to_output("x", x, z=z, lam=lam).v
    for kind, pred in (("x", x), ("eps", eps), ("v", v)):
        a, b = eq.to_output(kind, pred, z=z, lam=lam), iso.to_output(kind, pred, z=z, lam=lam)
        for view in ("x", "eps", "v"):
            torch.testing.assert_close(a.get(view), b.get(view), rtol=0, atol=1e-10)
    lam_s = lam + 1.5
    for variance in ("small", "large"):
        ma, va = eq.posterior(z_t=z, x=x, lam_s=lam_s, lam_t=lam, variance=variance)
        mb, vb = iso.posterior(z_t=z, x=x, lam_s=lam_s, lam_t=lam, variance=variance)
        torch.testing.assert_close(ma, mb, **close)
        torch.testing.assert_close(va, vb.expand_as(va), **close)
    z_s = eq.ddim_step(z_t=z, x=x, lam_s=lam_s, lam_t=lam)
    torch.testing.assert_close(z_s, iso.ddim_step(z_t=z, x=x, lam_s=lam_s, lam_t=lam), **close)
    torch.testing.assert_close(eq.ddim_invert_x(z_s=z_s, z_t=z, lam_s=lam_s, lam_t=lam), x, rtol=0, atol=1e-10)
    grid = torch.linspace(-8, 6, 7, dtype=D64)
    for eta in (0.0, 0.3, 1.0):
        for a, b in zip(eq.ddim_coefficients(grid, eta), iso.ddim_coefficients(grid, eta)):
            torch.testing.assert_close(a, b[:, None].expand_as(a), **close)
    for a, b in zip(eq.ei_coefficients(grid), iso.ei_coefficients(grid)):
        torch.testing.assert_close(a, b[:, None].expand_as(a), **close)


@pytest.fixture(scope="module")
def gm():
    return GaussianMixture.random(2, 8, seed=0, std=0.4)


RUNS = [("ddim", {}), ("ddim", {"eta": 1.0}), ("ddpm", {}), ("ddpm", {"variance": "large"}), ("dpmpp_2m", {})]


@pytest.mark.parametrize("name,kw", RUNS, ids=[f"{n}{kw}" for n, kw in RUNS])
def test_equal_logsnr_process_samples_like_isotropic(gm, name, kw):
    z = torch.randn(64, 2, generator=_gen(2), dtype=D64)
    grid = make_grid(get_schedule("cosine"), 10)
    eq = EqualLogSNR((2,))
    a = get_sampler(name)(gm.denoise_for(eq), z, grid, process=eq, generator=_gen(3), **kw)
    b = get_sampler(name)(gm.denoise, z, grid, generator=_gen(3), **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "sde", "addim"])
def test_isotropic_process_is_bit_identical_to_none(gm, name):
    z = torch.randn(32, 2, generator=_gen(4), dtype=torch.float32)
    grid = make_grid(get_schedule("cosine"), 7, kind="edm")
    seen = []
    a = get_sampler(name)(gm.denoise, z, grid, generator=_gen(5), process=IsotropicGaussian(),
                          callback=lambda d: seen.append(d["z"]))
    b = get_sampler(name)(gm.denoise, z, grid, generator=_gen(5))
    assert torch.equal(a, b) and len(seen) == 7


# ------------------------------------------------------------------------------------------------ per coordinate
@pytest.mark.parametrize("basis", sorted(BASES))
def test_posterior_is_gaussian_conditioning(basis):
    """q(z_s | z_t, x) against conditioning the joint Gaussian of (z_s, z_t) given x, in data space."""
    proc = Shifted(BASES[basis]())
    bm = decode_matrix(basis)
    g = _gen(6)
    b, d = 4, math.prod(SHAPE)
    x = torch.randn(b, *SHAPE, generator=g, dtype=D64)
    z_t = torch.randn(b, *SHAPE, generator=g, dtype=D64)
    lam_t = torch.tensor([-4.0, -1.0, 0.5, 2.0], dtype=D64)
    lam_s = lam_t + torch.tensor([0.3, 2.0, 5.0, 1.0], dtype=D64)
    mean, var_small = proc.posterior(z_t=z_t, x=x, lam_s=lam_s, lam_t=lam_t)
    _, var_large = proc.posterior(z_t=z_t, x=x, lam_s=lam_s, lam_t=lam_t, variance="large")
    a_s, s_s = proc.closed_form(lam_s)
    a_t, s_t = proc.closed_form(lam_t)
    for i in range(b):
        xu = bm.T @ x[i].reshape(-1)
        m_s, m_t = bm @ (a_s[i] * xu), bm @ (a_t[i] * xu)
        c_ss = bm @ torch.diag(s_s[i] ** 2) @ bm.T
        c_ts = bm @ torch.diag(a_t[i] / a_s[i] * s_s[i] ** 2) @ bm.T  # Markov forward step s -> t
        c_tt = bm @ torch.diag(s_t[i] ** 2) @ bm.T
        gain = c_ts.T @ torch.linalg.inv(c_tt)
        cond_mean = m_s + gain @ (z_t[i].reshape(-1) - m_t)
        cond_cov = c_ss - gain @ c_ts
        forward_cov = c_tt - c_ts @ torch.linalg.inv(c_ss) @ c_ts.T  # Cov(z_t | z_s), the "large" variance
        torch.testing.assert_close(mean[i].reshape(-1), cond_mean, rtol=0, atol=1e-10)
        for var, ref in ((var_small, cond_cov), (var_large, forward_cov)):
            cov = bm @ torch.diag(var[i].expand(SHAPE).reshape(-1)) @ bm.T
            torch.testing.assert_close(cov, ref, rtol=0, atol=1e-10)
    assert d == 6


@pytest.mark.parametrize("basis", sorted(BASES))
def test_forward_marginal_and_views(basis):
    proc = Shifted(BASES[basis]())
    bm = decode_matrix(basis)
    g = _gen(7)
    b, d = 5, math.prod(SHAPE)
    x = torch.randn(b, *SHAPE, generator=g, dtype=D64)
    eps = torch.randn(b, *SHAPE, generator=g, dtype=D64)
    lam = torch.linspace(-6, 6, b, dtype=D64)
    a, s = proc.closed_form(lam)
    mean = proc.add_noise(x, torch.zeros_like(eps), lam=lam)
    basis_vectors = torch.eye(d, dtype=D64).reshape(d, *SHAPE)
    for i in range(b):
        torch.testing.assert_close(mean[i].reshape(-1), bm @ (a[i] * (bm.T @ x[i].reshape(-1))), rtol=0, atol=1e-12)
        lam_i = lam[i].expand(d)
        jac = proc.add_noise(torch.zeros_like(basis_vectors), basis_vectors, lam=lam_i).reshape(d, d).T  # dz/deps
        torch.testing.assert_close(jac @ jac.T, bm @ torch.diag(s[i] ** 2) @ bm.T, rtol=0, atol=1e-12)
    z = proc.add_noise(x, eps, lam=lam)
    v = proc.decode(a.reshape(b, *SHAPE) * proc.encode(eps) - s.reshape(b, *SHAPE) * proc.encode(x))
    truth = {"x": x, "eps": eps, "v": v}
    for kind in ("x", "eps", "v"):
        out = proc.to_output(kind, truth[kind], z=z, lam=lam)
        for view in ("x", "eps", "v"):
            torch.testing.assert_close(out.get(view), truth[view], rtol=0, atol=1e-10)


def _mixture():
    """8 components in 6 dims with per-component isotropic variances (so the DCT basis applies)."""
    g = _gen(8)
    means = torch.randn(8, 6, generator=g, dtype=D64) * 0.5
    variances = 0.16 * (0.5 + torch.rand(8, generator=g, dtype=D64))
    return GaussianMixture(means, variances, 0.5 + torch.rand(8, generator=g, dtype=D64))


def lin_grid(n):
    return torch.cat([torch.linspace(LO, HI, n, dtype=D64), torch.tensor([math.inf], dtype=D64)])


def rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


@pytest.fixture(scope="module", params=sorted(BASES))
def setup(request):
    proc = Shifted(BASES[request.param]())
    gm = _mixture()
    den = gm.denoise_for(proc)
    z0 = torch.randn(128, *SHAPE, generator=_gen(9), dtype=D64)
    ref = solve_reference(den, z0, logsnr_start=LO, logsnr_end=HI, rtol=1e-11, atol=1e-11, process=proc)
    return proc, gm, den, z0, ref


def test_mixture_denoiser_is_posterior_mean(setup):
    """Monte-Carlo check of E[x | z] at one z per component region: regression on samples near it is hard in 6-D,
    so check Tweedie's identity instead: E[x | z] from the denoiser equals the gradient form computed by autograd,
    alpha^-1 (u + sigma^2 grad log p(u)) per basis coordinate, with p(u) the mixture's marginal density."""
    proc, gm, den, _, _ = setup
    z = torch.randn(6, *SHAPE, generator=_gen(10), dtype=D64)
    lam = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.5, 5.0], dtype=D64)
    a, s = proc.alpha_sigma(lam)
    a, s = a.reshape(6, -1), s.reshape(6, -1)
    u = proc.encode(z).reshape(6, -1).requires_grad_(True)
    mu = proc.encode(gm.means.reshape(8, *SHAPE)).reshape(8, -1)
    tot = a[:, None] ** 2 * gm.variances[None] + s[:, None] ** 2  # [B, K, D]
    logp = torch.logsumexp(gm.log_weights - 0.5 * (((u[:, None] - a[:, None] * mu) ** 2) / tot
                                                    + torch.log(2 * math.pi * tot)).sum(-1), dim=-1)
    (score,) = torch.autograd.grad(logp.sum(), u)
    tweedie = (u.detach() + s**2 * score) / a
    x = proc.encode(den(z, lam).x).reshape(6, -1)
    torch.testing.assert_close(x, tweedie, rtol=0, atol=1e-10)


# Measured slopes (identity / dct basis): ddim 64 -> 256 steps 1.04 / 1.05, dpmpp_2m 32 -> 128 steps 2.04 / 2.00.
ORDERS = [("ddim", 64, 256, (0.8, 1.3), 5e-2), ("dpmpp_2m", 32, 128, (1.7, 2.4), 2e-3)]


@pytest.mark.parametrize("name,n1,n2,bounds,max_err", ORDERS, ids=[o[0] for o in ORDERS])
def test_convergence_order_per_coordinate(setup, name, n1, n2, bounds, max_err):
    proc, _, den, z0, ref = setup
    sampler = get_sampler(name)
    e1 = rms(sampler(den, z0, lin_grid(n1), process=proc), ref)
    e2 = rms(sampler(den, z0, lin_grid(n2), process=proc), ref)
    slope = math.log(e1 / e2) / math.log(n2 / n1)
    assert bounds[0] <= slope <= bounds[1], (name, e1, e2, slope)
    assert e2 < max_err


def test_reference_is_not_the_isotropic_one(setup):
    """The per-coordinate reference differs from treating the process as isotropic (the test can fail)."""
    proc, gm, den, z0, ref = setup
    iso = solve_reference(gm.denoise, z0.reshape(128, -1), logsnr_start=LO, logsnr_end=HI, rtol=1e-9, atol=1e-9)
    assert rms(iso.reshape(ref.shape), ref) > 0.05


def test_ddim_inverts_per_coordinate(setup):
    proc, _, den, z0, _ = setup
    grid = torch.linspace(LO, HI, 401, dtype=D64)
    x = get_sampler("dpmpp_2m")(den, z0[:32], grid, process=proc)
    assert rms(get_sampler("dpmpp_2m")(den, x, grid.flip(0), process=proc), z0[:32]) < 1e-3


def test_ddpm_reproduces_mixture_per_coordinate():
    proc, gm = Shifted(), _mixture()
    den = gm.denoise_for(proc)
    n, sch = 2000, get_schedule("cosine")
    g = _gen(11)

    def sw(a, b):
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        return float(sliced_wasserstein(a, b, num_projections=128, generator=_gen(0)))

    baseline = sum(sw(gm.sample(n, generator=g)[0], gm.sample(n, generator=g)[0]) for _ in range(3)) / 3
    bound = 2.0 * baseline

    def start():  # z at the first level: alpha x + sigma eps with alpha ~ 1e-3, drawn from the marginal
        x0 = gm.sample(n, generator=g)[0].reshape(n, *SHAPE)
        return proc.add_noise(x0, torch.randn(n, *SHAPE, generator=g, dtype=D64), lam=torch.tensor(LO, dtype=D64))

    x = get_sampler("ddpm")(den, start(), make_grid(sch, 1000), generator=g, process=proc)
    assert sw(x, gm.sample(n, generator=g)[0]) < bound
    x = get_sampler("ddim")(den, start(), make_grid(sch, 100), eta=1.0, generator=g, process=proc)
    assert sw(x, gm.sample(n, generator=g)[0]) < bound
    x = get_sampler("ddpm")(den, start(), make_grid(sch, 4), generator=g, process=proc)
    assert sw(x, gm.sample(n, generator=g)[0]) > bound  # the test can fail: 4 ancestral steps are visibly off


# ------------------------------------------------------------------------------------------------ refusals, registry
@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_3m", "unipc", "sde", "addim"])
def test_samplers_without_per_coordinate_form_refuse(name):
    proc = Shifted()
    den = _mixture().denoise_for(proc)
    with pytest.raises(ValueError, match=rf"^{name}: .*'shifted'") as err:
        get_sampler(name)(den, torch.zeros(2, *SHAPE, dtype=D64), lin_grid(3), process=proc)
    assert "\n" not in str(err.value)
    assert name in SAMPLERS


def test_error_balanced_grid_refuses():
    with pytest.raises(ValueError, match="error_balanced_grid: .*'shifted'"):
        error_balanced_grid(lambda z, lam: None, get_schedule("cosine"), 4, z=torch.zeros(1, 6), order=1,
                            process=Shifted())


def test_build_process_registry():
    sched = get_schedule("cosine")
    proc = build_process({"name": "isotropic"}, sched)
    assert isinstance(proc, IsotropicGaussian) and proc.schedule is sched and proc.isotropic
    assert isinstance(build_process(None, sched), IsotropicGaussian)
    assert proc.to_dict() == {"name": "isotropic"} and "isotropic" in PROCESSES
    with pytest.raises(ConfigError, match="unknown process 'blur'; valid: blurring, isotropic, masked, rolling"):
        build_process({"name": "blur"}, sched)
    with pytest.raises(ConfigError, match="process 'isotropic': bad parameters"):
        build_process({"name": "isotropic", "sigma": 2}, sched)


def test_coefficient_shape_errors_name_shapes():
    proc = Shifted()
    with pytest.raises(ValueError, match=r"shifted: coefficients of shape \(4, 2, 3\).*\(4, 6\)"):
        proc.add_noise(torch.zeros(4, 6, dtype=D64), torch.zeros(4, 6, dtype=D64), lam=torch.zeros(4, dtype=D64))


class _Backbone(torch.nn.Module):
    """A stand-in backbone ``w * z * cond_level`` that records what it was conditioned on."""

    num_classes = 0

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3, dtype=D64))
        self.seen = []

    def forward(self, z, logsnr, labels=None, context=None, context_mask=None):
        self.seen.append(logsnr)
        return self.w * z * logsnr.reshape(-1, *([1] * (z.dim() - 1)))


class _ImageShifted(Shifted):
    """:class:`Shifted` over images ``[B, 1, 2, 3]``, conditioning the backbone on ``lam / 2``."""

    def __init__(self, basis=None):
        super().__init__(basis)
        self.coef_shape = (1, *SHAPE)

    def log_alpha_sigma(self, lam):
        la, ls = super().log_alpha_sigma(lam)
        return la.unsqueeze(-3), ls.unsqueeze(-3)

    def net_cond(self, lam):
        return 0.5 * lam


def test_diffusion_model_uses_the_process():
    from simdiff.nets.denoiser import DiffusionModel

    z = torch.randn(3, 1, *SHAPE, generator=_gen(12), dtype=D64)
    lam = torch.tensor([-2.0, 0.0, 3.0], dtype=D64)
    for kind in ("x", "eps", "v"):
        plain, iso = DiffusionModel(_Backbone(), kind), DiffusionModel(_Backbone(), kind, process=IsotropicGaussian())
        a, b = plain(z, lam), iso(z, lam)
        assert all(torch.equal(a.get(v), b.get(v)) for v in ("x", "eps", "v"))
    proc = _ImageShifted(DCTBasis())
    net = _Backbone()
    model = DiffusionModel(net, "v", process=proc)
    out = model(z, lam)
    torch.testing.assert_close(net.seen[-1], 0.5 * lam, rtol=0, atol=0)
    ref = proc.to_output("v", 0.3 * z * (0.5 * lam).reshape(-1, 1, 1, 1), z=z, lam=lam)
    for view in ("x", "eps", "v"):
        torch.testing.assert_close(out.get(view), ref.get(view), rtol=0, atol=1e-12)


def test_registered_process_round_trips_its_parameters():
    class Offset(Shifted):
        name = "offset_test"

        def __init__(self, schedule, *, shift=0.0):
            super().__init__()
            self.schedule, self.b = schedule, self.b + shift

    PROCESSES["offset_test"] = Offset
    try:
        proc = build_process({"name": "offset_test", "shift": 0.5}, get_schedule("cosine"))
        assert proc.to_dict() == {"name": "offset_test", "shift": 0.5} and float(proc.b[0, 0]) == -0.5
        assert build_process(proc.to_dict(), proc.schedule).to_dict() == proc.to_dict()
    finally:
        del PROCESSES["offset_test"]


def test_per_frame_levels_broadcast_over_frames():
    """A level per frame ``lam [B, F]`` with ``coef_shape = ()`` acts on ``z [B, F, C, H, W]`` frame by frame."""
    proc = EqualLogSNR(())
    iso = IsotropicGaussian()
    g = _gen(13)
    x, eps = torch.randn(2, 3, 1, 2, 2, generator=g, dtype=D64), torch.randn(2, 3, 1, 2, 2, generator=g, dtype=D64)
    lam = torch.tensor([[-2.0, 0.0, 3.0], [1.0, -4.0, 0.5]], dtype=D64)
    z = proc.add_noise(x, eps, lam=lam)
    mean, var = proc.posterior(z_t=z, x=x, lam_s=lam + 1.0, lam_t=lam)
    for f in range(3):
        torch.testing.assert_close(z[:, f], iso.add_noise(x[:, f], eps[:, f], lam=lam[:, f]), rtol=0, atol=1e-14)
        m, v = iso.posterior(z_t=z[:, f], x=x[:, f], lam_s=lam[:, f] + 1.0, lam_t=lam[:, f])
        torch.testing.assert_close(mean[:, f], m, rtol=0, atol=1e-13)
        torch.testing.assert_close(var[:, f], v, rtol=0, atol=1e-14)
