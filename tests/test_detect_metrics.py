"""AUROC, ROC curve, accuracy, threshold and filtering table of simdiff.detect.metrics against hand cases and the
closed form for two Gaussians."""

import math

import pytest
import torch

from simdiff.detect.metrics import accuracy, auroc, best_threshold, filter_table, roc_curve


def test_auroc_hand_cases():
    assert auroc(torch.tensor([3.0, 4.0, 1.0, 2.0]), torch.tensor([1, 1, 0, 0])) == 1.0
    assert auroc(torch.tensor([3.0, 4.0, 1.0, 2.0]), torch.tensor([0, 0, 1, 1])) == 0.0
    assert auroc(torch.ones(6), torch.tensor([1, 0, 1, 0, 1, 0])) == 0.5
    # pos {0.8, 0.4}, neg {0.5, 0.1, 0.4}: pairs won 3 + 1 + one tie (1/2) = 4.5 of 6
    s = torch.tensor([0.8, 0.4, 0.5, 0.1, 0.4])
    assert auroc(s, torch.tensor([True, True, False, False, False])) == pytest.approx(0.75, abs=1e-15)


def test_auroc_equals_roc_area_and_pair_count():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 7, (200,), generator=g).double()  # many ties
    y = torch.rand(200, generator=g) < 0.4
    fpr, tpr, thr = roc_curve(s, y)
    area = float(torch.trapezoid(tpr, fpr))
    pos, neg = s[y], s[~y]
    pairs = float((pos[:, None] > neg[None]).double().mean() + 0.5 * (pos[:, None] == neg[None]).double().mean())
    assert auroc(s, y) == pytest.approx(pairs, abs=1e-12)
    assert auroc(s, y) == pytest.approx(area, abs=1e-12)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1 and thr[0] == math.inf


def test_auroc_two_gaussians_closed_form():
    """Scores N(d, 1) vs N(0, 1): AUROC = Phi(d / sqrt 2)."""
    g = torch.Generator().manual_seed(1)
    d, n = 1.0, 20000
    s = torch.randn(2 * n, generator=g, dtype=torch.float64)
    s[:n] += d
    y = torch.cat([torch.ones(n), torch.zeros(n)])
    exact = 0.5 * (1 + math.erf(d / 2))  # Phi(d / sqrt 2) = (1 + erf(d / 2)) / 2
    assert auroc(s, y) == pytest.approx(exact, abs=0.01)


def test_accuracy_threshold_and_filter_table():
    s = torch.tensor([0.1, 0.2, 0.3, 0.9, 1.0])
    y = torch.tensor([0, 0, 1, 1, 1])
    t = best_threshold(s, y)
    assert 0.2 < t < 0.3 and accuracy(s, y, t) == 1.0
    assert accuracy(s, y, 0.5) == pytest.approx(0.8)
    rows = filter_table(torch.arange(10.0), torch.arange(10) >= 8, quantiles=(0.5,))
    r = rows[0]  # threshold 4.5: keeps 0..4, both out-of-support points removed, 5 of 8 in-support kept
    assert r["kept"] == 0.5 and r["out_removed"] == 1.0 and r["in_kept"] == pytest.approx(5 / 8)
    assert r["out_rate_after"] == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="both classes"):
        auroc(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="differ in length"):
        auroc(torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([float("nan"), 1.0]), torch.tensor([0, 1]))
