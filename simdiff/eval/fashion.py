"""Fashion-MNIST classifier and features, trained by simdiff (no offline Fashion-MNIST classifier is packaged).

The network (:class:`FashionNet`) is a small CNN: two 3x3 conv blocks of (32, 32) and (64, 64) channels, each
ending in a 2x2 max-pool, then Linear(3136 -> 128)-ReLU-Dropout-Linear(128 -> 10). It is trained on the 60k
Fashion-MNIST training images by :func:`train_fashion_classifier` (random 2-pixel shifts and horizontal flips,
AdamW, one-cycle cosine learning rate) and shipped as ``simdiff/eval/weights/fashion_cnn.safetensors`` (float16).
Its test accuracy is stored in the file's metadata (``test_accuracy``) and is the ceiling for the class agreement
of a class-conditional model: a perfect generator scores about that.

Features for the "Fashion Fréchet distance" are the 128-d post-ReLU activations of the penultimate layer (the
same construction as FID with a domain-specific network; values are not comparable with Inception FIDs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simdiff.eval.classifier import ClassifierFeatures

__all__ = ["FashionNet", "FashionFeatures", "train_fashion_classifier", "save_fashion_classifier",
           "classifier_test_accuracy", "WEIGHTS"]

WEIGHTS = Path(__file__).resolve().parent / "weights" / "fashion_cnn.safetensors"
FASHION_MEAN = 0.2860
FASHION_STD = 0.3530

_CACHE: dict[str, nn.Module] = {}


class FashionNet(nn.Module):
    """``[B, 1, 28, 28]`` normalised images -> ``[B, 10]`` logits (``features`` -> ``classifier``)."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(),
                    nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(1, 32), *block(32, 64), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _normalise(x01: Tensor) -> Tensor:
    return (x01 - FASHION_MEAN) / FASHION_STD


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random horizontal flips and shifts of up to 2 pixels (zero padding), per image, on ``x``'s device."""
    b = x.shape[0]
    flip = torch.rand(b, generator=gen, device=gen.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = F.pad(x, (2, 2, 2, 2))
    dx, dy = (torch.randint(0, 5, (b,), generator=gen, device=gen.device) for _ in range(2))
    rows = (dy[:, None] + torch.arange(28, device=x.device))[:, :, None].expand(b, 28, 28)
    cols = (dx[:, None] + torch.arange(28, device=x.device))[:, None, :].expand(b, 28, 28)
    idx = rows * 32 + cols
    return pad.flatten(2).gather(2, idx.reshape(b, 1, -1)).reshape(b, 1, 28, 28)


def train_fashion_classifier(*, epochs: int = 10, batch_size: int = 256, lr: float = 2e-3, seed: int = 0,
                             device: str | torch.device = "cpu", progress: bool = False) -> tuple[FashionNet, float]:
    """Train :class:`FashionNet` on the Fashion-MNIST training split; returns ``(net, test accuracy)``.

    Reads the data through :func:`simdiff.data.sources.load_fashion_mnist` (Debian ``dataset-fashion-mnist``).
    """
    from simdiff.data.sources import load_fashion_mnist

    device = torch.device(device)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    x, y = (train.images.float() + 1) / 2, train.labels
    x, y = x.to(device), y.to(device)
    torch.manual_seed(seed)
    net = FashionNet().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    gen = torch.Generator(device=device).manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(x.shape[0], generator=gen, device=device)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(net(_normalise(_augment(x[idx], gen))), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        if progress:
            print(f"[fashion classifier] epoch {epoch + 1}/{epochs} loss {float(loss):.3f}", flush=True)
    net.eval()
    xt = (test.images.float() + 1) / 2
    with torch.inference_mode():
        pred = torch.cat([net(_normalise(c.to(device))).argmax(1).cpu() for c in xt.split(1000)])
    return net, float((pred == test.labels).double().mean())


def save_fashion_classifier(net: FashionNet, path: str | Path, *, test_accuracy: float) -> Path:
    """Write ``net``'s weights as float16 safetensors with its test accuracy in the metadata (atomically)."""
    from safetensors.torch import save

    from simdiff.train.rundir import atomic_write_bytes

    path = Path(path)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in net.state_dict().items()}
    meta = {"format": "simdiff-fashion-cnn", "test_accuracy": json.dumps(round(test_accuracy, 5))}
    atomic_write_bytes(path, save(state, metadata=meta))
    return path


def classifier_test_accuracy(path: str | Path = WEIGHTS) -> float:
    """The test accuracy recorded in the shipped weights' metadata."""
    from simdiff.train.checkpoint import read_safetensors

    return float(json.loads(read_safetensors(path)[1].get("test_accuracy", "NaN")))


def _load(device: torch.device) -> nn.Module:
    key = str(device)
    if key not in _CACHE:
        from simdiff.train.checkpoint import read_safetensors

        net = FashionNet()
        state, _ = read_safetensors(WEIGHTS)
        net.load_state_dict({k: v.float() for k, v in state.items()})
        _CACHE[key] = net.eval().requires_grad_(False).to(device)
    return _CACHE[key]


class FashionFeatures(ClassifierFeatures):
    """128-d penultimate features, logits and predicted labels of the shipped Fashion-MNIST CNN."""

    name = "simdiff_fashion_cnn_fc128"
    mean, std = FASHION_MEAN, FASHION_STD

    def _network(self) -> nn.Module:
        return _load(self.device)
