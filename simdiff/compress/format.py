"""The ``.sdc`` container: a small header plus the base layer's bitstream.

Layout (all integers unsigned; ``varint`` is LEB128, 7 bits a byte, low bits first)::

    offset  size      field
    0       3         magic b"SDC"
    3       1         format version (FORMAT_VERSION)
    4       1         codec id (CODECS: 0 learned, 1 jpeg, 2 webp, 3 avif, 4 jxl)
    5       1         flags: bits 0-1 channels - 1 (1 or 3 channels); bits 2-7 reserved, 0
    6       varint    height
            varint    width
            1         model id length L (0-255), then L bytes of ASCII model id ("" for a standard codec)
            4         model hash (first 4 bytes of the SHA-256 of the model's weights and config; zeros if none)
            1         rate index
            varint    payload length P
            P         payload (the codec's own bitstream)
            4         CRC-32 (zlib) of every byte before it

The header costs about 20 bytes (160 bits; 0.04 bpp on a 64x64 patch); every bit-rate reported by simdiff counts
the whole file. Decoding checks, in order: length, magic, version, codec, payload length (truncation) and CRC
(corruption), each failure one line (:class:`~simdiff.configuration.ConfigError`). Writers go through
:func:`write_atomic`, so a failed encode or decode never leaves a partial output file.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

from simdiff.configuration import ConfigError

__all__ = ["MAGIC", "FORMAT_VERSION", "CODECS", "Header", "pack", "unpack", "write_atomic", "read_container"]

MAGIC = b"SDC"
FORMAT_VERSION = 1
CODECS = ("learned", "jpeg", "webp", "avif", "jxl")


@dataclass(frozen=True)
class Header:
    """What an ``.sdc`` file says about its payload.

    Attributes:
        codec: base-layer codec, one of :data:`CODECS`.
        height, width: image size in pixels.
        channels: 1 or 3.
        model_id: short ASCII name of the learned model ("" for standard codecs).
        model_hash: 4 bytes identifying the exact model weights (``b"\\0" * 4`` for standard codecs).
        rate: rate index (which model of a family, or the codec's quality setting).
    """

    codec: str
    height: int
    width: int
    channels: int = 3
    model_id: str = ""
    model_hash: bytes = b"\0\0\0\0"
    rate: int = 0

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ConfigError(f"unknown codec {self.codec!r}; valid: {', '.join(CODECS)}")
        if self.height < 1 or self.width < 1:
            raise ConfigError(f"image size must be positive, got {self.height}x{self.width}")
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.model_hash) != 4:
            raise ConfigError(f"model hash must be 4 bytes, got {len(self.model_hash)}")
        if not 0 <= self.rate <= 255:
            raise ConfigError(f"rate index must be in 0..255, got {self.rate}")
        try:
            ok = len(self.model_id.encode("ascii")) <= 255
        except UnicodeEncodeError:
            ok = False
        if not ok:
            raise ConfigError(f"model id must be ASCII of at most 255 characters, got {self.model_id!r}")


def varint(n: int) -> bytes:
    """``n >= 0`` as an unsigned LEB128 varint (7 bits a byte, high bit = more bytes follow)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes, where: str):
        self.data, self.pos, self.where = data, 0, where

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ConfigError(f"{self.where}: file is truncated (header or payload cut short)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def varint(self) -> int:
        n = shift = 0
        while True:
            byte = self.take(1)[0]
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return n
            if shift > 63:
                raise ConfigError(f"{self.where}: corrupted header (bad integer)")


def pack(header: Header, payload: bytes) -> bytes:
    """The bytes of an ``.sdc`` file holding ``payload`` under ``header``."""
    mid = header.model_id.encode("ascii")
    body = b"".join([
        MAGIC, bytes([FORMAT_VERSION, CODECS.index(header.codec), header.channels - 1]),
        varint(header.height), varint(header.width), bytes([len(mid)]), mid, header.model_hash,
        bytes([header.rate]), varint(len(payload)), payload,
    ])  # fmt: skip
    return body + zlib.crc32(body).to_bytes(4, "little")


def unpack(data: bytes, *, where: str = "input") -> tuple[Header, bytes]:
    """Parse and check an ``.sdc`` file's bytes -> ``(header, payload)``.

    Raises:
        ConfigError: not an ``.sdc`` file, another format version, truncated, or corrupted (CRC mismatch); the
            message is one line starting with ``where``.
    """
    if len(data) < 4 or data[:3] != MAGIC:
        raise ConfigError(f"{where}: not a simdiff compressed file (bad magic)")
    if data[3] != FORMAT_VERSION:
        raise ConfigError(f"{where}: format version {data[3]} is not supported (this simdiff reads {FORMAT_VERSION})")
    r = _Reader(data, where)
    r.take(4)
    codec_id, flags = r.take(1)[0], r.take(1)[0]
    height, width = r.varint(), r.varint()
    mid = r.take(r.take(1)[0])
    model_hash, rate = r.take(4), r.take(1)[0]
    payload = r.take(r.varint())
    crc = r.take(4)
    if r.pos != len(data):
        raise ConfigError(f"{where}: corrupted file ({len(data) - r.pos} unexpected trailing bytes)")
    if zlib.crc32(data[: r.pos - 4]).to_bytes(4, "little") != crc:
        raise ConfigError(f"{where}: corrupted file (checksum mismatch)")
    if codec_id >= len(CODECS) or flags & 0xFC:
        raise ConfigError(f"{where}: corrupted header (codec {codec_id}, flags {flags:#x})")
    try:
        header = Header(CODECS[codec_id], height, width, (flags & 3) + 1, mid.decode("ascii"), model_hash, rate)
    except (ConfigError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: corrupted header ({str(e).splitlines()[0]})") from None
    return header, payload


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and ``os.replace``: readers see either the old file or
    the complete new one, never a partial write (:func:`simdiff.train.rundir.atomic_write_bytes`)."""
    from simdiff.train.rundir import atomic_write_bytes

    atomic_write_bytes(path, data)


def write_model_file(path: str | Path, state: dict, meta: dict[str, str], *, half: bool) -> None:
    """Write a codec or decoder state dict as safetensors (float16 if ``half``) with ``meta``, atomically."""
    import torch
    from safetensors.torch import save

    dtype = torch.float16 if half else torch.float32
    write_atomic(path, save({k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}, metadata=meta))


def read_model_file(path: str | Path, *, kind: str, what: str, noun: str) -> tuple[dict, dict[str, str]]:
    """``(float32 tensors, metadata)`` of a file :func:`write_model_file` wrote with ``meta["kind"] == kind``
    (never unpickled); an unreadable file is "cannot read <noun>", another kind "not a <what>" (one line each)."""
    from simdiff.train import CheckpointError
    from simdiff.train.checkpoint import read_safetensors

    try:
        tensors, meta = read_safetensors(path)
    except CheckpointError as e:
        raise ConfigError(f"{path}: cannot read {noun} ({str(e).split(': ', 1)[-1]})") from None
    if meta.get("kind") != kind:
        raise ConfigError(f"{path}: not a {what}")
    return {k: v.float() for k, v in tensors.items()}, meta


def read_container(path: str | Path) -> tuple[Header, bytes]:
    """Read and check an ``.sdc`` file (ConfigError with one line if missing or invalid)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    return unpack(data, where=str(path))
