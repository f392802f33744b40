"""Unlearning methods on the exact 2-D Gaussian-mixture bed: each baseline removes the forget class within 150 steps,
ESD's target is the negatively guided epsilon in float64, SalUn updates only its salient weights."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from simdiff.conditioners import ClassLabels
from simdiff.configuration import ConfigError
from simdiff.process import alpha_sigma
from simdiff.unlearn import ESD, METHODS, build_unlearn_loss, method_class

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
import unlearn_toy as toy  # noqa: E402


@pytest.fixture(scope="module")
def bed():
    return toy.bed()


def test_teacher_generates_every_class(bed):
    net, _, sched, _, _ = bed
    assert [toy.class_rate(net, sched, c, n=64) for c in range(toy.K)] == [1.0] * toy.K


@pytest.mark.parametrize("method", ["esd", "ascent", "graddiff", "salun", "ablation"])
def test_each_method_forgets_the_forget_class(bed, method, tmp_path):
    net, _, sched, fpool, rpool = bed
    student, _ = toy.unlearn_toy(method, net, sched, fpool, rpool, tmp_path)
    rate = toy.class_rate(student, sched, 0)
    assert rate <= 0.2, f"{method}: class 0 still generated at rate {rate}"
    assert any(not torch.equal(a, b) for a, b in zip(net.parameters(), student.parameters()))


def test_esd_target_is_negative_guidance_in_epsilon_float64():
    """ESD's x-space loss with the eps weighting equals ||eps_theta - (eps_null - eta (eps_c - eps_null))||^2 with
    the exact mixture denoiser as the original, in float64."""
    mix = toy.mixture()
    mix.means, mix.variances = mix.means.double(), mix.variances.double()
    mix.log_weights = mix.log_weights.double()

    def original(z, lam, labels=None, **_):
        from simdiff.process import to_output

        lab = None if labels is None or bool((labels == toy.K).all()) else labels
        return to_output("x", mix.posterior_mean(z, lam, lab), z=z, logsnr=lam)

    torch.manual_seed(3)
    from simdiff.toy_nets import MLPDenoiser

    student = MLPDenoiser(2, hidden=16, depth=1, num_classes=toy.K).double()
    torch.nn.init.normal_(student.out[1].weight, std=0.3)
    loss = ESD(student, original, toy.schedule(), eta=1.5, null_cond=ClassLabels(toy.K).null(1))
    x = mix.sample(8, generator=torch.Generator().manual_seed(0), labels=torch.zeros(8, dtype=torch.long))[0]
    batch = {"f_x": x, "f_c_labels": torch.zeros(8, dtype=torch.long)}
    got = loss.forget_loss(student, batch, torch.Generator().manual_seed(7))
    z, lam, _ = loss.noise(x, torch.Generator().manual_seed(7))
    a, s = alpha_sigma(lam)
    a, s = a[:, None], s[:, None]

    def eps(x_hat):
        return (z - a * x_hat) / s

    e_c = eps(original(z, lam, labels=torch.zeros(8, dtype=torch.long)).x)
    e_n = eps(original(z, lam, labels=torch.full((8,), toy.K)).x)
    e_theta = eps(student(z, lam, labels=torch.zeros(8, dtype=torch.long)).x)
    want = (e_theta - (e_n - 1.5 * (e_c - e_n))).pow(2).mean(1)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_salun_updates_only_the_salient_weights(bed, tmp_path):
    net, _, sched, fpool, rpool = bed
    student, loss = toy.unlearn_toy("salun", net, sched, fpool, rpool, tmp_path, steps=20, mask_fraction=0.3)
    assert math.isclose(loss.mask_density(), 0.3, abs_tol=0.01)
    frozen = changed = 0
    for (name, p0), p1 in zip(net.named_parameters(), student.parameters()):
        mask = loss.masks[name]
        assert torch.equal(p0[~mask], p1[~mask]), f"{name}: a weight outside the mask moved"
        frozen += int((~mask).sum())
        changed += int((p0[mask] != p1[mask]).sum())
    assert frozen > 0 and changed > 0
    aux = loss.aux_state_dict()  # the mask travels in checkpoints
    assert set(aux) == {f"mask.{n}" for n, _ in net.named_parameters()}


def test_method_names_and_params_are_checked(bed):
    net, _, sched, _, _ = bed
    assert len(METHODS) == 10 and all(f"{m}_ip" in METHODS for m in ("esd", "ascent", "graddiff", "salun", "ablation"))
    assert method_class("esd_ip")[1] and not method_class("esd")[1]
    with pytest.raises(ConfigError, match="unknown unlearning method 'forget'; valid: esd, esd_ip"):
        method_class("forget")
    with pytest.raises(ConfigError, match=r"unknown method_params \['eta'\] for 'ascent'"):
        build_unlearn_loss("ascent", net, net, sched, null_cond=ClassLabels(4).null(1), params={"eta": 2.0})
    loss = build_unlearn_loss("esd_ip", net, net, sched, null_cond=ClassLabels(4).null(1))
    assert loss.preserve == 1.0 and loss.describe()["method"] == "esd"
