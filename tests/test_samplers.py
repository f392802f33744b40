"""Samplers on the exact Gaussian-mixture denoiser (float64): convergence orders vs a DOP853 reference,
identities between samplers, ancestral sampling in distribution, inversion, API errors."""

import math

import pytest
import torch

from simdiff.process import to_output
from simdiff.samplers import SAMPLERS, get_sampler, make_grid, nfe, solve_reference
from simdiff.schedules import get_schedule
from simdiff.toy import GaussianMixture, sliced_wasserstein

LO, HI = -15.0, 8.0  # convergence grids: uniform in logsnr on [LO, HI], then +inf (= x_hat at HI, as the reference)


@pytest.fixture(scope="module")
def gm():
    return GaussianMixture.random(2, 8, seed=0, std=0.4)


@pytest.fixture(scope="module")
def z0():
    return torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.fixture(scope="module")
def ref(gm, z0):
    return solve_reference(gm.denoise, z0, logsnr_start=LO, logsnr_end=HI, rtol=1e-11, atol=1e-11)


def lin_grid(n, lo=LO, hi=HI):
    return torch.cat([torch.linspace(lo, hi, n, dtype=torch.float64), torch.tensor([math.inf], dtype=torch.float64)])


def rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


# (name, coarse steps, fine steps, slope bounds, max error at the fine grid). Measured slopes (32->128 or 64->256):
# ddim/euler 0.99, heun 2.02, dpmpp_2m 2.03, dpmpp_3m 3.0, unipc 4.0 (UniC lifts order-3 UniP by one).
ORDERS = [
    ("ddim", 64, 256, (0.8, 1.3), 5e-2),
    ("euler", 64, 256, (0.8, 1.3), 5e-2),
    ("heun", 32, 128, (1.7, 2.4), 5e-3),
    ("dpmpp_2m", 32, 128, (1.7, 2.4), 2e-3),
    ("dpmpp_3m", 32, 128, (2.5, 3.6), 3e-4),
    ("unipc", 32, 128, (3.0, 4.6), 5e-5),
]


@pytest.mark.parametrize("name,n1,n2,bounds,max_err", ORDERS, ids=[o[0] for o in ORDERS])
def test_convergence_order(gm, z0, ref, name, n1, n2, bounds, max_err):
    sampler = get_sampler(name)
    e1 = rms(sampler(gm.denoise, z0, lin_grid(n1)), ref)
    e2 = rms(sampler(gm.denoise, z0, lin_grid(n2)), ref)
    slope = math.log(e1 / e2) / math.log(n2 / n1)
    assert bounds[0] <= slope <= bounds[1], (name, e1, e2, slope)
    assert e2 < max_err


def test_euler_is_ddim(gm, z0):
    grid = lin_grid(12)
    torch.testing.assert_close(get_sampler("euler")(gm.denoise, z0, grid), get_sampler("ddim")(gm.denoise, z0, grid),
                               rtol=1e-9, atol=1e-9)


def test_sde_eta0_is_dpmpp_2m(gm, z0):
    grid = lin_grid(10)
    a = get_sampler("sde")(gm.denoise, z0, grid, eta=0.0)
    torch.testing.assert_close(a, get_sampler("dpmpp_2m")(gm.denoise, z0, grid), rtol=1e-12, atol=1e-12)


def test_unipc_order1_is_ddim_plus_corrector(gm, z0):
    # order 1 without its (skipped) final corrector on a 2-step grid is exactly one DDIM step then x_hat
    grid = lin_grid(2, -2.0, 1.0)
    torch.testing.assert_close(get_sampler("unipc")(gm.denoise, z0, grid, order=1),
                               get_sampler("ddim")(gm.denoise, z0, grid), rtol=1e-12, atol=1e-12)


