"""EM distillation (Xie et al. 2024) of a one-step generator from the exact 2-D Gaussian-mixture teacher."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from simdiff.distill.base import frozen_copy, uniform_t_grid
from simdiff.distill.em import DenoiserGenerator, EMDistillation
from simdiff.process import alpha_sigma
from simdiff.samplers import sample_ddim
from simdiff.schedules import CosineSchedule
from simdiff.toy import GaussianMixture, sliced_wasserstein
from simdiff.toy_nets import MLPDenoiser, fit_denoiser, train_loop

SCHED = CosineSchedule()
GM = GaussianMixture.random(2, 8, std=0.1, seed=0)


def _batch(g: torch.Generator, n: int = 256) -> dict:
    return {"x": GM.sample(n, generator=g)[0].float()}


@pytest.fixture(scope="module")
def fitted() -> MLPDenoiser:
    """An MLP fitted to the exact mixture denoiser (the "pretrained teacher network" the generator starts from)."""
    torch.manual_seed(0)
    return fit_denoiser(MLPDenoiser(2, hidden=64, depth=2), GM.denoise, SCHED, _batch, steps=400, lr=3e-3)


def _sw(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(sliced_wasserstein(x.double(), ref, generator=torch.Generator().manual_seed(5)))


def test_one_step_generator_improves_and_beats_teacher_ddim(fitted):
    g = torch.Generator().manual_seed(1)
    ref = GM.sample(4000, generator=g)[0]
    z = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    teacher_sw = _sw(sample_ddim(GM.denoise, z, uniform_t_grid(SCHED, 1)), ref)
    gen = DenoiserGenerator(copy.deepcopy(fitted), logsnr_star=0.0)
    method = EMDistillation(gen, GM.denoise, SCHED, aux_lr=3e-3)
    with torch.no_grad():
        init_sw = _sw(method.sample(gen, z.float()), ref)
    train_loop(method, gen, _batch, steps=120, lr=3e-4, seed=0)
    with torch.no_grad():
        final_sw = _sw(method.sample(gen, z.float()), ref)
    # Measured SW2 (4000 samples): teacher 1-step DDIM 1.124 (collapses to the mean); generator at init
    # (x_hat(z, lambda*=0)) 0.379; after 120 EMD updates (K=8) ~0.19-0.20.
    assert teacher_sw > 1.0
    assert final_sw < 0.75 * init_sw, (final_sw, init_sw)
    assert final_sw < 0.3 * teacher_sw, (final_sw, teacher_sw)


def test_class_conditional_generator_beats_teacher_one_step(conditional_mixture):
    """EMD with labels: one generator, both classes, scored against each class's true components."""
    cm = conditional_mixture
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(4000) % 2
    ref = cm.mixture.sample(4000, labels=labels, generator=g)[0]
    z = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    cond = {"labels": labels}
    teacher_sw = cm.per_class_sw(sample_ddim(cm.teacher, z, uniform_t_grid(cm.schedule, 1), cond=cond), ref, labels)
    gen = DenoiserGenerator(copy.deepcopy(cm.fitted), logsnr_star=0.0)
    method = EMDistillation(gen, cm.teacher, cm.schedule, aux_lr=3e-3)
    with torch.no_grad():
        init_sw = cm.per_class_sw(method.sample(gen, z.float(), cond=cond), ref, labels)
    train_loop(method, gen, cm.batch, steps=120, lr=3e-4, seed=0)
    with torch.no_grad():
        final_sw = cm.per_class_sw(method.sample(gen, z.float(), cond=cond), ref, labels)
    # Measured per-class SW2 (2000 a class): teacher 1-step DDIM 0.724, generator at init 0.313, after 120 EMD
    # updates 0.204.
    assert final_sw < 0.8 * init_sw, (final_sw, init_sw)
    assert final_sw < 0.4 * teacher_sw, (final_sw, teacher_sw)


def _grad_variance(gen: DenoiserGenerator, mode: str) -> float:
    method = EMDistillation(gen, GM.denoise, SCHED, noise_cancellation=mode, aux_updates=0)
    grads = []
    for i in range(12):
        gen.zero_grad()
        method(gen, {"x": torch.zeros(64, 2)}, torch.Generator().manual_seed(i)).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in gen.parameters()]))
    return float(torch.stack(grads).var(0).sum())


def test_noise_cancellation_lowers_m_step_gradient_variance(fitted):
    gen = DenoiserGenerator(copy.deepcopy(fitted), logsnr_star=0.0)
    var = {mode: _grad_variance(gen, mode) for mode in ("none", "injected", "all")}
    # Measured trace-variances of the M-step gradient (12 seeds, B=64): none ~20, injected 1.9, all 6e-4.
    assert var["injected"] < 0.5 * var["none"], var
    assert var["all"] < 0.1 * var["injected"], var


