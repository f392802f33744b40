"""Shared machinery of the domain classifiers (MNIST, Fashion-MNIST): preprocessing, batched features, logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simdiff.eval.features import batched_apply, check_images, resolve_device

__all__ = ["ClassifierFeatures"]


class ClassifierFeatures:
    """Penultimate features (``dim``-d), logits and predicted labels of a 28x28 grey-image classifier.

    Subclasses set ``name``, ``mean`` and ``std`` (of pixels in ``[0, 1]``) and implement ``_network()``, which
    returns a module with ``features`` (conv stack ending in a flatten, or not) and ``classifier`` =
    ``[Linear, ReLU, (Dropout,) Linear]``. The network is loaded lazily on first use.

    Args:
        device: where to run the network (default: cuda if available, else cpu).
        batch_size: images per forward pass.
        progress: show a tqdm bar when more than one batch is processed.
    """

    name = "classifier"
    dim = 128
    mean, std = 0.5, 0.5

    def __init__(self, device: str | torch.device | None = None, *, batch_size: int = 1000,
                 progress: bool = False) -> None:
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.progress = progress

    def _network(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def network(self) -> nn.Module:
        """The shared network on ``self.device`` (loaded on first access)."""
        return self._network()

    def preprocess(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` in ``[-1, 1]`` -> ``[B, 1, 28, 28]`` normalised with the classifier's mean/std."""
        x = images.float().clamp(-1.0, 1.0)
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
        return ((x + 1.0) * 0.5 - self.mean) / self.std

    def _features(self, x: Tensor) -> Tensor:
        net = self.network
        h = net.features(self.preprocess(x)).flatten(start_dim=1)
        return net.classifier[1](net.classifier[0](h))

    def _run(self, fn, images: Tensor, progress: bool | None, desc: str) -> Tensor:
        check_images(images)
        show = self.progress if progress is None else progress
        return batched_apply(fn, images, batch_size=self.batch_size, device=self.device, progress=show, desc=desc)

    def __call__(self, images: Tensor, *, progress: bool | None = None) -> Tensor:
        """Features ``[B, dim]`` float64 (CPU) of ``images`` ``[B, C, H, W]`` in ``[-1, 1]``."""
        return self._run(self._features, images, progress, f"{self.name} features")

    def logits(self, images: Tensor, *, progress: bool | None = None) -> Tensor:
        """Class logits ``[B, 10]`` float64 (CPU)."""
        head = self.network.classifier[-1]
        return self._run(lambda x: head(self._features(x)), images, progress, f"{self.name} logits")

    def predict(self, images: Tensor, *, progress: bool | None = None) -> Tensor:
        """Predicted labels ``[B]`` (int64, CPU)."""
        return self.logits(images, progress=progress).argmax(dim=1)

    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        """Fraction of ``images`` classified as ``labels`` ``[B]`` (e.g. the requested class of samples)."""
        labels = torch.as_tensor(labels).reshape(-1).long().cpu()
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match images shape {tuple(images.shape)}")
        return float((self.predict(images) == labels).double().mean())