def test_ddim_eta1_equals_ddpm_small(gm, z0):
    grid = make_grid(get_schedule("cosine"), 20)
    a = get_sampler("ddim")(gm.denoise, z0, grid, eta=1.0, generator=torch.Generator().manual_seed(5))
    b = get_sampler("ddpm")(gm.denoise, z0, grid, variance="small", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    c = get_sampler("ddim")(gm.denoise, z0, grid, eta=1.0, generator=torch.Generator().manual_seed(6))
    assert rms(a, c) > 1e-2  # the noise really is used


def test_ddim_round_trip(gm):
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    errs = []
    for n in (400, 800):
        grid = torch.linspace(LO, HI, n + 1, dtype=torch.float64)
        x = get_sampler("ddim")(gm.denoise, z, grid)
        errs.append(rms(get_sampler("ddim")(gm.denoise, x, grid.flip(0)), z))
    assert errs[1] < 0.02  # measured 0.009
    assert 1.7 < errs[0] / errs[1] < 2.4  # first order in the step (measured 1.99)


def test_ancestral_reproduces_mixture(gm):
    n, sch = 2000, get_schedule("cosine")
    g = torch.Generator().manual_seed(3)

    def sw(a, b):
        return float(sliced_wasserstein(a, b, num_projections=128, generator=torch.Generator().manual_seed(0)))

    baseline = sum(sw(gm.sample(n, generator=g)[0], gm.sample(n, generator=g)[0]) for _ in range(3)) / 3
    bound = 2.0 * baseline  # two fresh sets of the same size differ by ~baseline; allow sampling noise on top
    ddpm = get_sampler("ddpm")
    x = ddpm(gm.denoise, torch.randn(n, 2, generator=g, dtype=torch.float64), make_grid(sch, 1000), generator=g)
    assert sw(x, gm.sample(n, generator=g)[0]) < bound
    x = get_sampler("sde")(gm.denoise, torch.randn(n, 2, generator=g, dtype=torch.float64), make_grid(sch, 100),
                           generator=g)
    assert sw(x, gm.sample(n, generator=g)[0]) < bound
    x = ddpm(gm.denoise, torch.randn(n, 2, generator=g, dtype=torch.float64), make_grid(sch, 5), generator=g)
    assert sw(x, gm.sample(n, generator=g)[0]) > bound  # the test can fail: 5 ancestral steps are visibly off


def test_ddpm_large_variance_differs_and_ends_clean(gm, z0):
    """Both variances end clean: the output is the x-prediction at the last finite grid point, no noise added."""
    grid = make_grid(get_schedule("cosine"), 30)
    out, last_z = {}, {}
    for variance in ("large", "small"):
        seen = []
        out[variance] = get_sampler("ddpm")(gm.denoise, z0, grid, variance=variance, callback=seen.append,
                                            generator=torch.Generator().manual_seed(1))
        last_z[variance] = seen[-2]["z"]  # the state at the last finite log-SNR, grid[-2]
        assert math.isinf(float(seen[-1]["logsnr"])) and torch.equal(seen[-1]["z"], out[variance])
        x_hat = gm.denoise(last_z[variance], grid[-2].expand(z0.shape[0])).x
        torch.testing.assert_close(out[variance], x_hat, rtol=0, atol=1e-12)
    a, b = out["large"], out["small"]
    assert a.shape == z0.shape and torch.isfinite(a).all() and rms(a, b) > 1e-3
    # an ancestral step to the last finite point still adds visible noise, so ending on x_hat is a real choice
    assert rms(last_z["small"], out["small"]) > 1e-3


# The one-step generator student takes ``g(z, **cond)``, not a denoiser; its contract is tested with the students.
DENOISER_SAMPLERS = sorted(n for n in SAMPLERS if n != "generator")


@pytest.mark.parametrize("name", DENOISER_SAMPLERS)
def test_common_contract(gm, name):
    """dtype kept, callback per step, cond forwarded, no grad needed, NFE as advertised."""
    cgm = GaussianMixture.random(2, 4, seed=1, std=0.3, num_classes=2)
    labels = torch.tensor([0, 1, 0, 1])
    calls, seen = [], []

    def denoise(z, logsnr, **cond):
        calls.append(logsnr)
        assert logsnr.shape == (z.shape[0],) and torch.equal(cond["labels"], labels)
        return cgm.denoise(z, logsnr, labels=cond["labels"])

    steps = 6
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    out = get_sampler(name)(denoise, z, make_grid(get_schedule("cosine"), steps), generator=torch.Generator(),
                            callback=seen.append, cond={"labels": labels})
    assert out.dtype == torch.float32 and out.shape == z.shape and torch.isfinite(out).all()
    assert len(calls) == nfe(name, steps)
    assert [d["i"] for d in seen] == list(range(steps))
    assert set(seen[0]) == {"i", "z", "x", "logsnr"} and math.isinf(float(seen[-1]["logsnr"]))
    torch.testing.assert_close(seen[-1]["z"], out)


def test_float32_state_tracks_float64(gm, z0):
    grid = make_grid(get_schedule("cosine"), 10)
    a = get_sampler("dpmpp_2m")(gm.denoise, z0.float(), grid)
    b = get_sampler("dpmpp_2m")(gm.denoise, z0, grid)
    assert a.dtype == torch.float32 and rms(a.double(), b) < 1e-4


def test_inversion_other_solvers(gm):
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grid = torch.linspace(LO, HI, 201, dtype=torch.float64)
    for name in ("dpmpp_2m", "unipc", "heun"):
        x = get_sampler(name)(gm.denoise, z, grid)
        assert rms(get_sampler(name)(gm.denoise, x, grid.flip(0)), z) < 1e-3, name


def test_reference_agrees_with_itself(gm, z0, ref):
    loose = solve_reference(gm.denoise, z0, logsnr_start=LO, logsnr_end=HI, rtol=1e-8, atol=1e-8)
    assert rms(loose, ref) < 1e-6


def test_errors(gm, z0):
    with pytest.raises(ValueError, match="valid: .*ddim"):
        get_sampler("nope")
    assert nfe("heun", 10) == 19 and nfe("unipc", 10) == 10
    ddim = get_sampler("ddim")
    with pytest.raises(ValueError, match="strictly increasing"):
        ddim(gm.denoise, z0, torch.tensor([-5.0, 0.0, -1.0, math.inf], dtype=torch.float64))
    with pytest.raises(ValueError, match="monotone"):
        ddim(gm.denoise, z0, torch.tensor([-5.0, 0.0, -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="last"):
        ddim(gm.denoise, z0, torch.tensor([-5.0, math.inf, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="increasing"):
        get_sampler("ddpm")(gm.denoise, z0, torch.tensor([1.0, -5.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="eta"):
        ddim(gm.denoise, z0, lin_grid(3), eta=1.5)
    with pytest.raises(ValueError, match=r"\(256, 2\)"):
        ddim(_wrong_shape, z0, lin_grid(3))


def _wrong_shape(z, logsnr):
    pred = torch.zeros(z.shape[0], 3, dtype=z.dtype)
    return to_output("x", pred, z=pred, logsnr=logsnr)


def test_host_level_passed_to_denoisers_that_ask():
    """A denoiser with ``wants_host_level`` gets the float64 grid value as a Python float at every call."""
    gm = GaussianMixture.random(2, 3, seed=2)
    grid = make_grid(get_schedule("cosine"), 5)
    got = []

    class Wants:
        wants_host_level = True

        def __call__(self, z, logsnr, host_level=None, **cond):
            got.append(host_level)
            return gm.denoise(z, logsnr)

    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    out = get_sampler("dpmpp_2m")(Wants(), z, grid)
    assert all(type(v) is float for v in got) and got == grid[:-1].tolist()
    torch.testing.assert_close(out, get_sampler("dpmpp_2m")(gm.denoise, z, grid), rtol=0, atol=0)


def test_registry_knows_which_samplers_have_a_per_coordinate_form():
    from simdiff.processes import DCTBasis, GaussianProcess
    from simdiff.samplers import PER_COORDINATE, STOCHASTIC, check_process

    class Tilted(GaussianProcess):
        name = "tilted"

        def log_alpha_sigma(self, lam):
            lev = lam[..., None, None] + torch.tensor([[0.0, 1.0], [-1.0, 2.0]], dtype=lam.dtype)
            return 0.5 * torch.nn.functional.logsigmoid(lev), 0.5 * torch.nn.functional.logsigmoid(-lev)

    proc = Tilted(basis=DCTBasis())
    for name in SAMPLERS:
        check_process(name, None)  # the isotropic default: every sampler
        if name in PER_COORDINATE:
            check_process(name, proc)
        else:
            with pytest.raises(ValueError, match=f"{name}: sampler has no per-coordinate form"):
                check_process(name, proc)
    assert {"ddpm", "sde", "moment_matching", "moment_matching_large", "guided_stochastic"} <= STOCHASTIC
    assert nfe("generator", 4) == 1 and nfe("heun", 4) == 7 and nfe("ddim", 4) == 4
