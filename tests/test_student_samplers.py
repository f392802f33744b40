"""Student samplers (moment matching, one-step generator, guided stochastic) as registered samplers.

The reference loops below are transcriptions of the samplers these replace (the moment-matching loop that
``simdiff sample`` used and the guided-distillation stochastic sampler on its own uniform-t levels); the registered
samplers must reproduce them bit for bit on the exact Gaussian-mixture denoiser.
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import pytest
import torch

from simdiff.process import alpha_sigma, ddim_step, ddpm_step, to_output
from simdiff.samplers import SAMPLERS, get_sampler, make_grid
from simdiff.samplers.students import (
    sample_generator,
    sample_guided_stochastic,
    sample_moment_matching,
    sample_moment_matching_large,
)
from simdiff.schedules import CosineSchedule
from simdiff.toy import GaussianMixture

SCHED = CosineSchedule()
NC = 3
GM = GaussianMixture.random(6, 6, num_classes=NC, std=0.3, seed=1)


class Counting:
    """The exact class-conditional mixture denoiser; ``guidance=w`` gives the CFG combination; counts calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, z, logsnr, labels=None, guidance=None):
        self.calls += 1
        # The mixture's float64 posterior mean differs in the last ulp between an expanded (stride-0) and a
        # contiguous logsnr of equal values; samplers pass either, so compare them on equal memory layouts.
        logsnr = logsnr.contiguous()
        x = GM.posterior_mean(z, logsnr, labels)
        if guidance is not None:
            w = guidance.reshape(-1, *([1] * (z.dim() - 1))).to(z.dtype)
            x = (1 + w) * x - w * GM.posterior_mean(z, logsnr)
        return to_output("x", x.to(z.dtype), z=z, logsnr=logsnr)


def _old_moment_matching(denoise, z, logsnrs, *, generator, cond, variance):
    cond, lam = dict(cond or {}), logsnrs.to(device=z.device, dtype=z.dtype)
    x = z
    for i in range(lam.shape[0] - 1):
        lt = lam[i].expand(z.shape[0])
        x = denoise(z, lt, **cond).x.to(z.dtype)
        if i + 2 < lam.shape[0]:
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = ddpm_step(z_t=z, x=x, logsnr_s=lam[i + 1].expand(z.shape[0]), logsnr_t=lt, noise=noise,
                          variance=variance)
    return x


def _old_guided_stochastic(denoise, z, schedule, steps, *, generator, cond):
    b = z.shape[0]

    def lam_at(t):
        val = math.inf if t <= 0 else float(schedule.logsnr(torch.tensor(t, dtype=torch.float64)))
        return torch.full((b,), val, dtype=z.dtype, device=z.device)

    for i in range(steps, 0, -1):
        lt = lam_at(i / steps)
        x = denoise(z, lt, **cond).x.to(z.dtype)
        if i == 1:
            return x
        lr, lu = lam_at((i - 2) / steps), lam_at((i - 1) / steps)
        z_r = x if i == 2 else ddim_step(z_t=z, x=x, logsnr_s=lr, logsnr_t=lt)
        a_u, s_u = alpha_sigma(lu[:, None])
        a_r, _ = alpha_sigma(lr[:, None])
        keep = (-torch.expm1(lu - lr))[:, None].clamp_min(0).sqrt()
        pad = (b,) + (1,) * (z.dim() - 1)
        z = (a_u / a_r).reshape(pad) * z_r + (s_u * keep).reshape(pad) * torch.randn(
            tuple(z.shape), generator=generator, dtype=z.dtype)
    return z


def _old_levels(steps):
    """The old sampler's levels ``logsnr(i / N)``, ``i = N..1``, then +inf."""
    lam = [float(SCHED.logsnr(torch.tensor(i / steps, dtype=torch.float64))) for i in range(steps, 0, -1)]
    return torch.tensor([*lam, math.inf], dtype=torch.float64)


