"""UniPC bh1, EDM's stochastic sampler, the Brownian-tree noise source and the default "auto" grid, on exact
Gaussian-mixture denoisers (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from simdiff.samplers import (
    GRID_KINDS,
    get_sampler,
    make_grid,
    nfe,
    sample_dpmpp_2m_sde,
    sample_edm,
    sample_heun,
    solve_reference,
)
from simdiff.samplers.noise import BrownianTree, BrownianTreeNoise
from simdiff.samplers.policy import auto_end, logistic_levels
from simdiff.samplers.tuned import fit_grids
from simdiff.schedules import CosineSchedule, LinearBetaSchedule, ShiftedCosineSchedule, get_schedule
from simdiff.toy import GaussianMixture

F64 = torch.float64


@pytest.fixture(scope="module")
def smooth():
    gm = GaussianMixture.random(2, 4, seed=0, std=0.5)
    z = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    ref = solve_reference(gm, z, logsnr_start=-4.0, logsnr_end=4.0, rtol=1e-12, atol=1e-12)
    return gm, z, ref


def _slope(gm, z, ref, name, kw, ns=(16, 32)):
    errs = []
    for n in ns:
        x = get_sampler(name)(gm, z, torch.linspace(-4.0, 4.0, n + 1, dtype=F64), **kw)
        errs.append(float((gm.posterior_mean(x, torch.tensor(4.0, dtype=F64)) - ref).pow(2).mean().sqrt()))
    return math.log2(errs[0] / errs[1])


@pytest.mark.parametrize(("name", "kw", "lo", "hi"), [
    ("unipc", {"variant": "bh1", "order": 2}, 2.6, 3.4),  # UniP-2 + UniC: order 3 (measured 3.03)
    ("unipc", {"variant": "bh1", "order": 1}, 1.7, 2.4),  # UniP-1 + UniC: order 2
    ("unipc", {"variant": "bh1", "order": 3}, 3.0, 4.6),  # UniP-3 + UniC: order 4 nominal (measured 3.3)
    ("edm", {}, 1.8, 2.2),  # churn 0 = Heun, order 2 (measured 2.04)
])
def test_convergence_order(smooth, name, kw, lo, hi):
    gm, z, ref = smooth
    assert lo <= _slope(gm, z, ref, name, kw) <= hi


def test_unipc_bh1_differs_from_bh2_only_through_fixed_half(smooth):
    gm, z, _ = smooth
    g = torch.linspace(-4.0, 4.0, 9, dtype=F64)
    unipc = get_sampler("unipc")
    a, b = unipc(gm, z, g, variant="bh1", order=2), unipc(gm, z, g, variant="bh2", order=2)
    assert 1e-8 < float((a - b).abs().max()) < 1e-1
    with pytest.raises(ValueError, match="variant"):
        unipc(gm, z, g, variant="bh3")


def test_edm_churn_zero_is_heun_and_nfe():
    gm = GaussianMixture.random(2, 4, seed=1)
    z = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    grid = make_grid(CosineSchedule(), 6, kind="edm")
    assert torch.allclose(sample_edm(gm, z, grid), sample_heun(gm, z, grid), atol=1e-12, rtol=0)
    calls = []
    sample_edm(lambda zz, lam, **k: (calls.append(1), gm(zz, lam))[1], z, grid, churn=3.0,
               generator=torch.Generator().manual_seed(0))
    assert len(calls) == nfe("edm", 6) == 11
    with pytest.raises(ValueError, match="churn"):
        sample_edm(gm, z, grid, churn=-1.0)


def test_brownian_tree_additive_and_variance():
    tree = BrownianTree((4000,), p0=0.0, p1=2.0, seed=5, tol=1e-6)
    a, m, b = 0.3, 0.8, 1.7
    assert torch.allclose(tree.increment(a, m) + tree.increment(m, b), tree.increment(a, b), atol=1e-12, rtol=0)
    assert torch.allclose(tree(b) - tree(a), tree.increment(a, b), atol=1e-12, rtol=0)
    for lo, hi in ((0.3, 1.7), (0.5, 0.5 + 1 / 64), (1.0, 2.0)):
        var = float(tree.increment(lo, hi).var())
        assert abs(var / (hi - lo) - 1) < 0.08  # 4000 draws: sd of the ratio ~ 0.022
    # the same path queried in another order / from a fresh tree with the same seed
    fresh = BrownianTree((4000,), p0=0.0, p1=2.0, seed=5, tol=1e-6)
    assert torch.equal(fresh(1.1), tree(1.1))
    other = BrownianTree((4000,), p0=0.0, p1=2.0, seed=6, tol=1e-6)
    assert abs(float(torch.corrcoef(torch.stack([other(1.1), tree(1.1)]))[0, 1])) < 0.08


def test_brownian_tree_clock_gives_variance_in_clock():
    tree = BrownianTree((4000,), p0=-3.0, p1=3.0, clock=math.exp, seed=1)
    var = float(tree.increment(0.0, 1.0).var())
    assert abs(var / (math.e - 1) - 1) < 0.08


def test_stochastic_samplers_converge_with_brownian_tree():
    """The same Brownian path at every grid: successive refinements get closer (i.i.d. noise does not)."""
    gm = GaussianMixture.random(2, 4, seed=0, std=0.3)
    sch = CosineSchedule()
    z = torch.randn(128, 2, dtype=F64, generator=torch.Generator().manual_seed(0))

    def runs(sampler, source, **kw):
        out = []
        for n in (32, 64, 128):
            noise = BrownianTreeNoise(logsnr_min=sch.logsnr_min, logsnr_max=sch.logsnr_max, seed=3) if source else None
            out.append(sampler(gm, z, make_grid(sch, n, kind="uniform_logsnr"), noise=noise,
                               generator=torch.Generator().manual_seed(n), **kw))
        return [float((out[i + 1] - out[i]).norm(dim=1).median()) for i in range(2)]

    for sampler, kw in ((sample_dpmpp_2m_sde, {}), (sample_edm, {"churn": 5.0})):
        d_bt, d_iid = runs(sampler, True, **kw), runs(sampler, False, **kw)
        assert d_bt[1] < 0.7 * d_bt[0]
        assert d_bt[1] < 0.25 * d_iid[1]


SCHEDULES = [LinearBetaSchedule(), LinearBetaSchedule(beta_start=0.00085, beta_end=0.012,
                                                      beta_schedule="scaled_linear"),
             LinearBetaSchedule(beta_schedule="squaredcos_cap_v2"), ShiftedCosineSchedule(image_size=64, noise_size=32),
             CosineSchedule(), get_schedule("edm")]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: getattr(s, "beta_schedule", s.name))
def test_auto_grid_properties(schedule):
    assert "auto" in GRID_KINDS
    for steps in (1, 2, 3, 4, 5, 8, 10, 20, 50, 200):
        g = make_grid(schedule, steps, kind="auto")
        assert g.dtype == F64 and g.shape == (steps + 1,)
        assert g[-1] == math.inf and g[0] == schedule.logsnr_min
        assert bool((torch.diff(g[:-1]) > 0).all())
        if steps >= 2:
            assert g[-2] == pytest.approx(min(schedule.logsnr_max, auto_end(schedule, steps)))
            assert g[-2] <= schedule.logsnr_max


def test_logistic_levels_equal_mass():
    lam = logistic_levels(-10.0, 8.0, 9, mu=2.0, scale=2.5)
    mass = torch.diff(torch.sigmoid((lam - 2.0) / 2.5))
    assert torch.allclose(mass, mass.mean().expand_as(mass), rtol=1e-9, atol=0)
    with pytest.raises(ValueError):
        logistic_levels(1.0, 0.0, 4)


def test_fit_grids_monotone_in_calls_and_beats_fixed():
    gm = GaussianMixture.random(2, 8, seed=0, std=0.1)
    sch = LinearBetaSchedule()
    g = torch.Generator().manual_seed(0)
    z, zv, zt = (torch.randn(64, 2, dtype=F64, generator=g) for _ in range(3))

    def ref(zz):
        return solve_reference(gm, zz, logsnr_start=sch.logsnr_min, logsnr_end=30.0, rtol=1e-8, atol=1e-8)

    fits = fit_grids(gm, "unipc", sch, [3, 4, 5], z=z, reference=ref(z), val_z=zv, val_reference=ref(zv), iters=8)
    errs = [fits[k][1] for k in (3, 4, 5)]
    assert errs[0] >= errs[1] >= errs[2]
    unipc = get_sampler("unipc")
    rt = ref(zt)
    for k in (3, 4, 5):
        grid = fits[k][0]
        assert grid.shape == (k + 1,) and grid[-1] == math.inf and bool((torch.diff(grid[:-1]) > 0).all())
        tuned = float((unipc(gm, zt, grid) - rt).pow(2).mean().sqrt())
        fixed = float((unipc(gm, zt, make_grid(sch, k, kind="uniform_t")) - rt).pow(2).mean().sqrt())
        assert tuned < fixed  # held-out batch: the fit generalises


def test_tuned_grid_cache_roundtrip(tmp_path):
    from simdiff.samplers.tune_cli import grid_key, load_tuned_grid, save_tuned_grid

    grid = make_grid(CosineSchedule(), 5, kind="auto")
    key = grid_key("unipc", 5, 0.0)
    assert load_tuned_grid(tmp_path, key) is None
    save_tuned_grid(tmp_path, key, grid, val_rmse=0.1)
    assert torch.equal(load_tuned_grid(tmp_path, key), grid)
    (tmp_path / "tuned_grids.json").write_text('{"unipc/5/0": {"logsnrs": [1.0, 0.0, "inf"]}}')
    with pytest.raises(ValueError, match="increasing"):
        load_tuned_grid(tmp_path, key)
    (tmp_path / "tuned_grids.json").write_text("not json")
    with pytest.raises(ValueError, match="JSON"):
        load_tuned_grid(tmp_path, key)
