"""Standard codecs through Pillow (JPEG, WebP, AVIF; JPEG XL with the ``pillow-jxl-plugin`` package) as a base layer.

Every codec is driven by one integer quality in 0..100 (Pillow's ``quality`` argument); :func:`search_quality`
finds the highest quality whose file fits a bit budget (bisection; file size is monotone in quality for all four
codecs in practice, and the search only ever keeps a quality it has measured). Settings: JPEG ``optimize=True``
(Huffman tables optimised, 4:2:0 chroma), WebP ``method=6`` (slowest/best), AVIF ``speed=6`` (Pillow's default),
JPEG XL ``effort=7`` (libjxl's default). Bits per pixel always count the whole file, codec headers included (a
JPEG's tables alone are ~600 bytes, so JPEG cannot go below ~1.3 bpp on a 64x64 patch).
"""

from __future__ import annotations

import importlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, features

from simdiff.configuration import ConfigError

from .format import Header, pack, unpack

__all__ = ["STANDARD_CODECS", "available", "encode_native", "decode_native", "sniff", "search_quality",
           "StandardCodec", "bits_per_pixel"]

#: name -> (Pillow format, save options besides quality)
STANDARD_CODECS: dict[str, tuple[str, dict]] = {
    "jpeg": ("JPEG", {"optimize": True}),
    "webp": ("WEBP", {"method": 6}),
    "avif": ("AVIF", {"speed": 6}),
    "jxl": ("JXL", {"effort": 7}),
}
_INSTALL = {"avif": "Pillow >= 11.2 (AVIF built in) or pip install pillow-avif-plugin",
            "jxl": "pip install pillow-jxl-plugin", "webp": "a Pillow built with WebP", "jpeg": "Pillow"}


def available(codec: str) -> bool:
    """Whether Pillow can write ``codec`` here (JPEG XL registers itself when ``pillow_jxl`` is importable)."""
    if codec not in STANDARD_CODECS:
        raise ConfigError(f"unknown standard codec {codec!r}; valid: {', '.join(STANDARD_CODECS)}")
    if codec == "jxl":
        try:
            importlib.import_module("pillow_jxl")
        except ImportError:
            return False
        return True
    return bool(features.check({"jpeg": "jpg", "webp": "webp", "avif": "avif"}[codec]))


def _require(codec: str) -> None:
    if not available(codec):
        raise ConfigError(f"codec {codec!r} is not available here; install {_INSTALL[codec]}")


def bits_per_pixel(num_bytes: int, height: int, width: int) -> float:
    """``num_bytes * 8 / (height * width)``."""
    return num_bytes * 8.0 / (height * width)


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image must be uint8 [H, W, 1 or 3], got {image.dtype} {image.shape}")


def encode_native(image: np.ndarray, codec: str, quality: int) -> bytes:
    """``image`` uint8 ``[H, W, C]`` (C = 1 or 3) -> the codec's own file bytes at ``quality`` (0..100)."""
    _check_image(image)
    _require(codec)
    if not 0 <= quality <= 100:
        raise ConfigError(f"quality must be in 0..100, got {quality}")
    fmt, options = STANDARD_CODECS[codec]
    pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
    if codec != "jpeg" and pil.mode == "L":
        pil = pil.convert("RGB")  # WebP/AVIF/JXL writers here take RGB; the decoder converts back
    buf = io.BytesIO()
    pil.save(buf, format=fmt, quality=int(quality), **options)
    return buf.getvalue()


def sniff(data: bytes) -> str | None:
    """The standard codec whose file signature ``data`` starts with, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[4:12] in (b"ftypavif", b"ftypavis"):
        return "avif"
    if data[:2] == b"\xff\x0a" or data[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "jxl"
    return None


def decode_native(data: bytes, *, channels: int = 3, where: str = "input") -> np.ndarray:
    """A JPEG/WebP/AVIF/JPEG XL file's bytes -> uint8 ``[H, W, channels]`` (ConfigError with one line if bad)."""
    codec = sniff(data)
    if codec is None:
        raise ConfigError(f"{where}: not a JPEG, WebP, AVIF or JPEG XL file")
    _require(codec)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise ConfigError(f"{where}: cannot decode {codec} data ({str(e).splitlines()[0] if str(e) else e})") from None
    return arr[..., None] if channels == 1 else arr.copy()


def search_quality(image: np.ndarray, codec: str, target_bpp: float, *, lo: int = 0, hi: int = 100
                   ) -> tuple[int, bytes]:
    """Highest quality in ``[lo, hi]`` whose file has at most ``target_bpp`` bits per pixel (bisection).

    Returns ``(quality, file bytes)``; if even ``lo`` overshoots, ``(lo, its bytes)`` (check the returned size).
    """
    h, w = image.shape[:2]
    best = (lo, encode_native(image, codec, lo))
    if bits_per_pixel(len(best[1]), h, w) > target_bpp:
        return best
    while lo < hi:
        mid = (lo + hi + 1) // 2
        data = encode_native(image, codec, mid)
        if bits_per_pixel(len(data), h, w) <= target_bpp:
            lo, best = mid, (mid, data)
        else:
            hi = mid - 1
    return best


@dataclass(frozen=True)
class StandardCodec:
    """A standard codec as a base layer: ``compress(image, rate)`` with ``rate`` = quality 0..100, wrapped in an
    ``.sdc`` container (about 12 header bytes on top of the codec's file); ``decompress`` takes an ``.sdc`` or the
    codec's own file."""

    codec: str = "jpeg"

    def __post_init__(self) -> None:
        available(self.codec)  # validates the name

    @property
    def name(self) -> str:
        return self.codec

    def compress(self, image: np.ndarray, rate: int) -> bytes:
        """uint8 ``[H, W, C]`` -> ``.sdc`` bytes."""
        payload = encode_native(image, self.codec, rate)
        return pack(Header(self.codec, image.shape[0], image.shape[1], image.shape[2], rate=rate), payload)

    def decompress(self, data: bytes, *, where: str = "input") -> np.ndarray:
        """``.sdc`` or native file bytes -> uint8 ``[H, W, C]``."""
        if sniff(data) is not None:
            return decode_native(data, where=where)
        header, payload = unpack(data, where=where)
        if header.codec != self.codec:
            raise ConfigError(f"{where}: holds a {header.codec} stream, this decoder reads {self.codec}")
        image = decode_native(payload, channels=header.channels, where=where)
        if image.shape[:2] != (header.height, header.width):
            raise ConfigError(f"{where}: corrupted file (payload is {image.shape[:2]}, header says "
                              f"{header.height}x{header.width})")
        return image
