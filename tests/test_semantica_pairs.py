"""Image pairs for Semantica-style conditioning: partners differ from the target, share its class, respect held-out
classes; the shifted-self rule never returns the identical image; conditioning dropout gives the null context."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from simdiff.configuration import ConfigError
from simdiff.data import ImageDataset, build_dataset
from simdiff.semantica import PairBatches, PairOptions, partner_indices, shift_images
from simdiff.semantica.encoders import ImageEncoder


def test_partners_are_other_images_of_the_same_class():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 0])
    idx = torch.arange(len(labels)).repeat(200)
    p = partner_indices(labels, idx, generator=torch.Generator().manual_seed(0), num=3)
    assert p.shape == (len(idx), 3)
    assert not bool((p == idx[:, None]).any())  # never the image itself
    assert torch.equal(labels[p], labels[idx][:, None].expand_as(p))
    # every other member of a class is drawn (uniform over the n - 1 others): target 0's partners are {2, 5, 8}
    assert set(p[idx == 0].reshape(-1).tolist()) == {2, 5, 8}
    counts = torch.bincount(p[idx == 0].reshape(-1), minlength=9)[[2, 5, 8]].double()
    assert counts.min() / counts.max() > 0.7  # 600 draws over 3 partners: each about 200


def test_partner_of_a_singleton_class_is_refused():
    with pytest.raises(ValueError, match="class 1 has a single example"):
        partner_indices(torch.tensor([0, 0, 1]), torch.tensor([2]), generator=torch.Generator())


def test_pairs_dataset_holds_out_classes():
    ds = build_dataset({"name": "pairs", "options": {"source": "digits", "holdout_classes": [7, 8, 9]}})
    assert set(ds.labels.tolist()) == set(range(7))
    assert ds.info["pairs"]["train_classes"] == list(range(7)) and ds.info["pairs"]["holdout_classes"] == (7, 8, 9)
    full = build_dataset({"name": "digits"})
    assert len(ds) == int((full.labels < 7).sum())


def test_animal_mnist_is_a_pair_source_with_held_out_animals():
    ds = build_dataset({"name": "pairs", "split": "test",
                        "options": {"source": "animal_mnist", "holdout_classes": [6, 9]}})  # giraffe, zebra
    assert set(ds.labels.tolist()) == set(range(10)) - {6, 9} and len(ds) == 800
    assert ds.class_names[6] == "giraffe"


@pytest.mark.parametrize("options, key", [({"pairing": "nearest"}, "pairing"), ({"source": "cifar"}, "source"),
                                          ({"colour": 1}, "colour"), ({"uncond_prob": 1.0}, "uncond_prob"),
                                          ({"holdout_classes": list(range(10))}, "holdout_classes")])
def test_bad_pair_options_are_one_line_config_errors(options, key):
    with pytest.raises(ConfigError, match=key):
        build_dataset({"name": "pairs", "options": {"source": "digits", **options}})


def test_shifted_self_is_never_the_identical_image():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 1, 8, 8) * 2 - 1
    y = shift_images(x, max_shift=1, generator=g)
    assert y.shape == x.shape
    assert all(not torch.equal(a, b) for a, b in zip(x, y))
    # a shift by (dy, dx) moves the content: the interior matches x shifted by one of the 8 non-zero offsets
    for a, b in zip(x[:8], y[:8]):
        assert any(torch.equal(b[:, 1:-1, 1:-1], a[:, 1 - dy : 7 - dy, 1 - dx : 7 - dx])
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


class _Mean(nn.Module):
    def forward(self, x):  # [n, 1, H, W] -> [n, 1, 2]: mean of the left / right halves
        w = x.shape[-1] // 2
        return torch.stack([x[..., :w].mean((1, 2, 3)), x[..., w:].mean((1, 2, 3))], -1)[:, None]


def _toy_encoder():
    return ImageEncoder(_Mean(), name="halves", version="1", num_tokens=1, width=2)


def test_pair_batches_context_is_the_partners_tokens_and_dropout_is_null():
    labels = torch.tensor([0, 1] * 50)
    images = torch.randn(100, 1, 4, 4).clamp(-1, 1)
    ds = ImageDataset(images, labels, num_classes=2)
    enc = _toy_encoder()
    pairs = PairBatches(ds, enc, PairOptions(source="digits", uncond_prob=0.5, num_cond=2))
    batch = pairs[torch.arange(100)]
    out = pairs.transform(batch, torch.Generator().manual_seed(3))
    assert out["context"].shape == (100, 2, 2) and torch.equal(out["x"], images)
    null = (out["context"] == 0).all(dim=(1, 2))
    assert 0.35 < float(null.double().mean()) < 0.65  # uncond_prob 0.5
    tokens = enc.tokens(images)[:, 0]  # [100, 2]
    for i in torch.nonzero(~null).reshape(-1).tolist():
        for row in out["context"][i]:  # each token row is the tokens of another image of the same class
            match = [j for j in range(100) if torch.allclose(tokens[j], row)]
            assert match and all(labels[j] == labels[i] and j != i for j in match)
    # the null context is what the conditioner reports as unconditional
    from simdiff.conditioners import null_conditioning

    nulled = null_conditioning({"context": out["context"]}, enc.null_cond, batch=100)
    assert torch.equal(nulled["context"], torch.zeros(100, 2, 2))
    assert torch.equal(enc.null(3)["context"], torch.zeros(3, 1, 2))


def test_targets_without_a_partner_are_left_out():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])  # class 1 has a single image
    ds = ImageDataset(torch.zeros(6, 1, 4, 4), labels, num_classes=3)
    pairs = PairBatches(ds, _toy_encoder(), PairOptions(source="digits"))
    assert pairs.targets.tolist() == [0, 1, 3, 4, 5] and len(pairs) == 5
    assert pairs[torch.arange(5)]["index"].tolist() == [0, 1, 3, 4, 5]
    with pytest.raises(ConfigError, match="no training image has a partner"):
        PairBatches(ImageDataset(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), num_classes=2), _toy_encoder(),
                    PairOptions(source="digits"))
