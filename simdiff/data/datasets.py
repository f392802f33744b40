"""In-memory image data sets built from a :class:`DataConfig` through an explicit registry.

Every data set presents images ``[N, C, H, W]`` as float32 in ``[-1, 1]`` (uint8 ``u`` maps to ``u / 127.5 - 1``)
plus optional ``labels [N]``. When every value is exactly such a level (MNIST, Fashion-MNIST and image folders at
their stored size) the images are held in memory as uint8 (a quarter of the float32 memory) and converted per batch,
bit for bit the same floats; other sets (resized, synthetic) are held as float32. Sizes are changed with antialiased
bilinear resizing (folders: shorter side + centre crop in Pillow), channels with grey repeat / BT.601 luminance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from simdiff.configuration import ConfigError, from_dict, get_registered
from simdiff.data.errors import DataError
from simdiff.data.folder import load_folder
from simdiff.data.sources import RawData, load_animal_mnist, load_digits, load_fashion_mnist, load_mnist
from simdiff.data.transforms import convert_channels, float_to_uint8, random_hflip, resize_images, uint8_to_float
from simdiff.toy import GaussianMixture

__all__ = ["DataConfig", "ImageDataset", "DATASETS", "build_dataset", "gmm_image_mixture"]


@dataclass(frozen=True)
class DataConfig:
    """Which images to train on.

    Attributes:
        name: registry key, one of ``DATASETS`` (mnist, digits, fashion_mnist, folder, gmm_images, text, and the
            frame-window sets kolmogorov and moving_mnist of :mod:`simdiff.data.video_sets`).
        image_size: output side length; None keeps the native size (required for ``folder``).
        channels: 1 (grey) or 3 (RGB); None keeps the native channels.
        split: e.g. "train" / "valid" / "test" / "train+valid" for MNIST (valid names are listed on error).
        root: image folder for ``folder``; directory of IDX files for ``fashion_mnist`` (optional).
        hflip: random left-right flips in :meth:`ImageDataset.sample_batch` (augmentation).
        on_error: folders only: "stop" at the first unreadable file, or "skip" it and log a count.
        limit: keep only the first ``limit`` examples (for ``gmm_images``: the number drawn, default 1024).
        options: source-specific settings (e.g. a text corpus's sequence length); each source documents its keys
            and rejects unknown ones.
    """

    name: str = "mnist"
    image_size: int | None = None
    channels: int | None = None
    split: str = "train"
    root: str | None = None
    hflip: bool = False
    on_error: Literal["stop", "skip"] = "stop"
    limit: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"data.image_size must be a positive integer or null, got {self.image_size}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"data.channels must be 1, 3 or null, got {self.channels}")
        if self.on_error not in ("stop", "skip"):
            raise ConfigError(f"data.on_error must be 'stop' or 'skip', got {self.on_error!r}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit must be a positive integer or null, got {self.limit}")


class ImageDataset:
    """Images ``[N, C, H, W]`` float32 in [-1, 1], optional ``labels [N]`` (long), ``num_classes`` (0 if none).

    A sequence data set holds windows of frames ``[N, W, C, H, W']`` the same way (one window per example; values
    need not lie in [-1, 1], e.g. normalised vorticity, and are then stored as float32).

    ``ds[i]`` gives ``{"x": [C, H, W], "labels": scalar}``; ``ds[idx]`` with a LongTensor / slice gives the
    batched dict ``{"x": [B, C, H, W], "labels": [B]}`` (float32). Unlabelled sets have no ``"labels"`` key, so a
    batch minus ``"x"`` can be passed straight on as conditioning keywords.

    ``images`` may be given as uint8 levels or as floats; floats that are all exact levels ``u / 127.5 - 1`` are
    stored as uint8 (``storage``), the rest as float32. Indexing converts only the selected examples;
    :attr:`images` converts the whole set (a float32 copy; prefer indexing for batches).
    """

    def __init__(self, images: Tensor, labels: Tensor | None = None, num_classes: int = 0,
                 class_names: tuple[str, ...] = (), hflip: bool = False, name: str = "",
                 info: dict[str, Any] | None = None):
        if images.dim() not in (4, 5):
            raise ValueError(f"images must be [N, C, H, W] (or windows [N, W, C, H, W']), got shape "
                             f"{tuple(images.shape)}")
        if labels is not None:
            if labels.shape != images.shape[:1]:
                raise ValueError(f"labels shape {tuple(labels.shape)} does not match images {tuple(images.shape)}")
            labels = labels.long()
        self.storage = _compact(images)
        self.labels, self.num_classes, self.class_names = labels, num_classes, tuple(class_names)
        self.hflip, self.name, self.info = hflip, name, dict(info or {})

    @property
    def images(self) -> Tensor:
        """All images as float32 ``[N, C, H, W]`` in [-1, 1] (a converted copy when stored as uint8)."""
        return _to_float(self.storage)

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, shape={tuple(self.storage.shape)}, "
                f"storage={self.storage.dtype}, num_classes={self.num_classes})")

    def __len__(self) -> int:
        return self.storage.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of one example (``(W, C, H, W')`` for a set of frame windows)."""
        return tuple(self.storage.shape[1:])  # type: ignore[return-value]

    def __getitem__(self, idx: int | slice | Tensor) -> dict[str, Tensor]:
        out = {"x": _to_float(self.storage[idx])}
        if self.labels is not None:
            out["labels"] = self.labels[idx]
        return out

    def sample_batch(self, batch_size: int, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``batch_size`` examples drawn uniformly with replacement, randomly flipped if ``hflip``."""
        idx = torch.randint(len(self), (batch_size,), generator=generator)
        batch = self[idx]
        if self.hflip:
            batch["x"] = random_hflip(batch["x"], generator=generator)
        return batch


def _compact(images: Tensor) -> Tensor:
    """uint8 storage when every value is an exact level ``u / 127.5 - 1`` (checked bit for bit), else float32."""
    if images.dtype == torch.uint8:
        return images.contiguous()
    x = images.to(torch.float32).contiguous()
    if x.numel() and bool(((x >= -1) & (x <= 1)).all()):
        u = float_to_uint8(x)
        if torch.equal(uint8_to_float(u), x):
            return u
    return x


def _to_float(stored: Tensor) -> Tensor:
    return uint8_to_float(stored) if stored.dtype == torch.uint8 else stored


# ----------------------------------------------------------------------------------------------- synthetic


def gmm_image_mixture(
    image_size: int = 8, channels: int = 1, *, num_components: int = 8, num_classes: int = 4, seed: int = 0
) -> GaussianMixture:
    """The float64 :class:`~simdiff.toy.GaussianMixture` behind ``gmm_images`` (dim = C * H * W).

    Means are uniform in [-0.6, 0.6] per pixel, per-pixel std 0.1, so samples lie in [-1, 1] up to a 4-sigma
    event; they are not clipped, so ``mixture.denoise`` stays the exact optimal denoiser for the data set.
    Component ``k`` has class ``k % num_classes``.
    """
    g = torch.Generator().manual_seed(seed)
    dim = channels * image_size * image_size
    means = torch.rand(num_components, dim, generator=g, dtype=torch.float64) * 1.2 - 0.6
    return GaussianMixture(means, 0.01, classes=torch.arange(num_components) % num_classes)


def _gmm_images(cfg: DataConfig) -> RawData:
    splits = {"train": 1, "test": 2}
    if cfg.split not in splits:
        raise DataError(f"unknown split {cfg.split!r} for data set 'gmm_images'; valid: {', '.join(splits)}")
    size, ch = cfg.image_size or 8, cfg.channels or 1
    mix = gmm_image_mixture(size, ch)
    x, y = mix.sample(cfg.limit or 1024, generator=torch.Generator().manual_seed(splits[cfg.split]))
    names = tuple(f"class{i}" for i in range(mix.num_classes))
    x = x.to(torch.float32).view(-1, ch, size, size)
    return RawData(x, y.long(), mix.num_classes, names, {"mixture": mix})


def _folder(cfg: DataConfig) -> RawData:
    if cfg.root is None:
        raise ConfigError("data.root (the image folder) is required for the 'folder' data set")
    if cfg.image_size is None:
        raise ConfigError("data.image_size is required for the 'folder' data set")
    fd = load_folder(cfg.root, size=cfg.image_size, channels=cfg.channels, on_error=cfg.on_error, limit=cfg.limit)
    labels = None if fd.labels is None else torch.from_numpy(fd.labels)
    info = {"files": [str(f) for f in fd.files], "skipped": fd.skipped}
    return RawData(uint8_to_float(fd.images), labels, len(fd.class_names), fd.class_names, info)


DATASETS: dict[str, Callable[[DataConfig], RawData]] = {
    "mnist": lambda cfg: load_mnist(cfg.split),
    "digits": lambda cfg: load_digits(cfg.split),
    "fashion_mnist": lambda cfg: load_fashion_mnist(cfg.split, cfg.root),
    "animal_mnist": lambda cfg: load_animal_mnist(cfg.split),
    "folder": _folder,
    "gmm_images": _gmm_images,
    "text": lambda cfg: _lazy("simdiff.data.text", "load_text")(cfg),
    "mnist_captions": lambda cfg: _lazy("simdiff.data.captions", "load_captions")(cfg),
    "fashion_captions": lambda cfg: _lazy("simdiff.data.captions", "load_captions")(cfg),
    "pairs": lambda cfg: _lazy("simdiff.semantica.pairs", "load_pairs")(cfg),
    "kolmogorov": lambda cfg: _lazy("simdiff.data.video_sets", "load_sequence_windows")("kolmogorov", cfg),
    "moving_mnist": lambda cfg: _lazy("simdiff.data.video_sets", "load_sequence_windows")("moving_mnist", cfg),
    "photos": lambda cfg: _lazy("simdiff.data.photos", "load_photos")(cfg),
}


def _lazy(module: str, name: str) -> Callable[[DataConfig], RawData]:
    """The loader ``module.name``, imported on first use (sources with heavier or optional dependencies)."""
    import importlib

    return getattr(importlib.import_module(module), name)


def build_dataset(cfg: DataConfig | dict[str, Any]) -> ImageDataset:
    """Load the data set named by ``cfg`` (a :class:`DataConfig` or its dict) into memory.

    Raises:
        ConfigError: unknown name (the message lists the valid ones) or a bad config value.
        DataError: data missing (with the install command) or unreadable.
    """
    if not isinstance(cfg, DataConfig):
        cfg = from_dict(DataConfig, dict(cfg), where="data")
    loader = get_registered(DATASETS, cfg.name, "data set")
    raw = loader(cfg)
    x, y = raw.images, raw.labels
    if cfg.limit is not None:
        x, y = x[: cfg.limit], None if y is None else y[: cfg.limit]
    if x.dim() == 5:  # windows of frames: the source has applied its own size options
        info = {"config": dataclasses.asdict(cfg), "native_shape": tuple(x.shape[1:]), **(raw.info or {})}
        return ImageDataset(x.contiguous(), y, raw.num_classes, raw.class_names, cfg.hflip, cfg.name, info)
    if cfg.channels == 1:
        x = convert_channels(x, 1)
    if cfg.image_size is not None:
        x = resize_images(x, cfg.image_size)
    x = convert_channels(x, cfg.channels)
    info: dict[str, Any] = {"config": dataclasses.asdict(cfg), "native_shape": tuple(raw.images.shape[1:])}
    info.update(raw.info or {})
    return ImageDataset(x.contiguous(), y, raw.num_classes, raw.class_names, cfg.hflip, cfg.name, info)
