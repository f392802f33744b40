"""DIRE (simdiff.detect.dire): zero reconstruction error where inversion is exact, small on the data of an exact
mixture denoiser and large off it; the classifier learns a separable toy; classifier files round-trip."""

import pytest
import torch

from simdiff.detect import (
    DIREClassifier,
    auroc,
    classifier_scores,
    dire_maps,
    dire_score,
    load_classifier,
    save_classifier,
    train_classifier,
)
from simdiff.detect.toys import line_mixture
from simdiff.process import to_output
from simdiff.samplers import make_grid
from simdiff.schedules import get_schedule

COSINE = get_schedule("cosine")


def test_point_mass_denoiser_reconstructs_its_point_exactly():
    """x_hat = c everywhere (data = a point mass at c): DDIM is exact, every image reconstructs to c, so the map is
    0 at c and |x - c| elsewhere."""
    c = torch.tensor([[[0.5, -0.25], [0.0, 1.0]]], dtype=torch.float64)

    def const(z, lam, **_):
        return to_output("x", c.expand_as(z), z=z, logsnr=lam)

    x = torch.stack([c, c + 0.3, -c])
    maps = dire_maps(const, x, make_grid(COSINE, 7))
    assert float(maps[0].abs().max()) < 1e-12
    torch.testing.assert_close(maps[1:], (x[1:] - c).abs(), rtol=1e-10, atol=1e-10)


def test_exact_mixture_small_on_data_large_off_it():
    """Exact 1-D mixture denoiser (modes -1, 0, 1, std 0.05), second-order inversion, 5 landing iterations,
    100 steps: mixture samples reconstruct to < 0.02 (mean < 0.002), uniform points on [-1, 1] are pulled to a mode
    (median error > 0.05), so the training-free score separates them."""
    gm = line_mixture(3, std=0.05, dtype=torch.float64)
    on, _ = gm.sample(200, generator=torch.Generator().manual_seed(0))
    off = torch.rand(200, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    grid = make_grid(COSINE, 100)
    s_on = dire_score(dire_maps(gm.denoise, on, grid, order=2, land_iters=5, batch_size=64))
    s_off = dire_score(dire_maps(gm.denoise, off, grid, order=2, land_iters=5))
    assert float(s_on.max()) < 0.02 and float(s_on.mean()) < 0.002
    assert float(s_off.median()) > 0.05
    assert auroc(-torch.cat([s_on, s_off]), torch.cat([torch.ones(200), torch.zeros(200)])) > 0.9


def test_batches_and_conditioning_slices():
    gm = line_mixture(3, std=0.05, dtype=torch.float64)
    x = torch.linspace(-1, 1, 10, dtype=torch.float64)[:, None]
    seen = []

    def den(z, lam, labels=None, **_):
        seen.append(labels.clone())
        return gm.denoise(z, lam)

    grid = make_grid(COSINE, 5)
    a = dire_maps(den, x, grid, cond={"labels": torch.arange(10)}, batch_size=3)
    assert [s.tolist() for s in seen[:2]] == [[0, 1, 2], [0, 1, 2]]
    torch.testing.assert_close(a, dire_maps(gm.denoise, x, grid))


def _toy_maps(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """'Generated' maps: small uniform noise; 'real' ones: the same plus a bright 3x3 blob somewhere."""
    g = torch.Generator().manual_seed(seed)
    gen = torch.rand(n, 1, 12, 12, generator=g) * 0.05
    real = torch.rand(n, 1, 12, 12, generator=g) * 0.05
    for i in range(n):
        r, c = torch.randint(0, 9, (2,), generator=g).tolist()
        real[i, 0, r: r + 3, c: c + 3] += 0.1
    return gen, real


def test_classifier_learns_and_round_trips(tmp_path):
    gen, real = _toy_maps(120, 0)
    net = train_classifier(generated=gen, real=real, epochs=8, seed=0)
    tg, tr = _toy_maps(60, 1)
    s = classifier_scores(net, torch.cat([tg, tr]))
    assert auroc(s, torch.cat([torch.ones(60), torch.zeros(60)])) > 0.95
    path = save_classifier(net, tmp_path / "c.safetensors", info={"steps": 10})
    net2, info = load_classifier(path)
    assert info == {"steps": 10}
    torch.testing.assert_close(classifier_scores(net2, tg), classifier_scores(net, tg))
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_classifier(tmp_path / "bad.safetensors")


def test_bad_shapes():
    with pytest.raises(ValueError, match="expects"):
        DIREClassifier(1)(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="one shape"):
        train_classifier(generated=torch.zeros(2, 1, 8, 8), real=torch.zeros(2, 1, 9, 9))
