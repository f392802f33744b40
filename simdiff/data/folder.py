"""Robust image decoding (Pillow) and image-folder loading, shared by the folder data set and
:func:`simdiff.images.load_image`.

Every file goes through :func:`decode_image`: EXIF orientation applied, palette / 16-bit / CMYK / alpha modes
normalised (alpha composited on white), converted to grey or RGB, and optionally resized so the shorter side is
``size`` and centre-cropped to ``size x size``. Any failure becomes an :class:`ImageLoadError` naming the file.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from simdiff.data.errors import DataError, ImageLoadError

__all__ = ["IMAGE_EXTENSIONS", "decode_image", "scan_images", "load_folder", "FolderData"]

log = logging.getLogger("simdiff.data")

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def _to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth grey ("I", "I;16*", "F") -> "L": 16-bit values scaled by 255/65535, floats clipped to 0..255."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr8 = np.clip(np.rint(arr), 0, 255)
    else:
        arr8 = np.clip(np.rint(arr.astype(np.float64) / 257.0), 0, 255)
    return Image.fromarray(arr8.astype(np.uint8), "L")


def _normalise(img: Image.Image, channels: int | None) -> Image.Image:
    """Any Pillow mode -> "L" or "RGB" (``channels`` 1 / 3, or the image's own kind when None)."""
    grey = img.mode in _GREY_MODES
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    elif img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    want = channels if channels is not None else (1 if grey else 3)
    if want not in (1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels}")
    return img.convert("L" if want == 1 else "RGB")  # RGB -> L uses BT.601 luma, as transforms.LUMA


def _fit(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bicubic, antialiased by Pillow) and centre-crop to a square."""
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def decode_image(path: str | Path, *, size: int | None = None, channels: int | None = None) -> np.ndarray:
    """Decode one image file to uint8 ``[H, W, C]`` (C = 1 or 3).

    Args:
        path: the image file.
        size: if given, shorter side resized to ``size`` then centre-cropped to ``size x size``.
        channels: 1 (grey), 3 (RGB) or None (grey for grey files, RGB otherwise).

    Raises:
        ImageLoadError: ``"<path>: <reason>"`` for a missing, empty, corrupt, truncated or unsupported file.
    """
    p = Path(path)
    try:
        if p.stat().st_size == 0:
            raise ImageLoadError(p, "empty file (0 bytes)")
        with Image.open(p) as im:
            im.load()  # force full decoding so truncation is caught here
            img = ImageOps.exif_transpose(im)
            img = _normalise(img, channels)
        if size is not None:
            img = _fit(img, size)
        arr = np.array(img, dtype=np.uint8)  # a writable copy
    except ImageLoadError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageLoadError(p, "not a recognised image format") from None
    except FileNotFoundError:
        raise ImageLoadError(p, "file not found") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageLoadError(p, reason) from None
    return arr[..., None] if arr.ndim == 2 else arr


def scan_images(root: str | Path) -> list[Path]:
    """All files under ``root`` (recursive) whose suffix is an image extension (any case), sorted by path."""
    r = Path(root)
    files = [p for p in r.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(r).as_posix())


@dataclass
class FolderData:
    """Result of :func:`load_folder`: uint8 ``images [N, H, W, C]``, ``labels [N]`` (or None), class names,
    the files loaded and the ``(path, reason)`` pairs skipped."""

    images: np.ndarray
    labels: np.ndarray | None
    class_names: tuple[str, ...]
    files: list[Path]
    skipped: list[tuple[str, str]]


def load_folder(
    root: str | Path,
    *,
    size: int,
    channels: int | None = None,
    on_error: str = "stop",
    limit: int | None = None,
    workers: int | None = None,
) -> FolderData:
    """Load every image under ``root`` (recursive, sorted), resized and centre-cropped to ``size x size``.

    Labels: if every image sits inside a first-level sub-folder and there are at least two of them, the sorted
    sub-folder names are the classes; otherwise the set is unlabelled. ``channels=None`` gives grey if every
    image is grey, else RGB. ``on_error="stop"`` raises the first :class:`ImageLoadError`; ``"skip"`` leaves bad
    files out and logs one line ``skipped K of N files (first: <path>: <reason>)``. ``limit`` keeps the first
    ``limit`` files in sorted order. Decoding runs in a thread pool (Pillow releases the GIL while decoding).
    """
    r = Path(root)
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    if not r.is_dir():
        raise DataError(f"image folder not found: {r}")
    files = scan_images(r)
    if not files:
        raise DataError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) found under {r}")
    rel = [f.relative_to(r).parts for f in files]
    subdirs = sorted({parts[0] for parts in rel if len(parts) > 1})
    labelled = all(len(parts) > 1 for parts in rel) and len(subdirs) > 1
    if limit is not None:
        files, rel = files[:limit], rel[:limit]

    def one(f: Path) -> np.ndarray | ImageLoadError:
        try:
            return decode_image(f, size=size, channels=channels)
        except ImageLoadError as e:
            if on_error == "stop":
                raise
            return e

    n_workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    if len(files) >= 64 and n_workers > 1:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            results = list(pool.map(one, files))  # re-raises the first error in file order
    else:
        results = [one(f) for f in files]

    keep = [i for i, a in enumerate(results) if not isinstance(a, ImageLoadError)]
    skipped = [(a.path, a.reason) for a in results if isinstance(a, ImageLoadError)]
    if skipped:
        msg = f"skipped {len(skipped)} of {len(files)} files (first: {skipped[0][0]}: {skipped[0][1]})"
        if not keep:
            raise DataError(f"no image under {r} could be loaded; {msg}")
        log.warning(msg)
    arrays = [results[i] for i in keep]
    if channels is None and any(a.shape[-1] == 3 for a in arrays):
        arrays = [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in arrays]
    images = np.stack(arrays)
    labels = None
    if labelled:
        index = {name: i for i, name in enumerate(subdirs)}
        labels = np.array([index[rel[i][0]] for i in keep], dtype=np.int64)
    return FolderData(images, labels, tuple(subdirs) if labelled else (), [files[i] for i in keep], skipped)
