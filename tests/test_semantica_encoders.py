"""Frozen image encoders: tokens of the MNIST classifier equal its FD features, the encoder stays frozen and outside
the trained model, per-image caching, the shipped contrastive encoder and its NT-Xent loss."""

from __future__ import annotations

import math

import pytest
import torch

from simdiff.configuration import ConfigError
from simdiff.losses import DiffusionLoss, LossConfig
from simdiff.nets import build_model
from simdiff.semantica import build_image_encoder, encoder_width
from simdiff.semantica.contrastive import WEIGHTS, augment, load_contrastive, nt_xent
from simdiff.semantica.pairs import load_source


@pytest.fixture(scope="module")
def digits():
    raw = load_source("mnist", "test")
    return raw.images[:40], raw.labels[:40]


def test_classifier_tokens_are_its_penultimate_features(digits):
    from simdiff.eval.mnist import MNISTFeatures

    x, _ = digits
    enc = build_image_encoder("mnist_classifier")
    tok = enc.tokens(x)
    assert tok.shape == (40, 1, 128) and enc.width == encoder_width("mnist_classifier") == 128
    torch.testing.assert_close(tok[:, 0].double(), MNISTFeatures("cpu")(x), rtol=1e-4, atol=1e-4)
    spatial = build_image_encoder("mnist_classifier", {"tokens": "spatial"})
    assert spatial.tokens(x[:3]).shape == (3, 49, 64) and encoder_width("mnist_classifier", {"tokens": "spatial"}) == 64


def test_encoder_is_frozen_and_not_part_of_the_model(digits):
    x, _ = digits
    enc = build_image_encoder("mnist_classifier")
    before = {k: v.clone() for k, v in enc.module.state_dict().items()}
    assert all(not p.requires_grad for p in enc.module.parameters())
    net = build_model("uvit", "v", {"channels": [8], "dim": 32, "depth": 1, "num_heads": 2, "context_dim": 128},
                      image_channels=1, image_size=28, num_classes=0)
    net.encoder = enc  # even assigned as an attribute, a FrozenEncoder registers nothing
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    batch = {"x": x[:8], **enc({"cond_images": x[8:16, None]})}
    loss = DiffusionLoss.from_config(LossConfig())(net, batch, torch.Generator().manual_seed(0)).mean()
    loss.backward()
    opt.step()
    frozen = {id(p) for p in enc.module.parameters()}
    assert frozen and not frozen & {id(p) for g in opt.param_groups for p in g["params"]}
    assert not frozen & {id(p) for p in net.parameters()}
    assert all(p.grad is None for p in enc.module.parameters())
    keys = set(net.state_dict())
    assert not any(k.startswith("encoder") for k in keys)
    assert all(torch.equal(v, enc.module.state_dict()[k]) for k, v in before.items())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_each_image_is_encoded_once(digits):
    x, _ = digits
    enc = build_image_encoder("mnist_classifier")
    calls = []
    handle = enc.module.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    try:
        a = enc({"cond_images": torch.stack([x[30:33], x[30:33]], 1)})["context"]  # [3, 2, ...]: 3 unique images
        b = enc({"cond_images": x[30:33, None]})["context"]
    finally:
        handle.remove()
    assert a.shape == (3, 2, 128) and b.shape == (3, 1, 128)
    assert sum(calls) <= 3 and torch.equal(a[:, :1], b) and torch.equal(a[:, 1:], b)


def test_unknown_encoder_or_tokens_is_a_config_error():
    with pytest.raises(ConfigError, match="encoder must be one of"):
        build_image_encoder("dinov2")
    with pytest.raises(ConfigError, match="tokens"):
        encoder_width("inception", {"tokens": "spatial"})


def test_nt_xent_closed_form():
    # B = 4 pairs of identical views, the 4 directions orthogonal: each anchor has similarity 1/t with its positive
    # and 0 with the 2B - 2 = 6 negatives (2 of them have similarity 0 too since the other views are orthogonal)
    t, b = 0.2, 4
    z = torch.eye(b, dtype=torch.float64)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * b - 2))
    assert abs(float(nt_xent(z, z, temperature=t)) - expected) < 1e-9
    assert float(nt_xent(z, z.roll(1, 0), temperature=t)) > expected + 1  # mismatched positives cost more


def test_shipped_contrastive_encoder_is_small_and_invariant_to_its_augmentations(digits):
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 1_000_000
    net, meta = load_contrastive()
    assert meta["data"].startswith("MNIST train digits 0-6") and meta["steps"] > 0
    assert all(not p.requires_grad for p in net.parameters())
    x, _ = digits
    g = torch.Generator().manual_seed(0)
    h1 = torch.nn.functional.normalize(net(augment(x, generator=g)), dim=1)
    h2 = torch.nn.functional.normalize(net(augment(x, generator=g)), dim=1)
    same = (h1 * h2).sum(1).mean()
    other = (h1 * h2.roll(1, 0)).sum(1).mean()
    assert same > other + 0.1, (float(same), float(other))
    enc = build_image_encoder("contrastive")
    assert enc.tokens(x[:2]).shape == (2, 1, 128) and enc.identity()["name"] == "simdiff_contrastive_mnist"