def test_one_noise_free_step_is_the_vsd_direction(fitted):
    """K = 1 with full cancellation: residual = gamma * (eps_psi - eps_phi)(x_t) = gamma sigma (s_phi - s_psi)."""
    gen = DenoiserGenerator(copy.deepcopy(fitted).double(), logsnr_star=0.0)
    method = EMDistillation(gen, GM.denoise, SCHED, langevin_steps=1, step_size=0.2, aux_updates=0)
    method.aux.net.double()
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(16, 2, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)
    lam = SCHED.logsnr(torch.rand(16, generator=g, dtype=torch.float64))
    _, r = method.e_step(gen, z, eps, lam, {}, torch.Generator().manual_seed(1))
    a, s = alpha_sigma(lam[:, None])
    with torch.no_grad():
        x_t = a * gen(z) + s * eps
        want = 0.2 * (method.aux.net(x_t, lam).eps - GM.denoise(x_t, lam).eps)
    assert torch.allclose(r, want, atol=1e-10)


@pytest.mark.parametrize("mode, expect", [("all", "zero"), ("injected", "decayed"), ("none", "noisy")])
def test_noise_bookkeeping_is_exact_when_scores_agree(fitted, mode, expect):
    """With s_teacher == s_student the drift is -eps only, so the cancelled residual is known in closed form."""
    net = copy.deepcopy(fitted).double()
    gen = DenoiserGenerator(net, logsnr_star=0.0)
    method = EMDistillation(gen, frozen_copy(net), SCHED, score_net=copy.deepcopy(net), langevin_steps=5,
                            step_size=0.3, noise_cancellation=mode, aux_updates=0)
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)
    _, r = method.e_step(gen, z, eps, torch.zeros(8, dtype=torch.float64), {}, torch.Generator().manual_seed(1))
    if expect == "zero":
        assert torch.allclose(r, torch.zeros_like(r), atol=1e-12)
    elif expect == "decayed":
        assert torch.allclose(r, 0.7**5 * eps, atol=1e-12)
    else:
        assert not torch.allclose(r, 0.7**5 * eps, atol=1e-3)


def test_aux_score_net_updated_in_call_and_state_roundtrips(fitted):
    gen = DenoiserGenerator(copy.deepcopy(fitted), logsnr_star=-2.0)
    method = EMDistillation(gen, GM.denoise, SCHED, langevin_steps=2)
    before = method.aux_state_dict()
    out = method(gen, _batch(torch.Generator().manual_seed(0), 32), torch.Generator().manual_seed(1))
    assert out.shape == (32,) and bool(torch.isfinite(out).all())
    assert all(p.grad is None for p in gen.parameters())  # the aux step never touches the generator
    out.mean().backward()
    assert sum(float(p.grad.abs().sum()) for p in gen.parameters()) > 0
    after = method.aux_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    other = EMDistillation(DenoiserGenerator(copy.deepcopy(fitted)), GM.denoise, SCHED)
    other.load_aux_state_dict(after)
    assert all(torch.equal(v, other.aux_state_dict()[k]) for k, v in after.items())
    z = torch.randn(5, 2)
    assert torch.equal(method.sample(gen, z), gen(z))
    assert method.sampler_spec() == {"sampler": "generator", "steps": 1} and method.sample_steps == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"langevin_steps": -1}, "langevin_steps must be"),
        ({"langevin_steps": 2.0}, "langevin_steps must be"),
        ({"step_size": 1.5}, r"step_size must be in \[0, 1\)"),
        ({"z_step_size": -0.1}, "z_step_size must be"),
        ({"noise_cancellation": "some"}, "valid: all, injected, none"),
        ({"t_range": (0.0, 0.5)}, "t_range must satisfy"),
        ({"aux_updates": -2}, "aux_updates must be"),
        ({"weighting": "nope"}, "nope"),
    ],
)
def test_bad_options(fitted, kwargs, match):
    with pytest.raises(Exception, match=match) as info:
        EMDistillation(DenoiserGenerator(copy.deepcopy(fitted)), GM.denoise, SCHED, **kwargs)
    assert "\n" not in str(info.value)


def test_needs_score_net_for_a_plain_generator():
    with pytest.raises(ValueError, match="needs score_net="):
        EMDistillation(torch.nn.Linear(2, 2), GM.denoise, SCHED)
    with pytest.raises(ValueError, match="logsnr_star must be finite"):
        DenoiserGenerator(MLPDenoiser(2), logsnr_star=math.inf)
