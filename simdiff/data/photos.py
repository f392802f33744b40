"""Natural-photo patches from the test photos shipped inside the scikit-image and scikit-learn wheels.

Nothing is downloaded: the photos are files inside the installed packages (read with Pillow; the packages are not
imported). Seven colour photographs of everyday scenes are used; the split is by source photo, so no patch of a
test photo is ever in the training set:

=========  ==========================================================================================
split      photos (source, native size H x W)
=========  ==========================================================================================
train      astronaut (skimage, 512x512), coffee (skimage, 400x600), rocket (skimage, 427x640),
           motorcycle_left (skimage, 500x741), flower (sklearn, 427x640)
test       chelsea (skimage, 300x451), china (sklearn, 427x640)
=========  ==========================================================================================

Patches are cut on a regular grid (row-major, top-left first, no padding), so the set is deterministic. At the
default 64x64 with stride 32 for "train" and stride 64 (non-overlapping) for "test" the counts are
train 1176 patches (astronaut 225, coffee 187, rocket 228, motorcycle_left 308, flower 228),
test 88 (chelsea 28, china 60). This is a small-data regime: the training
patches overlap and come from only five scenes. Scientific/medical images in the skimage folder (Hubble field,
retina, immunohistochemistry) and the grey textures are left out on purpose.

``DataConfig(name="photos", split="train", options={"patch_size": 64, "stride": 32})`` loads it through
:func:`load_photos` (valid option keys: ``patch_size``, ``stride``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from simdiff.data.errors import DataError
from simdiff.data.sources import RawData
from simdiff.data.transforms import uint8_to_float

__all__ = ["PHOTOS", "PHOTO_SPLITS", "photo_path", "load_photo", "photo_patches", "patch_grid", "load_photos"]

#: name -> (package, path inside the package)
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle_left": ("skimage", "data/motorcycle_left.png"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),
}
PHOTO_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("astronaut", "coffee", "rocket", "motorcycle_left", "flower"),
    "test": ("chelsea", "china"),
}
_PIP_NAME = {"skimage": "scikit-image", "sklearn": "scikit-learn"}


def photo_path(name: str) -> Path:
    """Location of photo ``name`` inside its installed package (DataError naming the install command if absent)."""
    if name not in PHOTOS:
        raise DataError(f"unknown photo {name!r}; valid: {', '.join(PHOTOS)}")
    package, relative = PHOTOS[name]
    spec = importlib.util.find_spec(package)
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(loc) / relative
        if p.is_file():
            return p
    raise DataError(f"photo {name!r} not found ({package}/{relative}); install it with: pip install "
                    f"{_PIP_NAME[package]}")


def load_photo(name: str) -> np.ndarray:
    """Photo ``name`` as uint8 ``[H, W, 3]`` (RGB; any alpha channel dropped)."""
    path = photo_path(name)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except OSError as e:
        raise DataError(f"{path}: cannot decode photo ({e})") from None


def patch_grid(height: int, width: int, *, size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners ``(row, col)`` of the ``size x size`` patches at ``stride`` that fit inside the image."""
    if size < 1 or stride < 1:
        raise DataError(f"patch size and stride must be positive, got size={size} stride={stride}")
    return [(r, c) for r in range(0, height - size + 1, stride) for c in range(0, width - size + 1, stride)]


def photo_patches(split: str, *, size: int = 64, stride: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All patches of the photos of ``split``.

    Args:
        split: "train" or "test" (photos listed in :data:`PHOTO_SPLITS`).
        size: patch side.
        stride: grid step; default ``size // 2`` for "train" and ``size`` (non-overlapping) for "test".

    Returns:
        ``(patches uint8 [N, size, size, 3], source int64 [N])`` where ``source`` indexes ``PHOTO_SPLITS[split]``.
    """
    if split not in PHOTO_SPLITS:
        raise DataError(f"unknown split {split!r} for data set 'photos'; valid: {', '.join(PHOTO_SPLITS)}")
    if stride is None:
        stride = max(1, size // 2) if split == "train" else size
    patches, source = [], []
    for k, name in enumerate(PHOTO_SPLITS[split]):
        img = load_photo(name)
        for r, c in patch_grid(img.shape[0], img.shape[1], size=size, stride=stride):
            patches.append(img[r : r + size, c : c + size])
            source.append(k)
    if not patches:
        raise DataError(f"patch size {size} is larger than every photo of split {split!r}")
    return np.stack(patches), np.asarray(source, dtype=np.int64)


def load_photos(cfg: Any) -> RawData:
    """Data-set loader for ``DataConfig(name="photos")``: patches as ``[N, 3, size, size]`` in [-1, 1], no labels.

    ``cfg.options`` may set ``patch_size`` (default 64) and ``stride`` (default as in :func:`photo_patches`).
    ``info["source"]`` holds each patch's photo index and ``info["photos"]`` the photo names.
    """
    options = dict(getattr(cfg, "options", None) or {})
    unknown = sorted(set(options) - {"patch_size", "stride"})
    if unknown:
        raise DataError(f"unknown option(s) {', '.join(unknown)} for data set 'photos'; valid: patch_size, stride")
    size = int(options.get("patch_size", 64))
    stride = options.get("stride")
    patches, source = photo_patches(cfg.split, size=size, stride=None if stride is None else int(stride))
    info = {"photos": list(PHOTO_SPLITS[cfg.split]), "source": source.tolist(), "patch_size": size}
    return RawData(uint8_to_float(patches), None, 0, (), info)