def _z(b=5, dtype=torch.float64, seed=0):
    return torch.randn(b, 2, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("name, variance", [("moment_matching", "small"), ("moment_matching_large", "large")])
def test_moment_matching_reproduces_the_old_loop(name, variance, steps, dtype):
    z, labels = _z(dtype=dtype), torch.arange(5) % NC
    grid = make_grid(SCHED, steps, kind="uniform_t")
    net = Counting()
    got = get_sampler(name)(net, z, grid, generator=torch.Generator().manual_seed(7), cond={"labels": labels})
    ref = _old_moment_matching(Counting(), z, grid, generator=torch.Generator().manual_seed(7),
                               cond={"labels": labels}, variance=variance)
    assert got.dtype == dtype and torch.equal(got, ref)
    assert net.calls == steps


def test_moment_matching_variances_differ_and_noise_matters():
    z = _z()
    grid = make_grid(SCHED, 4, kind="uniform_t")
    small = sample_moment_matching(Counting(), z, grid, generator=torch.Generator().manual_seed(1))
    large = sample_moment_matching_large(Counting(), z, grid, generator=torch.Generator().manual_seed(1))
    other = sample_moment_matching(Counting(), z, grid, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(small, large) and not torch.allclose(small, other)
    seen = []
    sample_moment_matching(Counting(), z, grid, generator=torch.Generator().manual_seed(1), callback=seen.append)
    assert [s["i"] for s in seen] == [0, 1, 2, 3] and torch.equal(seen[-1]["z"], small)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_guided_stochastic_reproduces_the_old_sampler_with_steps_from_the_grid(steps, dtype):
    z, labels = _z(dtype=dtype, seed=3), torch.arange(5) % NC
    cond = {"labels": labels, "guidance": torch.full((5,), 1.5, dtype=dtype)}
    net = Counting()
    got = sample_guided_stochastic(net, z, _old_levels(steps), generator=torch.Generator().manual_seed(4), cond=cond)
    ref = _old_guided_stochastic(Counting(), z, SCHED, steps, generator=torch.Generator().manual_seed(4), cond=cond)
    assert got.dtype == dtype and torch.equal(got, ref)
    assert net.calls == steps
    # make_grid's uniform-t grid is the same grid up to rounding of the levels
    via_make_grid = SAMPLERS["guided_stochastic"](Counting(), z, make_grid(SCHED, steps, kind="uniform_t"),
                                                  generator=torch.Generator().manual_seed(4), cond=cond)
    torch.testing.assert_close(via_make_grid, ref, rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=1e-6)


def test_guided_stochastic_one_step_is_the_x_prediction_and_noise_is_used():
    z, cond = _z(), {"guidance": torch.full((5,), 2.0, dtype=torch.float64)}
    grid = make_grid(SCHED, 1, kind="uniform_t")
    x = sample_guided_stochastic(Counting(), z, grid, cond=cond)
    torch.testing.assert_close(x, Counting()(z, grid[:1].expand(5), **cond).x, rtol=0, atol=0)
    grid = make_grid(SCHED, 3, kind="uniform_t")
    a = sample_guided_stochastic(Counting(), z, grid, cond=cond, generator=torch.Generator().manual_seed(0))
    b = sample_guided_stochastic(Counting(), z, grid, cond=cond, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b)


def test_guided_stochastic_refusals():
    z = _z()
    with pytest.raises(ValueError, match="must end at \\+inf"):
        sample_guided_stochastic(Counting(), z, torch.tensor([-5.0, 0.0, 5.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="only the isotropic"):
        sample_guided_stochastic(Counting(), z, make_grid(SCHED, 2), process=SimpleNamespace(isotropic=False))
    iso = sample_guided_stochastic(Counting(), z, make_grid(SCHED, 2), process=SimpleNamespace(isotropic=True),
                                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(iso, sample_guided_stochastic(Counting(), z, make_grid(SCHED, 2),
                                                     generator=torch.Generator().manual_seed(0)))


def test_generator_is_one_call_of_g():
    z, labels = _z(), torch.arange(5) % NC
    calls = []

    def g(z, labels=None):
        calls.append(labels)
        return 2 * z + labels.reshape(-1, 1, 1)

    seen = []
    x = sample_generator(g, z, make_grid(SCHED, 1), cond={"labels": labels}, callback=seen.append)
    assert torch.equal(x, 2 * z + labels.reshape(-1, 1, 1)) and len(calls) == 1 and len(seen) == 1
    with pytest.raises(ValueError, match="shaped like z"):
        sample_generator(lambda z: z[:2], z, None)


def test_registered_with_the_shared_signature():
    for name, fn in (("moment_matching", sample_moment_matching), ("moment_matching_large",
                     sample_moment_matching_large), ("generator", sample_generator),
                     ("guided_stochastic", sample_guided_stochastic)):
        assert get_sampler(name) is fn
        params = inspect.signature(fn).parameters
        assert list(params)[:3] == ["denoise", "z", "logsnrs"]
        assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in ("generator", "callback", "cond"))


def test_samplers_package_does_not_import_distill():
    import subprocess
    import sys

    code = "import sys, simdiff.samplers; print(any(m.startswith('simdiff.distill') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
