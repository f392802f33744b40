"""The integrity metric (closed forms, identity, randomised weights) and integrity-preserving unlearning on the exact
2-D Gaussian-mixture bed: the ``_ip`` variants keep integrity higher than their baselines at the same forgetting."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

from simdiff.eval.unlearning import PSNR_CAP, forgetting_rate, integrity_score, nearest_component_judge, pair_psnr

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
import unlearn_toy as toy  # noqa: E402


@pytest.fixture(scope="module")
def bed():
    return toy.bed()


def test_pair_psnr_closed_form():
    a = torch.zeros(3, 1, 4, 4)
    b = a + torch.tensor([0.1, 0.5, 0.0]).reshape(3, 1, 1, 1)
    got = pair_psnr(a, b)
    torch.testing.assert_close(got[:2], 10 * torch.log10(4 / torch.tensor([0.01, 0.25], dtype=torch.float64)))
    assert got[2] == PSNR_CAP


def test_integrity_mapping_closed_form():
    """Pairs at distance d_i and unpaired neighbours at distance r: s_i = clip(1 - d_i / median(r), 0, 1)."""
    a = torch.arange(8, dtype=torch.float64)[:, None] * torch.tensor([[3.0, 4.0]])  # neighbours 5 apart (7 * 5 = 35)
    shift = torch.tensor([0.0, 1.0, 2.5, 5.0, 7.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    b = a + shift[:, None] * torch.tensor([[1.0, 0.0]])
    out = integrity_score(a, b, features="pixel", num_boot=400)
    assert out["distance_ref"] == 5.0  # median of [35, 5, 5, 5, 5, 5, 5, 5]
    want = (1 - shift / 5).clamp(0, 1).mean()
    assert math.isclose(out["integrity"], float(want), rel_tol=1e-12)
    assert out["integrity_lo"] <= out["integrity"] <= out["integrity_hi"]
    assert out["integrity_hi"] - out["integrity_lo"] > 0


def test_identity_has_integrity_one_and_unchanged_forgetting(bed):
    net, mix, sched, _, _ = bed
    same = copy.deepcopy(net)
    labels = torch.arange(1, 4).repeat(40)
    out = integrity_score(toy.samples(net, sched, labels), toy.samples(same, sched, labels), features="pixel")
    assert out["integrity"] == out["integrity_lo"] == out["integrity_hi"] == 1.0
    assert out["psnr"] == PSNR_CAP and out["distance"] == 0.0
    judge = nearest_component_judge(mix)
    zeros = torch.zeros(64, dtype=torch.long)
    assert forgetting_rate(toy.samples(net, sched, zeros), zeros.tolist(), judge) == \
        forgetting_rate(toy.samples(same, sched, zeros), zeros.tolist(), judge) == 1.0


def test_randomised_weights_lose_integrity(bed):
    net, _, sched, _, _ = bed
    rand = copy.deepcopy(net)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in rand.parameters():
            p.normal_(0, 0.5)
    out = toy.retain_integrity(net, rand, sched)
    # in 2-D a random output near the origin is still ~0.7 d_ref from every corner, so the floor is ~0.3 here
    assert out["integrity_hi"] < 0.5, out
    assert out["psnr"] < 20


@pytest.mark.parametrize("method", ["esd", "ablation"])
def test_integrity_preserving_variant_keeps_integrity_at_similar_forgetting(bed, method, tmp_path):
    net, _, sched, fpool, rpool = bed
    scores = {}
    for name in (method, f"{method}_ip"):
        student, _ = toy.unlearn_toy(name, net, sched, fpool, rpool, tmp_path / name)
        scores[name] = (toy.class_rate(student, sched, 0), toy.retain_integrity(net, student, sched))
    (f_base, i_base), (f_ip, i_ip) = scores[method], scores[f"{method}_ip"]
    assert f_base <= 0.2 and f_ip <= 0.2, scores
    assert i_ip["integrity_lo"] > i_base["integrity_hi"], scores  # confidence intervals apart
    assert i_ip["integrity"] > 0.9, scores
