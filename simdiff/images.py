"""Image I/O: tensors in [-1, 1] <-> uint8 arrays, grids, PNG files (written atomically), robust loading.

Pixel convention (shared with :mod:`simdiff.data`): uint8 ``u`` <-> ``u / 127.5 - 1``.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from simdiff.configuration import ConfigError
from simdiff.data.folder import decode_image
from simdiff.data.transforms import float_to_uint8, uint8_to_float

__all__ = ["to_uint8", "make_grid", "save_grid", "save_images", "load_image", "check_output"]


def to_uint8(x: Tensor) -> np.ndarray:
    """``[C, H, W]`` or ``[N, C, H, W]`` float in [-1, 1] -> uint8 ``[H, W, C]`` / ``[N, H, W, C]`` NumPy array.

    Values are clipped to [-1, 1] and rounded: ``round((x + 1) * 127.5)``.
    """
    if x.dim() not in (3, 4):
        raise ValueError(f"expected [C, H, W] or [N, C, H, W], got shape {tuple(x.shape)}")
    return float_to_uint8(x).movedim(-3, -1).cpu().numpy()


def make_grid(x: Tensor, *, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Tile ``x [N, C, H, W]`` into one image ``[C, rows * (H + p) + p, nrow * (W + p) + p]``.

    ``nrow`` is the number of images per row (default ``ceil(sqrt(N))``); empty cells and the ``padding``-pixel
    borders are filled with ``pad_value`` (1.0 = white in [-1, 1]).
    """
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch [N, C, H, W], got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, c, h, w = x.shape
    ncol = nrow if nrow is not None else math.ceil(math.sqrt(n))
    if ncol < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    ncol = min(ncol, n)
    rows = math.ceil(n / ncol)
    fill = x.new_full((rows * ncol - n, c, h, w), pad_value)
    cells = F.pad(torch.cat([x, fill]), (0, padding, 0, padding), value=pad_value)  # right/bottom border per cell
    hp, wp = h + padding, w + padding
    grid = cells.view(rows, ncol, c, hp, wp).permute(2, 0, 3, 1, 4).reshape(c, rows * hp, ncol * wp)
    return F.pad(grid[None], (padding, 0, padding, 0), value=pad_value)[0]  # left/top outer border


def _image_format(p: Path) -> str:
    fmt = Image.registered_extensions().get(p.suffix.lower())
    if fmt is None:
        raise ValueError(f"{p}: unknown image file extension {p.suffix!r} (use .png)")
    return fmt


def check_output(path: str | Path, *, what: str, directory: bool = False, image: bool = False) -> Path:
    """Refuse, with one line naming ``what`` (e.g. ``"--out"``), an output path that cannot be written, before any
    work: a file path that is a directory, a folder path that is a file, a parent that is a file, or a folder
    where no file can be created (probed by creating and removing a temporary file in the nearest existing folder;
    nothing else is created). ``image`` also checks the image file extension. Returns the path.

    Raises:
        ConfigError: one line, ``<what> <path>: <reason>``.
    """
    p = Path(path)
    if directory and p.exists() and not p.is_dir():
        raise ConfigError(f"{what} {p}: exists and is not a folder")
    if not directory and p.is_dir():
        raise ConfigError(f"{what} {p}: is a folder; give a file path")
    if image and not directory:
        try:
            _image_format(p)
        except ValueError as e:
            raise ConfigError(f"{what} {e}") from None
    folder = p if directory else p.parent
    nearest = folder
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise ConfigError(f"{what} {p}: {nearest} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".simdiff-probe-", dir=nearest)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{what} {p}: cannot write in {nearest} ({e.strerror or e}); choose another path") from None
    return p


def _atomic_save(img: Image.Image, path: str | Path) -> Path:
    """Write ``img`` to ``path`` via a temporary file in the same folder and ``os.replace`` (no half-written files).

    Raises:
        ValueError: an unknown extension, or ``<path>: cannot write ...`` when the OS refuses (no temp file is left).
    """
    p = Path(path)
    fmt = _image_format(p)
    tmp = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        with os.fdopen(fd, "wb") as f:
            img.save(f, format=fmt)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; give the usual permissions of a written file
        os.replace(tmp, p)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise ValueError(f"{p}: cannot write the image ({e.strerror or e})") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return p


def _to_pil(hwc: np.ndarray) -> Image.Image:
    if hwc.shape[-1] == 1:
        return Image.fromarray(hwc[..., 0], "L")
    if hwc.shape[-1] == 3:
        return Image.fromarray(hwc, "RGB")
    raise ValueError(f"can only save 1- or 3-channel images, got {hwc.shape[-1]} channels")


def save_grid(x: Tensor, path: str | Path, *, nrow: int | None = None, scale: int = 1, padding: int = 2) -> Path:
    """Save ``x [N, C, H, W]`` (or ``[C, H, W]``) in [-1, 1] as one grid image (PNG by suffix), atomically.

    ``scale`` > 1 enlarges the whole grid by integer nearest-neighbour repetition (for 8x8 / 28x28 samples).
    """
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    arr = to_uint8(make_grid(x.detach(), nrow=nrow, padding=padding))
    if scale > 1:
        arr = arr.repeat(scale, axis=0).repeat(scale, axis=1)
    return _atomic_save(_to_pil(arr), path)


def save_images(x: Tensor, folder: str | Path, *, prefix: str = "sample", start: int = 0) -> list[Path]:
    """Save each image of ``x [N, C, H, W]`` as ``folder/{prefix}_{start + i:06d}.png``; returns the paths."""
    if x.dim() != 4:
        raise ValueError(f"expected [N, C, H, W], got shape {tuple(x.shape)}")
    arrs = to_uint8(x)
    return [_atomic_save(_to_pil(a), Path(folder) / f"{prefix}_{start + i:06d}.png") for i, a in enumerate(arrs)]


def load_image(path: str | Path, *, size: int | None = None, channels: int | None = None) -> Tensor:
    """Load one image as ``[C, H, W]`` float32 in [-1, 1] with the folder data set's loader.

    Args:
        size: shorter side resized to ``size`` and centre-cropped square; None keeps the file's size.
        channels: 1, 3 or None (the file's own: grey stays grey, everything else RGB).

    Raises:
        ImageLoadError: ``"<path>: <reason>"`` if the file cannot be decoded.
    """
    return uint8_to_float(decode_image(path, size=size, channels=channels)[None])[0]
