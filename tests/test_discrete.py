"""Masked discrete diffusion against closed forms, on a 4-token Markov chain with an exact denoiser (float64).

* The first-hitting sampler reproduces the joint (chi-square, fixed seed, significance 1%), and its unmasking
  times have the law of the largest of ``n`` independent unmasking times.
* The continuous-time ELBO of the exact denoiser, integrated exactly (all masks, Gauss-Legendre in t), equals the
  closed form ``sum_M B(L - m + 1, m) sum_{l in M} -log p(x^l | x_unmasked)`` (incomplete Beta for log-linear),
  which for ``alpha(1) = 0`` is exactly ``-log p(x)``; the Monte Carlo training loss is unbiased for it.
* Tau-leaping: its exact law (dynamic programming) approaches the joint as steps grow (total variation strictly
  decreasing), one step is the product of marginals, and the implementation samples that law (chi-square).
* Float32 Gumbel-max, enumerated exactly over every float32 uniform, under-samples rare tokens when unmasking is
  rare (lower effective temperature, Zheng et al. 2024); float64 inverse-CDF sampling is exact to 2^-53.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.special import betainc, betaln
from scipy.stats import chisquare, kstest

from simdiff.discrete import MaskedDiffusion, categorical, sample_first_hitting, sample_tau_leaping
from simdiff.discrete.masked import data_from_tokens
from simdiff.discrete.sampling import gumbel_noise
from simdiff.discrete.schedules import get_mask_schedule
from simdiff.discrete.toy import ExactJoint, markov_chain_joint

V, L = 3, 4
MASK = V
INIT = torch.tensor([0.6, 0.3, 0.1])
TRANS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
ALPHA_LEVEL = 0.01  # significance level of the chi-square tests (fixed seeds)


@pytest.fixture(scope="module")
def joint():
    return ExactJoint(markov_chain_joint(INIT, TRANS, L))


def _counts(joint, x):
    return torch.bincount(joint.index(x), minlength=len(joint.probs)).double()


def test_first_hitting_reproduces_the_joint(joint):
    n = 20000
    g = torch.Generator().manual_seed(1)
    x, calls, times = sample_first_hitting(joint, torch.full((n, L), MASK), schedule=get_mask_schedule("cosine"),
                                           mask_id=MASK, generator=g, return_times=True)
    assert calls == L and not bool((x == MASK).any())
    stat, p = chisquare(_counts(joint, x).numpy(), (joint.probs * n).numpy())
    assert p > ALPHA_LEVEL, (stat, p)
    # a wrong joint (the product of marginals) is rejected by the same test
    marg = [joint.probs.reshape([V] * L).sum([d for d in range(L) if d != i]) for i in range(L)]
    prod = torch.ones(len(joint.probs), dtype=torch.float64)
    for i in range(L):
        prod = prod * marg[i][joint.states[:, i]]
    assert chisquare(_counts(joint, x).numpy(), (prod * n).numpy())[1] < 1e-6
    # hitting times: decreasing, and 1 - alpha(tau_{L-1}) is the largest of L uniforms: (1 - alpha)^L ~ U(0, 1)
    assert bool((times[1:] <= times[:-1]).all()) and bool((times > 0).all())
    a = get_mask_schedule("cosine").alpha(times[0])
    assert kstest(((1 - a) ** L).numpy(), "uniform").pvalue > ALPHA_LEVEL


def test_first_hitting_k_tokens_per_call(joint):
    g = torch.Generator().manual_seed(2)
    x, calls = sample_first_hitting(joint, torch.full((50, L), MASK), schedule=get_mask_schedule("linear"),
                                    mask_id=MASK, k=3, generator=g)
    assert calls == 2 and not bool((x == MASK).any())


def _masks():
    return [torch.tensor(m, dtype=torch.bool) for m in itertools.product([False, True], repeat=L)]


def _closed_form(joint, x, masking, eps=1e-3):
    """sum over mask sets M (m = |M| >= 1) of int a^{L-m} (1-a)^{m-1} da * sum_{l in M} -log p(x^l | x_{not M})."""
    logits = joint(torch.where(torch.stack(_masks())[None], MASK, x[:, None]).reshape(-1, L))
    logits = logits.reshape(len(x), 2**L, L, V)
    nll = -logits.gather(-1, x[:, None, :, None].expand(-1, 2**L, -1, 1)).squeeze(-1)  # [N, 2^L, L]
    out = torch.zeros(len(x), dtype=torch.float64)
    for j, m in enumerate(_masks()):
        k = int(m.sum())
        if k == 0:
            continue
        coef = math.exp(betaln(L - k + 1, k))
        if masking == "log_linear":  # a runs over [eps, 1] only
            coef *= 1 - betainc(L - k + 1, k, eps)
        out += coef * (nll[:, j] * m).sum(-1)
    return out / L


@pytest.mark.parametrize("masking", ["linear", "cosine", "log_linear"])
def test_elbo_of_the_exact_denoiser_is_the_closed_form(joint, masking):
    proc = MaskedDiffusion(None, masking=masking, levels=V)
    x = joint.states  # every sequence
    closed = _closed_form(joint, x, masking)
    exact_nll = -joint.probs.log() / L
    if masking == "log_linear":
        assert bool((closed < exact_nll).all()) and float((exact_nll - closed).max()) < 5e-3
    else:
        torch.testing.assert_close(closed, exact_nll, rtol=0, atol=1e-12)  # the bound is tight at the optimum
    nodes, weights = np.polynomial.legendre.leggauss(64)
    integral = torch.zeros(len(x), dtype=torch.float64)
    for node, wq in zip(nodes, weights):
        t = torch.full((len(x),), 0.5 * (node + 1), dtype=torch.float64)
        a = proc.mask_schedule.alpha(t[0])
        for m in _masks():
            k = int(m.sum())
            prob = (1 - a) ** k * a ** (L - k)
            x_t = torch.where(m, MASK, x)
            integral += 0.5 * wq * prob * proc.bound_terms(joint, x, x_t=x_t, t=t).double()
    torch.testing.assert_close(integral, closed, rtol=2e-6, atol=0)


def test_training_loss_is_unbiased_for_the_bound(joint):
    proc = MaskedDiffusion(None, masking="cosine", levels=V)
    g = torch.Generator().manual_seed(3)
    x = joint.sample(20000, generator=g)
    loss = proc.loss(joint, {"x": data_from_tokens(x, V)}, generator=g).double()
    target = float((-joint.probs.log() * joint.probs).sum() / L)  # E_x[-log p(x)] / L
    se = float(loss.std() / math.sqrt(len(loss)))
    assert abs(float(loss.mean()) - target) < 4 * se, (float(loss.mean()), target, se)
    wrong = MaskedDiffusion(None, masking="cosine", levels=V)
    uniform = lambda x_t, t: torch.zeros(*x_t.shape, V)  # noqa: E731
    assert float(wrong.loss(uniform, {"x": data_from_tokens(x, V)}, generator=g).mean()) > target + 0.05


def _tau_leaping_law(joint, steps, schedule):
    """Exact law of tau-leaping with the exact denoiser over the V^L sequences (dynamic programming on states)."""
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    law = {(MASK,) * L: 1.0}
    for i in range(steps):
        a_t, a_s = schedule.alpha(grid[i]), schedule.alpha(grid[i + 1])
        r = float(((a_s - a_t) / (1 - a_t)).clamp(0, 1))
        states = list(law)
        probs = joint(torch.tensor(states)).exp()
        new: dict[tuple, float] = {}
        for st, p0 in zip(states, probs):
            options = [[(st[l], 1.0)] if st[l] != MASK else
                       [(v, r * float(p0[l, v])) for v in range(V)] + [(MASK, 1 - r)] for l in range(L)]
            for combo in itertools.product(*options):
                key = tuple(c[0] for c in combo)
                new[key] = new.get(key, 0.0) + law[st] * math.prod(c[1] for c in combo)
        law = new
    out = torch.zeros(len(joint.probs), dtype=torch.float64)
    for key, p in law.items():
        if MASK in key:  # still masked after the last step: impossible (alpha(0) = 1)
            assert p == 0.0
            continue
        out[joint.index(torch.tensor([key]))] += p
    return out


def test_tau_leaping_converges_as_steps_grow(joint):
    schedule = get_mask_schedule("linear")
    tv = [0.5 * float((_tau_leaping_law(joint, s, schedule) - joint.probs).abs().sum()) for s in (1, 2, 4, 8, 16, 64)]
    assert all(b < a for a, b in zip(tv, tv[1:])) and tv[-1] < 0.01 and tv[0] > 0.1, tv
    one = _tau_leaping_law(joint, 1, schedule)  # one step: every token from its marginal, independently
    marg = joint(torch.full((1, L), MASK)).exp()[0]
    prod = torch.stack([marg[l, joint.states[:, l]] for l in range(L)]).prod(0)
    torch.testing.assert_close(one, prod, rtol=0, atol=1e-12)
    n, g = 20000, torch.Generator().manual_seed(4)  # the implementation draws from that law
    x, calls = sample_tau_leaping(joint, torch.full((n, L), MASK), steps=4, schedule=schedule, mask_id=MASK,
                                  generator=g)
    assert calls <= 4 and not bool((x == MASK).any())
    assert chisquare(_counts(joint, x).numpy(), (_tau_leaping_law(joint, 4, schedule) * n).numpy())[1] > ALPHA_LEVEL


def _float32_gumbel_law(logits: torch.Tensor) -> torch.Tensor:
    """Exact outcome probabilities of float32 Gumbel-max over every float32 uniform ``k 2^-24`` torch.rand makes."""
    u = (torch.arange(2**24, dtype=torch.float64) * 2.0**-24).float()
    g = gumbel_noise(u).double().sort().values  # the exact law of the float32 noise: 2^24 equally likely atoms
    top = g[-2**14:]  # a token ~16 nats below the top one can only win with one of these atoms
    out = []
    for i in range(len(logits)):
        if i == 0:
            out.append(0.0)
            continue
        prod = torch.ones_like(top)
        for j in range(len(logits)):
            if j != i:
                prod = prod * torch.searchsorted(g, top + logits[i] - logits[j]).double() / 2**24
        out.append(float(prod.sum()) / 2**24)
    out[0] = 1 - sum(out)
    return torch.tensor(out, dtype=torch.float64)


def test_float32_gumbel_lowers_the_temperature_and_float64_does_not():
    u = torch.rand(10**6, generator=torch.Generator().manual_seed(5))
    assert bool(((u * 2**24).frac() == 0).all())  # torch.rand float32 lives on the 2^-24 grid enumerated below
    assert float(gumbel_noise(torch.tensor(1 - 2**-24)).item()) < 16.7  # the noise is bounded above
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    r = 1e-6  # unmasking probability of one token in one step (a long tau-leaping grid)
    row = torch.cat([torch.tensor([1 - r], dtype=torch.float64), r * p])  # outcome 0: stay masked
    law = _float32_gumbel_law(row.log())
    cond = law[1:] / law[1:].sum()
    assert float(cond[-1]) < 0.7 * float(p[-1]) and float(cond[0]) > float(p[0])  # rare tokens under-sampled
    entropy = lambda q: float(-(q * q.log()).sum())  # noqa: E731
    assert entropy(cond) < entropy(p) - 0.03
    temperature = math.log(p[0] / p[-1]) / math.log(cond[0] / cond[-1])  # fit of cond ~ p^(1/T) on the extremes
    assert temperature < 0.85
    assert float(law[1:].sum()) < 0.95 * r  # and unmasking itself is slowed
    # float64 inverse CDF: outcome i is drawn exactly for u in [c_{i-1}, c_i) (width p_i, to 2^-53)
    cdf = row.cumsum(0)
    for i in range(1, len(row)):
        for uu, want in ((cdf[i - 1], i), (torch.nextafter(cdf[i - 1], torch.tensor(0.0, dtype=torch.float64)), i - 1)):
            probs = row[None]
            got = torch.searchsorted(probs.cumsum(-1), (uu * probs.cumsum(-1)[:, -1] / cdf[-1])[:, None], right=True)
            assert int(got) == want
    g = torch.Generator().manual_seed(6)
    draws = categorical(torch.tensor([0.5, 0.25, 0.15, 0.1]).expand(40000, 4), generator=g)
    assert chisquare(torch.bincount(draws, minlength=4).numpy(), [20000, 10000, 6000, 4000])[1] > ALPHA_LEVEL
    with pytest.raises(ValueError, match="unknown precision"):
        categorical(p, precision="float16")


@pytest.mark.parametrize("masking", ["linear", "cosine", "log_linear"])
def test_mask_schedules_derivative_and_inverse(masking):
    s = get_mask_schedule(masking)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    torch.testing.assert_close(s.inverse(s.alpha(t)), t, rtol=0, atol=1e-9)
    h = 1e-6
    torch.testing.assert_close(s.dalpha(t), (s.alpha(t + h) - s.alpha(t - h)) / (2 * h), rtol=1e-6, atol=1e-8)
    assert float(s.alpha(torch.tensor(0.0))) == 1.0 and bool((s.dalpha(t) < 0).all())
