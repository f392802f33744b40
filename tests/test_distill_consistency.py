"""Multistep consistency models (Heek, Hoogeboom & Salimans 2024) on the exact Gaussian-mixture teacher."""

import pytest
import torch

from simdiff.distill import uniform_t_grid
from simdiff.distill.consistency import MultistepConsistency, pseudo_huber, teacher_steps_at
from simdiff.process import to_output
from simdiff.samplers import sample_ddim
from simdiff.schedules import get_schedule
from simdiff.toy import GaussianMixture, sliced_wasserstein
from simdiff.toy_nets import MLPDenoiser, train_loop

SCHED = get_schedule("cosine")
M = 8000


def _two_step_student_vs_exact_ddim(mode: str) -> tuple[MultistepConsistency, float, float]:
    """Train a K = 2 student (an MLP from random init) for 800 steps; return it with the SW2 of its samples and of
    the exact mixture denoiser's 2-step DDIM, both against fresh data."""
    torch.manual_seed(0)
    mix = GaussianMixture.random(2, 4, std=0.1, seed=1, dtype=torch.float32)
    net = MLPDenoiser(2, hidden=64)
    steps = 800
    loss = MultistepConsistency(net, mix.denoise if mode == "distillation" else None, SCHED, segments=2, mode=mode,
                                teacher_steps=(8, 64), anneal_steps=steps)
    train_loop(loss, net, lambda g: {"x": mix.sample(256, generator=g)[0]}, steps=steps, lr=1e-3)
    z = torch.randn(M, 2, generator=torch.Generator().manual_seed(6))
    ref = mix.sample(M, generator=torch.Generator().manual_seed(5))[0]

    def sw(a):
        return float(sliced_wasserstein(a, ref, num_projections=128, generator=torch.Generator().manual_seed(7)))

    with torch.no_grad():
        student = sw(loss.sample(net, z))
    return loss, student, sw(sample_ddim(mix.denoise, z, uniform_t_grid(SCHED, 2)))


def test_consistency_distillation_beats_teacher_ddim_at_two_steps():
    loss, student, teacher2 = _two_step_student_vs_exact_ddim("distillation")
    # seen (20k samples): student K=2 ~0.085, teacher DDIM(2) ~0.33, sampling floor ~0.05
    assert student < 0.5 * teacher2, (student, teacher2)
    assert loss.sampler_spec() == {"sampler": "ddim", "steps": 2, "grid": "uniform_t"}


def test_consistency_training_without_teacher_beats_exact_teacher_ddim_at_two_steps():
    """CT (no teacher: the data point stands in for the teacher's x)."""
    _, student, teacher2 = _two_step_student_vs_exact_ddim("training")
    # seen: CT student K=2 0.178 vs DDIM(2) with the *exact* denoiser 0.333 (1500 steps with an EMA target: 0.147)
    assert student < 0.65 * teacher2, (student, teacher2)


def test_non_degenerate_target_is_data_when_segment_is_one_teacher_step():
    # N = K: s = t_step, so z_ref = z_s and the CT target invDDIM_{t->s}(z_s, z_t) is exactly x (eq. 8).
    mix = GaussianMixture.random(3, 3, seed=0)
    x = mix.sample(32, generator=torch.Generator().manual_seed(0))[0]
    oracle = lambda z, lam, **_: to_output("x", x, z=z, logsnr=lam)  # noqa: E731
    for k in (1, 4):
        loss = MultistepConsistency(None, None, SCHED, segments=k, mode="training", teacher_steps=k)
        out = loss(oracle, {"x": x}, torch.Generator().manual_seed(1))
        assert out.shape == (32,) and float(out.abs().max()) < 1e-6


def test_training_mode_ema_target_and_losses_run():
    mix = GaussianMixture.random(2, 3, seed=0, dtype=torch.float32)
    net = MLPDenoiser(2, hidden=16)
    loss = MultistepConsistency(net, None, SCHED, segments=1, mode="training", target="ema", ema_decay=0.5,
                                teacher_steps=(4, 16), anneal_steps=10)
    before = [p.clone() for p in loss.ema.parameters()]
    train_loop(loss, net, lambda g: {"x": mix.sample(32, generator=g)[0]}, steps=3)
    assert any(not torch.equal(a, b) for a, b in zip(before, loss.ema.parameters()))
    out = loss(net, {"x": mix.sample(8)[0]})
    assert out.shape == (8,) and bool(torch.isfinite(out).all()) and out.requires_grad
    cd = MultistepConsistency(net, mix.denoise, SCHED, segments=4, teacher_sampler="ddim", teacher_steps=16)
    assert cd(net, {"x": mix.sample(8)[0]}).shape == (8,)


def test_teacher_step_annealing_is_pure_function_of_step():
    assert teacher_steps_at(0, start=64, end=1280, anneal_steps=100_000) == pytest.approx(64)
    assert teacher_steps_at(50_000, start=64, end=1280, anneal_steps=100_000) == pytest.approx((64 * 1280) ** 0.5)
    assert teacher_steps_at(10**6, start=64, end=1280, anneal_steps=100_000) == pytest.approx(1280)
    loss = MultistepConsistency(None, lambda *a: None, SCHED, segments=3)
    assert [loss.grid_size(s) for s in (0, 100_000)] == [63, 1281]  # round(N / K) * K
    loss.set_step(100_000)
    assert loss.grid_size() == 1281


def test_pseudo_huber_is_on_the_whole_vector():
    d = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(pseudo_huber(d, 1.0), torch.tensor([26**0.5 - 1, 0.0], dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"segments": 0}, "segments"),
        ({"segments": 3, "teacher_steps": 64}, "not divisible"),
        ({"segments": 2, "teacher_steps": (0, 8)}, "teacher_steps"),
        ({"segments": 2, "mode": "bogus"}, "valid: distillation, training"),
        ({"segments": 2, "teacher_sampler": "heun"}, "valid: addim, ddim"),
        ({"segments": 2, "target": "ema"}, "needs the student"),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        MultistepConsistency(None, lambda *a: None, SCHED, **kwargs)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="needs a teacher"):
        MultistepConsistency(None, None, SCHED, segments=2)
