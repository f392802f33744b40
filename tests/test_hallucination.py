"""Trajectory variance (simdiff.detect.hallucination): the callback's arithmetic, zero for a constant denoiser,
small on the exact mixture denoiser, high for samples a trained MLP puts between modes, and generate_scored
reproducing generate's images."""

import pytest
import torch

from simdiff.detect import TrajectoryVariance, auroc, filter_table, generate_scored, scored_sample
from simdiff.detect.toys import grid_mixture, line_mixture, out_of_support, support_distance, train_toy_denoiser
from simdiff.generate import SampleConfig, generate
from simdiff.process import to_output
from simdiff.samplers import make_grid, sample_ddim
from simdiff.schedules import get_schedule
from simdiff.toy import GaussianMixture

COSINE = get_schedule("cosine")


def test_callback_is_population_variance_of_last_k():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 2, 2, generator=g) for _ in range(6)]
    tv = TrajectoryVariance(last=4)
    for i, x in enumerate(xs):
        tv({"i": i, "x": x, "z": x, "logsnr": torch.tensor(0.0)})
    want = torch.stack(xs[-4:]).double().var(0, unbiased=False).reshape(3, -1).mean(1)
    torch.testing.assert_close(tv.score(), want, rtol=1e-12, atol=1e-15)
    short = TrajectoryVariance(last=10)  # fewer predictions than K: all of them
    for x in xs[:3]:
        short({"x": x})
    torch.testing.assert_close(short.score(), torch.stack(xs[:3]).double().var(0, unbiased=False).reshape(3, -1)
                               .mean(1), rtol=1e-12, atol=1e-15)


def test_constant_denoiser_scores_exactly_zero():
    c = torch.tensor([[0.3, -0.7]])

    def const(z, lam, **_):
        return to_output("x", c.expand_as(z), z=z, logsnr=lam)

    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for name in ("ddim", "dpmpp_2m", "unipc", "ddpm"):
        x, s = scored_sample(name, const, z, make_grid(COSINE, 12), last=5,
                             generator=torch.Generator().manual_seed(2))
        assert torch.equal(s, torch.zeros(16, dtype=torch.float64)), name
        torch.testing.assert_close(x, c.expand_as(z).double())


def test_scored_sample_leaves_the_samples_alone():
    gm = GaussianMixture.random(2, 4, seed=3)
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grid = make_grid(COSINE, 10)
    x, s = scored_sample("ddim", gm.denoise, z, grid, last=4)
    assert torch.equal(x, sample_ddim(gm.denoise, z, grid)) and s.shape == (32,) and bool((s > 0).all())


def test_exact_denoiser_of_separated_modes_settles():
    """With the exact mixture denoiser and a fine grid (200 DDIM steps) no sample lands between modes and the late
    trajectory is still: every score is below the component variance. (At 50 steps the discretisation alone puts
    two of these 2000 samples 5 standard deviations out, with scores ~0.01.)"""
    gm = line_mixture(3, std=0.05, dtype=torch.float64)
    z = torch.randn(2000, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x, s = scored_sample("ddim", gm.denoise, z, make_grid(COSINE, 200), last=10)
    assert not bool(out_of_support(gm, x).any())
    assert float(s.max()) < 0.05**2


def test_trained_mlp_interpolates_and_the_score_flags_it():
    """A small MLP trained for 800 steps on three modes at -1, 0, 1 (std 0.05) puts a few percent of its samples
    between the modes; those have a much larger trajectory variance, so filtering the top 10% of scores removes
    far more of them than of the in-support samples."""
    gm = line_mixture(3, std=0.05)
    net = train_toy_denoiser(gm, steps=800, hidden=64, seed=0)
    z = torch.randn(4000, 1, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x, s = scored_sample("ddim", net, z, make_grid(COSINE, 50), last=10)
    out = out_of_support(gm, x)
    assert 0.005 < float(out.double().mean()) < 0.5  # interpolation happens, but most samples are fine
    assert float(s[out].median()) > 3 * float(s[~out].median())
    assert auroc(s, out) > 0.7
    row = filter_table(s, out, quantiles=(0.9,))[0]
    assert row["out_removed"] > 2 * (1 - row["in_kept"])


def test_generate_scored_matches_generate():
    gm = GaussianMixture.random(4, 3, seed=6, dtype=torch.float32)
    cfg = SampleConfig(sampler="ddpm", steps=8, num=10, batch_size=4, seed=3)
    ref = generate(gm.denoise, COSINE, (1, 2, 2), cfg)
    x, s = generate_scored(gm.denoise, COSINE, (1, 2, 2), cfg, last=3)
    assert torch.equal(x, ref) and s.shape == (10,) and s.dtype == torch.float64


def test_toys_and_bad_input():
    gm = grid_mixture(5, std=0.03)
    assert gm.means.shape == (25, 2)
    d = support_distance(gm, torch.tensor([[0.0, 0.0], [0.25, 0.0], [0.5, 0.03]]))
    torch.testing.assert_close(d, torch.tensor([0.0, 0.25 / 0.03, 1.0], dtype=d.dtype), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="last >= 2"):
        TrajectoryVariance(last=1)
    with pytest.raises(ValueError, match=">= 2 x-predictions"):
        TrajectoryVariance(last=3).score()
