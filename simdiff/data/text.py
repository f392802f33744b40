"""Byte-level text from a corpus every machine has offline: the Python standard library's own source files.

``data: {name: text, split: train, options: {seq_len: 128}}``. The corpus is every ``*.py`` file under the running
interpreter's standard library directory (``sysconfig.get_paths()["stdlib"]``), except those under
``site-packages``, ``test``, ``tests``, ``idle_test`` and ``__pycache__`` directories (or under ``data.root``
when given, with the same rule). Files are split BY FILE, deterministically: the SHA-1 of a file's path relative
to the root, as a number mod 100, puts it in ``valid`` (0-4), ``test`` (5-9) or ``train`` (10-99), so a file's
split never depends on which other files exist. The files of a split are concatenated in sorted path order (each
followed by a newline) and cut into non-overlapping windows of ``seq_len`` bytes (the last partial window is
dropped; a window may run across a file boundary, never across splits).

Examples are uint8 bytes shaped ``[N, 1, 1, seq_len]`` (an "image" of one row, so :class:`ImageDataset` holds them
and batches carry them as ``u / 127.5 - 1``; :func:`simdiff.discrete.masked.tokens_from_data` with 256 levels
recovers the bytes exactly). The corpus depends on the Python version; ``info`` records it with file and byte
counts.

Options: ``seq_len`` (bytes per example, default 128), ``corpus`` ("python_stdlib", the only one).
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from pathlib import Path

import torch

from simdiff.configuration import ConfigError
from simdiff.data.errors import DataError
from simdiff.data.sources import RawData

__all__ = ["load_text", "corpus_files", "split_of", "SPLITS", "EXCLUDED_DIRS"]

SPLITS = ("train", "valid", "test")
EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})
_OPTIONS = {"seq_len": 128, "corpus": "python_stdlib"}


def split_of(relative_path: str) -> str:
    """The split of a file by its path relative to the corpus root: SHA-1 mod 100 -> valid 0-4, test 5-9, train."""
    bucket = int(hashlib.sha1(relative_path.encode("utf-8")).hexdigest(), 16) % 100
    return "valid" if bucket < 5 else "test" if bucket < 10 else "train"


def corpus_files(root: str | Path | None = None) -> tuple[Path, list[Path]]:
    """The corpus root and its ``*.py`` files (sorted, excluded directories left out)."""
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise DataError(f"text corpus directory {base} does not exist")
    files = sorted(p for p in base.rglob("*.py")
                   if p.is_file() and not EXCLUDED_DIRS.intersection(p.relative_to(base).parts[:-1]))
    if not files:
        raise DataError(f"text corpus directory {base} has no .py files")
    return base, files


def load_text(cfg) -> RawData:
    """The ``text`` data source for a :class:`~simdiff.data.datasets.DataConfig` (split may join with ``+``)."""
    unknown = sorted(set(cfg.options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"text data: unknown option(s) {unknown}; valid: {sorted(_OPTIONS)}")
    opts = {**_OPTIONS, **cfg.options}
    seq_len, corpus = opts["seq_len"], opts["corpus"]
    if corpus != "python_stdlib":
        raise ConfigError(f"text data: unknown corpus {corpus!r}; valid: python_stdlib")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"text data: seq_len must be an integer >= 2, got {seq_len!r}")
    if cfg.image_size is not None or cfg.channels not in (None, 1) or cfg.hflip:
        raise ConfigError("text data: image_size, channels and hflip do not apply (leave them unset)")
    wanted = cfg.split.split("+")
    bad = [s for s in wanted if s not in SPLITS]
    if bad:
        raise DataError(f"unknown split {bad[0]!r} for data set 'text'; valid: {', '.join(SPLITS)} (join with +)")
    base, files = corpus_files(cfg.root)
    chosen = [p for p in files if split_of(p.relative_to(base).as_posix()) in wanted]
    stream = b"".join(p.read_bytes() + b"\n" for p in chosen)
    n = len(stream) // seq_len
    if n == 0:
        raise DataError(f"text data: split {cfg.split!r} of {base} has fewer than {seq_len} bytes")
    data = torch.frombuffer(bytearray(stream[: n * seq_len]), dtype=torch.uint8).reshape(n, 1, 1, seq_len)
    info = {"corpus": corpus, "root": str(base), "python": platform.python_version(), "files": len(chosen),
            "bytes": len(stream), "seq_len": seq_len}
    return RawData(data, None, 0, (), info)
