"""Training pairs for image-conditioned diffusion: a conditioning image and a *different* target image that belong
together, with whole classes (or a whole data set) held out for few-shot generation.

Semantica (Kumar, Houlsby & Hoogeboom 2024) trains on two random images of the same web page: one is encoded by a
frozen image encoder and conditions the denoising of the other. Small labelled data sets have no pages; here the
rule that makes two images "belong together" is a data option (``data.options.pairing``):

* ``same_class`` (default): the partner is another image of the same class, drawn uniformly among the other
  members of that class at every batch, never the image itself.
* ``shifted_self``: the partner is the image itself translated by a random non-zero offset of up to ``max_shift``
  pixels (filled with -1); never the identical image.

Neither rule is from the paper (it pairs images of one web page); ``same_class`` is the closest analogue on labelled
data. The data set ``pairs`` (``data.name: pairs``) loads the training classes of a source (``mnist``,
``fashion_mnist``, ``animal_mnist``, ``digits`` or ``photos``) and records its options in
``info["pairs"]``; :class:`~simdiff.semantica.train.PairBatches` turns it into training batches.

Source ``photos`` (:func:`load_photo_source`): the natural-photo patches of :mod:`simdiff.data.photos`, each
labelled with the index of its photo in :data:`simdiff.data.photos.PHOTOS` (astronaut 0, coffee 1, rocket 2,
motorcycle_left 3, flower 4 in split "train"; chelsea 5, china 6 in split "test"; class names are the photo names).
``same_class`` then pairs two different grid patches of one photo -- **two crops of the same photo**, overlapping or
not -- which is the closest stand-in here for Semantica's two images of one web page. The split is by photo, so
the test photos are a held-out data set never seen in training; ``holdout_classes`` removes whole photos (by index
or name) from the training split. Patches that repeat an earlier patch pixel for pixel are dropped (at 32x32 with
stride 16 the astronaut photo has ten all-black patches; nine are dropped), so a partner is never the target's
pixels either.

Options (``data.options``; unknown keys are refused):

* ``source``: the labelled source data set (default ``mnist``).
* ``holdout_classes``: classes removed from training, e.g. ``[7, 8, 9]`` (default none); for ``photos`` photo
  indices or names, e.g. ``[flower]``.
* ``patch_size``, ``stride``: ``photos`` only: the patch side (default 32) and grid step (default: half the patch
  side for "train", the patch side for "test"), passed to :func:`simdiff.data.photos.photo_patches`.
* ``pairing``: ``same_class`` or ``shifted_self``. ``max_shift``: pixels for ``shifted_self`` (default 2).
* ``encoder``: the frozen image encoder (:mod:`simdiff.semantica.encoders`), default ``mnist_classifier``.
* ``uncond_prob``: fraction of examples trained with the null context (classifier-free guidance), default 0.1.
* ``num_cond``: conditioning images per example during training (default 1, as in the paper).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from simdiff.configuration import ConfigError, from_dict
from simdiff.data.sources import RawData, load_animal_mnist, load_digits, load_fashion_mnist, load_mnist

__all__ = ["PairOptions", "SOURCES", "PAIRINGS", "PHOTO_PATCH", "load_pairs", "load_source", "load_photo_source",
           "photo_index", "partner_indices", "shift_images", "register"]

#: default patch side of the ``photos`` source (CPU-sized)
PHOTO_PATCH = 32


def load_photo_source(split: str = "train", *, patch_size: int = PHOTO_PATCH, stride: int | None = None,
                      drop_duplicates: bool = True) -> RawData:
    """Grid patches of the photos of ``split`` labelled by photo: ``images [N, 3, s, s]`` in ``[-1, 1]``, ``labels
    [N]`` = index of the source photo in :data:`simdiff.data.photos.PHOTOS`, 7 classes named after the photos.

    Args:
        split: "train" or "test" (:data:`simdiff.data.photos.PHOTO_SPLITS`).
        patch_size, stride: the grid (:func:`simdiff.data.photos.photo_patches`; ``stride=None``: its default).
        drop_duplicates: drop every patch that equals an earlier one pixel for pixel (first one kept).

    ``info`` holds ``photos`` (the split's photo names), ``patch_size``, ``stride`` and ``dropped_duplicates``.
    """
    import numpy as np

    from simdiff.data.errors import DataError
    from simdiff.data.photos import PHOTO_SPLITS, PHOTOS, photo_patches
    from simdiff.data.transforms import uint8_to_float

    try:
        patches, source = photo_patches(split, size=int(patch_size), stride=stride)
    except DataError as e:
        raise ConfigError(f"source photos: {e}") from None
    names = list(PHOTOS)
    labels = np.asarray([names.index(n) for n in PHOTO_SPLITS[split]], dtype=np.int64)[source]
    dropped = 0
    if drop_duplicates:
        flat = patches.reshape(len(patches), -1)
        _, first = np.unique(flat, axis=0, return_index=True)
        keep = np.sort(first)
        dropped = len(patches) - len(keep)
        patches, labels = patches[keep], labels[keep]
    info = {"photos": list(PHOTO_SPLITS[split]), "patch_size": int(patch_size), "stride": stride,
            "dropped_duplicates": int(dropped)}
    return RawData(uint8_to_float(np.ascontiguousarray(patches)), torch.from_numpy(labels), len(names), tuple(names),
                   info)


def photo_index(name_or_index: int | str) -> int:
    """Index of a photo in :data:`simdiff.data.photos.PHOTOS` from its name or index (ConfigError if unknown)."""
    from simdiff.data.photos import PHOTOS

    names = list(PHOTOS)
    if isinstance(name_or_index, str) and not name_or_index.isdigit():
        if name_or_index not in names:
            raise ConfigError(f"unknown photo {name_or_index!r}; valid: {', '.join(names)}")
        return names.index(name_or_index)
    index = int(name_or_index)
    if not 0 <= index < len(names):
        raise ConfigError(f"photo index {index} out of range 0-{len(names) - 1} ({', '.join(names)})")
    return index


#: labelled sources a pair data set can be built from (name -> loader(split, root, **options)).
SOURCES = {
    "mnist": lambda split, root: load_mnist(split),
    "fashion_mnist": lambda split, root: load_fashion_mnist(split, root),
    "animal_mnist": lambda split, root: load_animal_mnist(split),
    "digits": lambda split, root: load_digits("train"),
    "photos": lambda split, root, **options: load_photo_source(split, **options),
}
PAIRINGS = ("same_class", "shifted_self")


@dataclass(frozen=True)
class PairOptions:
    """``data.options`` of the ``pairs`` data set (see the module docstring)."""

    source: str = "mnist"
    holdout_classes: tuple[int, ...] = ()
    pairing: str = "same_class"
    max_shift: int = 2
    encoder: str = "mnist_classifier"
    uncond_prob: float = 0.1
    num_cond: int = 1
    encoder_options: dict[str, Any] = field(default_factory=dict)  # e.g. {tokens: spatial}
    patch_size: int | None = None  # photos only (default PHOTO_PATCH)
    stride: int | None = None  # photos only (default: photo_patches' default)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"data.options.source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        for key in ("patch_size", "stride"):
            value = getattr(self, key)
            if value is not None and self.source != "photos":
                raise ConfigError(f"data.options.{key} applies to source photos only, not {self.source!r}")
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"data.options.{key} must be a positive integer, got {value!r}")
        if self.pairing not in PAIRINGS:
            raise ConfigError(f"data.options.pairing must be one of {', '.join(PAIRINGS)}, got {self.pairing!r}")
        if not isinstance(self.max_shift, int) or not 1 <= self.max_shift <= 8:
            raise ConfigError(f"data.options.max_shift must be an integer in [1, 8], got {self.max_shift!r}")
        if not 0.0 <= float(self.uncond_prob) < 1.0:
            raise ConfigError(f"data.options.uncond_prob must be in [0, 1), got {self.uncond_prob!r}")
        if not isinstance(self.num_cond, int) or self.num_cond < 1:
            raise ConfigError(f"data.options.num_cond must be an integer >= 1, got {self.num_cond!r}")
        if any(not isinstance(c, int) or c < 0 for c in self.holdout_classes):
            raise ConfigError(f"data.options.holdout_classes must be class indices >= 0, got {self.holdout_classes}")

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> PairOptions:
        """``data.options`` dict -> :class:`PairOptions` (one-line ConfigError naming a bad or unknown key)."""
        options = dict(options or {})
        if "holdout_classes" in options:
            held = options["holdout_classes"] or ()
            held = [held] if isinstance(held, (int, str)) else held
            if options.get("source") == "photos":
                held = [photo_index(c) for c in held]
            options["holdout_classes"] = tuple(held)
        return from_dict(cls, options, where="data.options")

    def source_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`load_source` for this source (``photos``: its patch grid)."""
        if self.source != "photos":
            return {}
        return {"patch_size": self.patch_size or PHOTO_PATCH, "stride": self.stride}


def load_source(source: str, split: str = "train", root: str | None = None, *, classes=None, exclude=(),
                **options: Any) -> RawData:
    """A labelled source restricted to ``classes`` (``None``: all) minus ``exclude``; images in ``[-1, 1]``.

    ``options`` go to the source's loader (``photos``: ``patch_size``, ``stride``, ``drop_duplicates``)."""
    if source not in SOURCES:
        raise ConfigError(f"unknown pair source {source!r}; valid: {', '.join(SOURCES)}")
    if options and source != "photos":
        raise ConfigError(f"source {source!r} takes no options, got {', '.join(sorted(options))}")
    raw = SOURCES[source](split, root, **options)
    keep = torch.ones(len(raw.labels), dtype=torch.bool)
    if classes is not None:
        keep &= torch.isin(raw.labels, torch.as_tensor(list(classes), dtype=torch.long))
    if exclude:
        keep &= ~torch.isin(raw.labels, torch.as_tensor(list(exclude), dtype=torch.long))
    return RawData(raw.images[keep].contiguous(), raw.labels[keep].contiguous(), raw.num_classes, raw.class_names,
                   raw.info)


def load_pairs(cfg) -> RawData:
    """The ``pairs`` data set of a :class:`~simdiff.data.DataConfig`: the source's split minus the held-out classes.

    ``info["pairs"]`` holds the parsed options (a dict) and the training classes."""
    opts = PairOptions.parse(cfg.options)
    raw = load_source(opts.source, cfg.split, cfg.root, exclude=opts.holdout_classes, **opts.source_options())
    if len(raw.labels) == 0:
        raise ConfigError(f"data.options.holdout_classes {list(opts.holdout_classes)} leaves no training images")
    classes = sorted(set(raw.labels.tolist()))
    if opts.pairing == "same_class":
        counts = torch.bincount(raw.labels)
        lonely = [c for c in classes if counts[c] < 2]
        if lonely and cfg.limit is None:
            raise ConfigError(f"pairing same_class needs >= 2 images per class; class {lonely[0]} has one")
    info = {"pairs": {**dataclasses.asdict(opts), "train_classes": classes}, **(raw.info or {})}
    return RawData(raw.images, raw.labels, raw.num_classes, raw.class_names, info)


def partner_indices(labels: Tensor, idx: Tensor, *, generator: torch.Generator, num: int = 1) -> Tensor:
    """For each example ``idx[b]`` ``num`` partners: other indices with the same label, uniform, never ``idx[b]``.

    Args:
        labels: ``[N]`` class of every example of the data set.
        idx: ``[B]`` indices of the targets.
        generator: CPU RNG.
        num: partners per target.

    Returns:
        ``[B, num]`` long indices into the data set.

    Raises:
        ValueError: a target whose class has no other member.
    """
    labels, idx = labels.long(), idx.long().reshape(-1)
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1)
    starts = torch.cumsum(counts, 0) - counts
    cls = labels[idx]
    n = counts[cls]
    if bool((n < 2).any()):
        bad = int(cls[n < 2][0])
        raise ValueError(f"class {bad} has a single example: no partner other than the image itself")
    # position of each target inside its class block, then a uniform draw among the n - 1 other positions
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    own = rank[idx] - starts[cls]
    u = torch.rand(len(idx), num, generator=generator)
    pick = (u * (n - 1)[:, None]).long().clamp_max((n - 2)[:, None])
    pick = pick + (pick >= own[:, None]).long()  # skip the target's own position
    return order[starts[cls][:, None] + pick]


def shift_images(x: Tensor, *, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image ``[B, C, H, W]`` by a random non-zero offset in ``[-max_shift, max_shift]^2`` (the
    vacated border filled with -1, the background of ``[-1, 1]`` images)."""
    b = x.shape[0]
    offsets = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=generator)
    zero = (offsets == 0).all(1)
    offsets[zero, 0] = torch.where(torch.rand(int(zero.sum()), generator=generator) < 0.5, -1, 1)
    pad = max_shift
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)
    h, w = x.shape[-2:]
    out = torch.empty_like(x)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, pad - dy : pad - dy + h, pad - dx : pad - dx + w]
    return out


def register() -> None:
    """Add ``pairs`` to :data:`simdiff.data.datasets.DATASETS` (idempotent)."""
    from simdiff.data.datasets import DATASETS

    DATASETS.setdefault("pairs", load_pairs)