def test_inception_tokens_are_its_pool3_features(digits):
    from simdiff.eval.features import InceptionFeatures

    x, _ = digits
    enc = build_image_encoder("inception")
    tok = enc.tokens(x[:2])
    assert tok.shape == (2, 1, 2048) and encoder_width("inception") == 2048
    torch.testing.assert_close(tok[:, 0].double(), InceptionFeatures("cpu")(x[:2]), rtol=1e-4, atol=1e-4)


def test_rgb_contrastive_photo_encoder_is_frozen_colour_aware_and_separates_unseen_photos():
    from simdiff.semantica.encoders import PHOTO_WEIGHTS, load_photo_contrastive, photo_augment
    from simdiff.semantica.pairs import load_photo_source

    assert PHOTO_WEIGHTS.is_file() and PHOTO_WEIGHTS.stat().st_size < 1_000_000
    net, meta = load_photo_contrastive()
    assert meta["data"].startswith("photos train split") and meta["steps"] > 0
    assert all(not p.requires_grad for p in net.parameters())
    held = load_photo_source("test")  # chelsea (5) and china (6): photos the encoder never saw
    x = torch.cat([held.images[held.labels == 5][:40], held.images[held.labels == 6][:40]])
    y = torch.arange(2).repeat_interleave(40)
    g = torch.Generator().manual_seed(0)
    v1, v2 = photo_augment(x, generator=g), photo_augment(x, generator=g)

    def centred(a, b):  # ReLU features share a large mean direction: remove it before cosine similarities
        mu = torch.cat([a, b]).mean(0)
        return torch.nn.functional.normalize(a - mu, dim=1), torch.nn.functional.normalize(b - mu, dim=1)

    h1, h2 = centred(net(v1), net(v2))
    same, other = (h1 * h2).sum(1).mean(), (h1 * h2.roll(1, 0)).sum(1).mean()
    assert same > other + 0.1, (float(same), float(other))  # measured 0.96 vs 0.78
    # instance retrieval across views of 80 unseen patches (chance 1/80): 0.35 measured, raw pixels 0.21
    retrieval = float(((h1 @ h2.T).argmax(1) == torch.arange(80)).double().mean())
    p1, p2 = centred(v1.flatten(1), v2.flatten(1))
    pixels = float(((p1 @ p2.T).argmax(1) == torch.arange(80)).double().mean())
    assert retrieval > pixels + 0.05, (retrieval, pixels)
    # leave-one-out 1-NN on the tokens: which of the two unseen photos a patch comes from (0.99 measured)
    enc = build_image_encoder("contrastive_photos")
    tok = enc.tokens(x)[:, 0]
    tok = torch.nn.functional.normalize(tok - tok.mean(0), dim=1)
    sim = (tok @ tok.T).fill_diagonal_(-2)
    accuracy = float((y[sim.argmax(1)] == y).double().mean())
    assert accuracy > 0.9, accuracy
    assert enc.identity()["name"] == "simdiff_contrastive_photos" and encoder_width("contrastive_photos") == 128
    spatial = build_image_encoder("contrastive_photos", {"tokens": "spatial"})
    assert spatial.tokens(x[:2]).shape == (2, 64, 128) and enc.tokens(x[:2]).shape == (2, 1, 128)
    # RGB input: swapping the colour channels changes the tokens; the grey MNIST encoder sees their mean only
    bgr = x[:4].flip(1)
    assert (enc.tokens(bgr) - enc.tokens(x[:4])).abs().max() > 1e-2
    grey = build_image_encoder("contrastive")
    torch.testing.assert_close(grey.tokens(bgr), grey.tokens(x[:4]), rtol=1e-4, atol=1e-4)


def test_contrastive_trainers_share_one_loop_and_learn():
    """Both encoders train through ``fit_contrastive``: seeded runs are identical, and NT-Xent falls below
    ln(2B - 1) (= 3.43, views indistinguishable) on 32 smooth random images: measured 2.68 (grey) and 2.01 (RGB)."""
    import math

    import torch.nn.functional as F

    from simdiff.semantica.contrastive import train_contrastive
    from simdiff.semantica.encoders import train_photo_contrastive

    torch.manual_seed(0)
    grey = F.interpolate(torch.rand(32, 1, 4, 4) * 2 - 1, size=28, mode="bilinear")
    rgb = F.interpolate(torch.rand(32, 3, 4, 4) * 2 - 1, size=32, mode="bilinear")
    for train, images in ((train_contrastive, grey), (train_photo_contrastive, rgb)):
        a, ra = train(images, steps=40, batch_size=16, log_every=0)
        b, rb = train(images, steps=40, batch_size=16, log_every=0)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        assert ra["final_loss"] == rb["final_loss"] < 0.85 * math.log(31), ra
