"""Tests for simdiff.eval: Fréchet distance, KID, precision/recall, feature networks, reference-stats cache."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from simdiff.data import build_dataset
from simdiff.eval import (
    InceptionFeatures,
    MNISTFeatures,
    ReferenceStats,
    evaluate_samples,
    feature_stats,
    frechet_distance,
    frechet_distance_features,
    kid,
    precision_recall,
)

# ----------------------------------------------------------------------------------------------- MNIST loading


@pytest.fixture(scope="module")
def mnist_test():
    """2000 MNIST test digits as ``[N, 1, 28, 28]`` in [-1, 1] and labels ``[N]``."""
    ds = build_dataset({"name": "mnist", "split": "test", "limit": 2000})
    return ds.images, ds.labels


# ----------------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_identical_is_zero():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 6, generator=g, dtype=torch.float64)
    mu, sigma = feature_stats(a)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-10


def test_frechet_diagonal_closed_form_and_symmetry():
    g = torch.Generator().manual_seed(1)
    mu1, mu2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    v1 = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    v2 = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    expected = float(((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * (v1 * v2).sqrt()).sum())
    d12 = frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2))
    d21 = frechet_distance(mu2, torch.diag(v2), mu1, torch.diag(v1))
    assert d12 == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert d21 == pytest.approx(d12, rel=1e-12, abs=1e-12)


def test_frechet_full_covariance_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(7, 7)), rng.normal(size=(7, 7))
    s1, s2 = a @ a.T + 0.1 * np.eye(7), b @ b.T + 0.1 * np.eye(7)
    m1, m2 = rng.normal(size=7), rng.normal(size=7)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("n", [12, 80])
def test_frechet_features_matches_stats(n):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(n, 30, generator=g, dtype=torch.float64)
    y = 1.5 * torch.randn(n + 5, 30, generator=g, dtype=torch.float64) + 0.3
    ref = frechet_distance(*feature_stats(x), *feature_stats(y))  # n=12: singular covariances (eigh path)
    # Singular S: sqrt of round-off eigenvalues (~1e-8 each) limits the stats route to ~1e-8 relative.
    assert frechet_distance_features(x, y) == pytest.approx(ref, rel=1e-7)
    assert frechet_distance_features(x, x) < 1e-9


def test_feature_stats_matches_numpy_and_errors():
    x = np.random.default_rng(3).normal(size=(40, 4))
    mu, sigma = feature_stats(torch.from_numpy(x))
    assert mu.dtype == torch.float64
    np.testing.assert_allclose(sigma.numpy(), np.cov(x, rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match=r"\(3,\).*\(4, 4\)"):
        frechet_distance(torch.zeros(3), torch.eye(4), torch.zeros(3), torch.eye(3))


# ----------------------------------------------------------------------------------------------- KID, precision/recall


def test_kid_same_vs_shifted():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1500, 16, generator=g, dtype=torch.float64)
    y = torch.randn(1500, 16, generator=g, dtype=torch.float64)
    same_mean, same_std = kid(x, y, subsets=10, subset_size=500)
    assert abs(same_mean) < 3 * same_std + 1e-3
    shift_mean, shift_std = kid(x, y + 0.5, subsets=10, subset_size=500)
    assert shift_mean > 0.05 and shift_mean > 10 * shift_std
    assert kid(x, y, subsets=3, subset_size=100) == kid(x, y, subsets=3, subset_size=100)  # seeded default


def test_precision_recall_cases():
    g = torch.Generator().manual_seed(5)
    real = torch.randn(600, 4, generator=g, dtype=torch.float64)
    same = precision_recall(real, real.clone(), k=3)
    assert same == {"precision": 1.0, "recall": 1.0}
    far = precision_recall(real, real + 100.0, k=3)
    assert far == {"precision": 0.0, "recall": 0.0}
    # Fake covers only the half-space x_0 > 0.5 of the real support: high precision, low recall.
    fresh = torch.randn(4000, 4, generator=g, dtype=torch.float64)
    full = precision_recall(real, fresh[:600], k=3)
    part = precision_recall(real, fresh[fresh[:, 0] > 0.5][:300], k=3)
    assert part["precision"] > 0.85 and full["precision"] > 0.85
    assert part["recall"] < 0.6 < full["recall"] - 0.3


# ----------------------------------------------------------------------------------------------- MNIST network


def test_mnist_classifier_and_fd_monotone(mnist_test):
    x, y = mnist_test
    net = MNISTFeatures("cpu")
    acc = net.accuracy(x[:500], y[:500])
    assert acc > 0.95
    fa, fb = net(x[:1000]), net(x[1000:])
    assert fa.shape == (1000, 128) and fa.dtype == torch.float64
    mu_a, s_a = feature_stats(fa)
    g = torch.Generator().manual_seed(6)
    dists = [frechet_distance(mu_a, s_a, *feature_stats(fb))]
    for std in (0.1, 0.3, 0.5):
        noisy = (x[1000:] + std * torch.randn(x[1000:].shape, generator=g)).clamp(-1, 1)
        dists.append(frechet_distance(mu_a, s_a, *feature_stats(net(noisy))))
    assert all(b > a for a, b in zip(dists, dists[1:])), dists
    assert dists[0] < 0.1 * dists[-1], dists
    assert net.predict(x[:8]).shape == (8,) and net.logits(x[:8]).shape == (8, 10)
    up = torch.nn.functional.interpolate(x[:64], size=(32, 32), mode="bilinear")  # other sizes are resized
    assert net.accuracy(up, y[:64]) > 0.9


# ----------------------------------------------------------------------------------------------- Inception


def test_inception_features_small():
    g = torch.Generator().manual_seed(7)
    # Grey content stored as RGB with equal channels, so the grey call below must give the same features.
    grey = torch.nn.functional.interpolate(torch.rand(5, 1, 8, 8, generator=g) * 2 - 1, size=(32, 32), mode="bilinear")
    x = grey.expand(-1, 3, -1, -1)
    noisy = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    net = InceptionFeatures("cpu", batch_size=10)
    feats = net(torch.cat([x, noisy]))
    assert feats.shape == (10, 2048) and feats.dtype == torch.float64
    assert bool(torch.isfinite(feats).all()) and bool((feats >= 0).all())
    # Deterministic, independent of batch composition, and grey input == repeated RGB.
    torch.testing.assert_close(InceptionFeatures("cpu")(grey[:1]), feats[:1], rtol=1e-4, atol=1e-5)
    fx, fn = feats[:5], feats[5:]
    fid_same = frechet_distance_features(fx, fx)  # N << 2048: exact nuclear-norm route, no 2048^2 eigh
    fid_noise = frechet_distance_features(fx, fn)
    assert fid_same < 1e-3 * fid_noise
    assert fid_noise > 1.0


# ----------------------------------------------------------------------------------------------- cache, evaluate


def test_reference_stats_cache_and_corruption(tmp_path):
    calls = []
    feats = torch.randn(30, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)

    def compute():
        calls.append(1)
        return feats

    cache = ReferenceStats(tmp_path)
    first = cache.get("toy", "net", compute)
    path = cache.path("toy", "net")
    assert path.is_file() and len(calls) == 1
    second = ReferenceStats(tmp_path).get("toy", "net", compute)
    assert len(calls) == 1
    torch.testing.assert_close(second.mu, first.mu, rtol=0, atol=0)
    torch.testing.assert_close(second.sigma, first.sigma, rtol=0, atol=0)
    assert second.n == 30 and second.features.shape == (30, 4)
    path.write_bytes(b"not an npz file")
    with pytest.raises(ValueError, match="corrupt reference-stats file"):
        cache.get("toy", "net")
    with pytest.warns(RuntimeWarning, match="recomputing"):
        third = cache.get("toy", "net", compute)
    assert len(calls) == 2
    torch.testing.assert_close(third.mu, first.mu, rtol=0, atol=0)
    with pytest.raises(ValueError, match="reference key"):
        cache.path("../evil", "net")


def test_evaluate_samples_mnist_space(mnist_test, tmp_path):
    x, y = mnist_test
    kw = dict(metrics=("mnist_fd", "kid", "precision_recall", "accuracy"), feature_space="mnist",
              reference_key="mnist-test-600", cache_dir=tmp_path, progress=False, device="cpu",
              kid_subsets=5, kid_subset_size=150)
    res = evaluate_samples(x[:200], x[1000:1600], labels=y[:200], **kw)
    assert set(res) == {"mnist_fd", "kid", "kid_std", "precision", "recall", "accuracy"}
    assert res["accuracy"] > 0.95 and 0.5 < res["precision"] <= 1 and 0.5 < res["recall"] <= 1
    assert len(list(tmp_path.glob("*.npz"))) == 1
    again = evaluate_samples(x[:200], None, labels=y[:200], **kw)  # reference from the cache
    assert again == pytest.approx(res)
    with pytest.raises(ValueError, match="valid: mnist_fd, fid"):
        evaluate_samples(x[:10], x[10:20], metrics=("fd",))
    with pytest.raises(ValueError, match="needs `labels`"):
        evaluate_samples(x[:10], None, metrics=("accuracy",))


# ----------------------------------------------------------------------------------------------- metric choice

from simdiff.configuration import ConfigError  # noqa: E402
from simdiff.eval import METRICS, check_metrics, default_metrics  # noqa: E402


@pytest.mark.parametrize("shape, name, expect", [
    ((1, 28, 28), "mnist", ("mnist_fd", "fid", "accuracy")),
    ([1, 28, 28], "MNIST", ("mnist_fd", "fid", "accuracy")),
    ((1, 28, 28), "fashion_mnist", ("fashion_fd", "fid", "accuracy")),  # the shipped Fashion-MNIST classifier
    ((1, 28, 28), "animal-mnist", ("fid", "kid", "precision_recall")),
    ((1, 28, 28), "folder", ("fid", "kid", "precision_recall")),
    ((1, 28, 28), None, ("fid", "kid", "precision_recall")),
    ((1, 32, 32), "mnist", ("fid", "kid", "precision_recall")),  # resized MNIST: the classifier takes 28x28
    ((3, 28, 28), "mnist", ("fid", "kid", "precision_recall")),
    ((3, 64, 64), "folder", ("fid", "kid", "precision_recall")),
    ((1, 8, 8), "digits", ("fid", "kid", "precision_recall")),
])
def test_default_metrics_follow_the_data(shape, name, expect):
    got = default_metrics(shape, name)
    assert got == expect and set(got) <= set(METRICS)
    check_metrics(got, shape, name)  # the defaults always pass the check


def test_check_metrics_refuses_what_does_not_fit():
    check_metrics(["mnist_fd", "accuracy", "fid", "kid", "precision_recall"], (1, 28, 28), "mnist")
    check_metrics(("fid", "kid"), (1, 28, 28), "fashion_mnist")
    check_metrics(("fashion_fd", "accuracy"), (1, 28, 28), "fashion_mnist")  # Fashion-MNIST's own classifier
    with pytest.raises(ConfigError, match=r"metric\(s\) mnist_fd use a domain classifier .* 'fashion_mnist'"):
        check_metrics(["fid", "mnist_fd", "accuracy"], (1, 28, 28), "fashion_mnist")
    with pytest.raises(ConfigError, match=r"metric\(s\) fashion_fd use .* 'mnist'"):
        check_metrics(["fashion_fd"], (1, 28, 28), "mnist")
    with pytest.raises(ValueError, match=r"accuracy use a domain classifier and fit only MNIST digits .* at 1x32x32"):
        check_metrics(["accuracy"], (1, 32, 32), "mnist")
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['is'\]"):
        check_metrics(["fid", "is"], (3, 32, 32), "folder")
    with pytest.raises(ValueError, match="unknown metric"):
        check_metrics([], (3, 32, 32), "folder")
    with pytest.raises(ValueError, match=r"C in \(1, 3\), got \(4, 8, 8\)"):
        default_metrics((4, 8, 8), "gmm_images")
    with pytest.raises(ValueError, match=r"C in \(1, 3\)"):
        check_metrics(["fid"], (2, 8, 8), "gmm_images")
