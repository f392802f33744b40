"""Schedules: endpoints, exact inverses, analytic derivatives, shifts/interpolation formulas, diffusers agreement."""

from __future__ import annotations

import json
import math

import pytest
import torch

from simdiff.configuration import ConfigError
from simdiff.schedules import (
    SCHEDULES,
    CosineSchedule,
    EDMSchedule,
    InterpolatedCosineSchedule,
    LinearBetaSchedule,
    ShiftedCosineSchedule,
    get_schedule,
    logsnr_from_sigma,
    schedule_from_dict,
    sigma_from_logsnr,
)

F64 = torch.float64

ALL = [
    CosineSchedule(),
    CosineSchedule(-20.0, 20.0),
    ShiftedCosineSchedule(128),
    ShiftedCosineSchedule(128, noise_size=32, clip="keep_range"),
    ShiftedCosineSchedule(16, noise_size=64),  # upward shift
    InterpolatedCosineSchedule(512),
    InterpolatedCosineSchedule(512, order="lucidrains"),
    InterpolatedCosineSchedule(256, clip="keep_range"),
    InterpolatedCosineSchedule(256, order="lucidrains", clip="keep_range"),
    LinearBetaSchedule(),
    LinearBetaSchedule(0.00085, 0.012, beta_schedule="scaled_linear"),
    LinearBetaSchedule(beta_schedule="squaredcos_cap_v2", num_train_timesteps=200),
    EDMSchedule(),
]
IDS = [f"{s.name}-{i}" for i, s in enumerate(ALL)]

T_GRID = torch.cat(
    [
        torch.tensor([0.0, 1e-12, 1e-9, 1e-6, 1e-3], dtype=F64),
        torch.linspace(0, 1, 257, dtype=F64)[1:-1],
        torch.tensor([1 - 1e-3, 1 - 1e-6, 1 - 1e-9, 1 - 1e-12, 1.0], dtype=F64),
    ]
)


@pytest.mark.parametrize("s", ALL, ids=IDS)
def test_inverse_round_trip_and_monotone(s):
    lam = s.logsnr(T_GRID)
    assert torch.isfinite(lam).all()
    assert (lam[1:] < lam[:-1]).all(), "logsnr must be strictly decreasing in t"
    torch.testing.assert_close(s.t_from_logsnr(lam), T_GRID, atol=1e-10, rtol=0)
    # logsnr -> t -> logsnr over the whole range, and clamping outside it
    lam_grid = torch.linspace(s.logsnr_min, s.logsnr_max, 301, dtype=F64)
    torch.testing.assert_close(s.logsnr(s.t_from_logsnr(lam_grid)), lam_grid, atol=1e-9, rtol=0)
    out = s.t_from_logsnr(torch.tensor([s.logsnr_max + 5, s.logsnr_min - 5, math.inf, -math.inf], dtype=F64))
    assert out.tolist() == [0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("s", ALL, ids=IDS)
def test_endpoints(s):
    ends = s.logsnr(torch.tensor([0.0, 1.0], dtype=F64))
    assert ends[0].item() == pytest.approx(s.logsnr_max, abs=1e-12)
    assert ends[1].item() == pytest.approx(s.logsnr_min, abs=1e-12)
    assert s.logsnr_min < s.logsnr_max


def test_endpoint_values():
    assert CosineSchedule().logsnr(torch.tensor([0.0, 1.0], dtype=F64)).tolist() == pytest.approx([15, -15], abs=1e-12)
    sh = 2 * math.log(64 / 128)
    assert ShiftedCosineSchedule(128).logsnr_max == pytest.approx(15 + sh, abs=1e-12)
    assert ShiftedCosineSchedule(128).logsnr_min == pytest.approx(-15 + sh, abs=1e-12)
    keep = ShiftedCosineSchedule(128, clip="keep_range")
    assert (keep.logsnr_min, keep.logsnr_max) == pytest.approx((-15, 15), abs=1e-12)
    edm = EDMSchedule()
    assert (edm.logsnr_max, edm.logsnr_min) == pytest.approx((-2 * math.log(0.002), -2 * math.log(80.0)), abs=1e-12)
    lb = LinearBetaSchedule()
    acp = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0)
    assert (lb.logsnr_max, lb.logsnr_min) == pytest.approx(
        (math.log(acp[0] / (1 - acp[0])), math.log(acp[-1] / (1 - acp[-1]))), rel=1e-12
    )


@pytest.mark.parametrize("s", ALL, ids=IDS)
def test_derivative_matches_autograd_and_finite_differences(s):
    # off-grid points for the piecewise-linear schedule (its derivative jumps at grid points)
    t = torch.linspace(0.0013, 0.9987, 97, dtype=F64).requires_grad_(True)
    (g,) = torch.autograd.grad(s.logsnr(t).sum(), t)
    d = s.dlogsnr_dt(t.detach())
    assert (d < 0).all()
    torch.testing.assert_close(d, g, rtol=1e-10, atol=1e-10)
    h = 1e-7
    fd = (s.logsnr(t.detach() + h) - s.logsnr(t.detach() - h)) / (2 * h)
    torch.testing.assert_close(d, fd, rtol=1e-5, atol=1e-5)


