"""The Fashion-MNIST classifier's parts: augmentation, network shapes, weights file round trip, shared features."""

from __future__ import annotations

import torch

from simdiff.eval import fashion
from simdiff.eval.classifier import ClassifierFeatures
from simdiff.eval.mnist import MNISTFeatures


def test_augment_is_a_flip_and_a_shift_of_each_image() -> None:
    x = torch.rand(64, 1, 28, 28)
    out = fashion._augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    hits = 0
    for i in range(64):
        found = False
        for img in (x[i, 0], x[i, 0].flip(-1)):
            pad = torch.nn.functional.pad(img, (2, 2, 2, 2))
            for dy in range(5):
                for dx in range(5):
                    found |= torch.equal(out[i, 0], pad[dy:dy + 28, dx:dx + 28])
        hits += found
    assert hits == 64  # every output is exactly one flip/shift of its input
    assert not torch.equal(out, x)  # and they are not all the identity


def test_network_shapes_and_weights_round_trip(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    net = fashion.FashionNet().eval()
    x = torch.rand(5, 1, 28, 28)
    assert net(x).shape == (5, 10)
    path = fashion.save_fashion_classifier(net, tmp_path / "w.safetensors", test_accuracy=0.9123)
    assert fashion.classifier_test_accuracy(path) == 0.9123
    monkeypatch.setattr(fashion, "WEIGHTS", path)
    monkeypatch.setattr(fashion, "_CACHE", {})
    feats = fashion.FashionFeatures("cpu")
    images = torch.rand(7, 1, 28, 28) * 2 - 1
    assert feats(images).shape == (7, 128) and feats(images).dtype == torch.float64
    with torch.no_grad():  # float16 storage: the logits agree with the float32 network to ~1e-2
        ref = net(((images + 1) / 2 - fashion.FASHION_MEAN) / fashion.FASHION_STD).double()
    assert torch.allclose(feats.logits(images), ref, atol=5e-2)
    labels = feats.predict(images)
    assert feats.accuracy(images, labels) == 1.0


def test_both_classifiers_share_one_implementation() -> None:
    assert issubclass(fashion.FashionFeatures, ClassifierFeatures) and issubclass(MNISTFeatures, ClassifierFeatures)
    assert MNISTFeatures.mean != fashion.FashionFeatures.mean


def test_fashion_metrics_through_evaluate_samples(tmp_path, monkeypatch) -> None:
    """``fashion_fd`` and ``accuracy`` with ``classifier="fashion"`` use the Fashion network (here an untrained one
    written to a temporary file): identical sets have distance ~0, a shifted set a larger one."""
    from simdiff.eval import evaluate_samples
    from simdiff.eval.evaluate import classifier_for, default_metrics

    torch.manual_seed(0)
    path = fashion.save_fashion_classifier(fashion.FashionNet().eval(), tmp_path / "w.safetensors",
                                           test_accuracy=0.5)
    monkeypatch.setattr(fashion, "WEIGHTS", path)
    monkeypatch.setattr(fashion, "_CACHE", {})
    assert classifier_for((1, 28, 28), "fashion_mnist") == "fashion" and classifier_for((1, 28, 28), "mnist") == "mnist"
    assert default_metrics((1, 28, 28), "fashion_mnist") == ("fashion_fd", "fid", "accuracy")
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(200, 1, 28, 28, generator=g) * 2 - 1
    same = evaluate_samples(ref.clone(), ref, metrics=("fashion_fd",), progress=False, device="cpu")
    shifted = evaluate_samples((ref * 0.5 + 0.4).clamp(-1, 1), ref, metrics=("fashion_fd",), progress=False,
                               device="cpu")
    assert same["fashion_fd"] < 1e-6 < shifted["fashion_fd"]
    labels = fashion.FashionFeatures("cpu").predict(ref)
    acc = evaluate_samples(ref, metrics=("accuracy",), labels=labels, classifier="fashion", progress=False,
                           device="cpu")
    assert acc["accuracy"] == 1.0


def test_shipped_fashion_classifier_is_accurate() -> None:
    """The shipped weights: the recorded test accuracy (0.912 over 10k) and a 2000-image check of it."""
    import pytest

    from simdiff.data.sources import load_fashion_mnist

    assert fashion.classifier_test_accuracy() == pytest.approx(0.9118, abs=1e-4)
    try:
        test = load_fashion_mnist("test")
    except Exception as e:  # the Debian data package is installed by `make setup` where it can be
        pytest.skip(f"Fashion-MNIST not installed ({e})")
    acc = fashion.FashionFeatures("cpu").accuracy(test.images[:2000], test.labels[:2000])
    assert acc > 0.88  # 2000 images: the standard error of 0.912 is 0.006