def test_cosine_closed_form_and_derivative_near_ends():
    s = CosineSchedule(-20.0, 20.0)
    tmin, tmax = math.atan(math.exp(-10)), math.atan(math.exp(10))
    t = torch.tensor([0.0, 1e-8, 0.25, 0.5, 1 - 1e-8, 1.0], dtype=F64)
    u = tmin + t * (tmax - tmin)
    torch.testing.assert_close(s.logsnr(t), -2 * torch.log(torch.tan(u)), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s.dlogsnr_dt(t), -4 * (tmax - tmin) / torch.sin(2 * u), rtol=1e-7, atol=0)


def test_float32_dtype_device_and_batch_shapes():
    t64 = torch.rand(3, 5, dtype=F64)
    for s in ALL:
        t32 = t64.float()
        lam32 = s.logsnr(t32)
        assert lam32.dtype == torch.float32 and lam32.shape == (3, 5)
        assert s.dlogsnr_dt(t32).dtype == torch.float32
        back = s.t_from_logsnr(lam32)
        assert back.dtype == torch.float32 and back.shape == (3, 5)
        torch.testing.assert_close(lam32.double(), s.logsnr(t64), atol=2e-5 * 20, rtol=1e-5)
        torch.testing.assert_close(back, t32, atol=1e-4, rtol=0)


def test_shifted_is_base_plus_shift_exactly():
    t = torch.linspace(0, 1, 101, dtype=F64)
    for image, noise in [(128, 64), (512, 32), (16, 64)]:
        s = ShiftedCosineSchedule(image, noise_size=noise, clip_min=-12.0, clip_max=14.0)
        shift = 2 * math.log(noise / image)
        assert torch.equal(s.logsnr(t), CosineSchedule(-12.0, 14.0).logsnr(t) + shift)
        assert torch.equal(s.dlogsnr_dt(t), CosineSchedule(-12.0, 14.0).dlogsnr_dt(t))
        assert s.logsnr_min == pytest.approx(-12 + shift, abs=1e-12)
    # keep_range: same range as the base, but the same shape as a shifted cosine (equal to base + shift at t=0.5
    # only approximately); it equals the cosine on the moved range plus the shift, exactly
    k = ShiftedCosineSchedule(512, noise_size=64, clip="keep_range")
    sh = 2 * math.log(64 / 512)
    assert torch.equal(k.logsnr(t), CosineSchedule(-15 - sh, 15 - sh).logsnr(t) + sh)
    # noise_size == image_size: no shift for either convention
    for clip in ("shift_range", "keep_range"):
        assert torch.equal(ShiftedCosineSchedule(64, clip=clip).logsnr(t), CosineSchedule().logsnr(t))


def test_interpolated_formula_and_orders():
    t = torch.linspace(0, 1, 65, dtype=F64)
    lo, hi = ShiftedCosineSchedule(512, noise_size=32), ShiftedCosineSchedule(512, noise_size=256)
    paper = InterpolatedCosineSchedule(512)
    luc = InterpolatedCosineSchedule(512, order="lucidrains")
    torch.testing.assert_close(paper.logsnr(t), t * hi.logsnr(t) + (1 - t) * lo.logsnr(t), rtol=0, atol=1e-14)
    torch.testing.assert_close(luc.logsnr(t), t * lo.logsnr(t) + (1 - t) * hi.logsnr(t), rtol=0, atol=1e-14)
    # paper: t=0 follows the low (noisier) shift, t=1 the high one; lucidrains the reverse
    assert paper.logsnr_max == pytest.approx(lo.logsnr_max) and paper.logsnr_min == pytest.approx(hi.logsnr_min)
    assert luc.logsnr_max == pytest.approx(hi.logsnr_max) and luc.logsnr_min == pytest.approx(lo.logsnr_min)
    # they agree at t = 1/2 and differ elsewhere: lucidrains' is cleaner for t < 1/2 and noisier for t > 1/2
    mid = torch.tensor([0.5], dtype=F64)
    torch.testing.assert_close(paper.logsnr(mid), luc.logsnr(mid))
    assert (luc.logsnr(t[1:32]) > paper.logsnr(t[1:32])).all() and (luc.logsnr(t[33:]) < paper.logsnr(t[33:])).all()


def test_interpolated_monotone_numerically_and_rejects_non_monotone():
    t = torch.linspace(0, 1, 20001, dtype=F64)
    for kw in [{}, {"order": "lucidrains"}, {"clip": "keep_range"}, {"order": "lucidrains", "clip": "keep_range"}]:
        lam = InterpolatedCosineSchedule(512, **kw).logsnr(t)
        assert (lam[1:] < lam[:-1]).all(), kw
    # paper order with a >23x noise-size ratio rises in the middle (the size shift outweighs the cosine's slope)
    with pytest.raises(ConfigError, match="not monotone.*order='lucidrains'"):
        InterpolatedCosineSchedule(1024, noise_size_low=16, noise_size_high=1024)
    # the swapped order stays monotone for the same sizes
    lam = InterpolatedCosineSchedule(1024, noise_size_low=16, noise_size_high=1024, order="lucidrains").logsnr(t)
    assert (lam[1:] < lam[:-1]).all()


def test_interpolated_inverse_is_differentiable():
    s = InterpolatedCosineSchedule(512)
    lam = torch.tensor([-10.0, 0.0, 5.0], dtype=F64, requires_grad=True)
    t = s.t_from_logsnr(lam)
    (g,) = torch.autograd.grad(t.sum(), lam)
    torch.testing.assert_close(g, 1 / s.dlogsnr_dt(t.detach()), rtol=1e-8, atol=0)


@pytest.mark.parametrize(
    "kw",
    [
        {"beta_schedule": "linear"},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
    ],
)
def test_linear_beta_matches_diffusers(kw):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, **kw).alphas_cumprod.double()
    s = LinearBetaSchedule(num_train_timesteps=1000, **kw)
    acp = s.alphas_cumprod()
    assert acp.dtype == F64 and acp.shape == (1000,)
    torch.testing.assert_close(acp, ref, rtol=2e-5, atol=1e-6)  # diffusers accumulates in float32
    i = torch.arange(1000)
    torch.testing.assert_close(torch.sigmoid(s.logsnr_from_timestep(i)), ref, rtol=2e-5, atol=1e-6)


def test_linear_beta_timesteps_exact_and_piecewise_linear():
    s = LinearBetaSchedule()
    i = torch.arange(1000, dtype=F64)
    lam = s.logsnr_from_timestep(i)
    assert torch.equal(s.timestep_from_logsnr(lam), i)  # exact on the grid
    torch.testing.assert_close(s.logsnr(i / 999), lam, rtol=0, atol=1e-12)  # t = i / (N - 1)
    mid = s.logsnr_from_timestep(torch.tensor([10.25, 500.5], dtype=F64))
    torch.testing.assert_close(mid, torch.stack([0.75 * lam[10] + 0.25 * lam[11], 0.5 * lam[500] + 0.5 * lam[501]]))
    torch.testing.assert_close(s.timestep_from_logsnr(mid), torch.tensor([10.25, 500.5], dtype=F64))
    assert s.timestep_from_logsnr(torch.tensor([100.0, -100.0], dtype=F64)).tolist() == [0.0, 999.0]
    assert s.logsnr_from_timestep(torch.tensor([3, 7])).dtype == F64


def test_edm_closed_form_and_sigma_helpers():
    s = EDMSchedule()
    t = torch.linspace(0, 1, 11, dtype=F64)
    a, b = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    sigma = (a + t * (b - a)) ** 7
    torch.testing.assert_close(sigma_from_logsnr(s.logsnr(t)), sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(logsnr_from_sigma(sigma), s.logsnr(t), rtol=0, atol=1e-12)
    # sigma_edm = sigma_vp / alpha_vp
    lam = torch.linspace(-10, 10, 7, dtype=F64)
    torch.testing.assert_close(sigma_from_logsnr(lam), (torch.sigmoid(-lam) / torch.sigmoid(lam)).sqrt())


@pytest.mark.parametrize("s", ALL, ids=IDS)
def test_dict_round_trip(s):
    d = s.to_dict()
    assert d["name"] == s.name and d["name"] in SCHEDULES
    d2 = json.loads(json.dumps(d))
    s2 = schedule_from_dict(d2)
    assert s2 == s and type(s2) is type(s)
    t = torch.linspace(0, 1, 9, dtype=F64)
    assert torch.equal(s2.logsnr(t), s.logsnr(t))


def test_get_schedule_and_errors():
    assert get_schedule("cosine") == CosineSchedule()
    assert get_schedule("shifted_cosine", image_size=128, noise_size=32) == ShiftedCosineSchedule(128, 32)
    assert get_schedule("edm", sigma_max=10) == EDMSchedule(sigma_max=10.0)  # int coerced
    with pytest.raises(ConfigError, match="unknown schedule 'cosin'; valid: cosine, edm, interpolated_cosine"):
        get_schedule("cosin")
    with pytest.raises(ConfigError, match="foo.*valid keys.*logsnr_max, logsnr_min"):
        get_schedule("cosine", foo=1.0)
    with pytest.raises(ConfigError, match="image_size"):
        get_schedule("shifted_cosine")
    with pytest.raises(ConfigError, match="name"):
        schedule_from_dict({"logsnr_min": -3.0})
    with pytest.raises(ConfigError, match="beta_schedule.*sigmoid.*squaredcos_cap_v2"):
        get_schedule("linear_beta", beta_schedule="sigmoid")
    with pytest.raises(ConfigError, match="clip"):
        ShiftedCosineSchedule(64, clip="nope")
    with pytest.raises(ConfigError, match="logsnr_min < logsnr_max"):
        CosineSchedule(5.0, -5.0)
