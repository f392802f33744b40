"""On-disk cache of reference-set feature statistics (computed once, reused by every evaluation).

One file per (dataset key, feature extractor): ``<cache_dir>/<key>__<extractor>.npz`` written with ``np.savez``
(atomically: temp file + ``os.replace``) and read with ``np.load(allow_pickle=False)``. Arrays: ``mu [D]``,
``sigma [D, D]`` (float64), ``n`` (int), ``extractor`` and ``key`` (strings), and optionally ``features [N, D]``
(float32, needed for KID and precision/recall, which use the samples rather than the Gaussian fit).

Cache directory: the ``cache_dir`` argument, else ``$SIMDIFF_CACHE/refstats`` when the ``SIMDIFF_CACHE``
environment variable (the simdiff cache root) is set, else ``~/.cache/simdiff/refstats``.

Corrupt or mismatching files: **recomputed**. A file that cannot be read, lacks an array, has inconsistent
shapes, or was written for another key/extractor triggers one ``RuntimeWarning`` line naming the file and the
reason, and is then recomputed and overwritten (when a ``compute`` function is given; otherwise a one-line
``ValueError``).
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from simdiff.eval.fid import feature_stats

__all__ = ["ReferenceStats", "RefStats", "default_cache_dir"]

_KEY_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


def default_cache_dir() -> Path:
    """``$SIMDIFF_CACHE/refstats`` if set, else ``~/.cache/simdiff/refstats``."""
    root = os.environ.get("SIMDIFF_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "simdiff"
    return base / "refstats"


@dataclass(frozen=True)
class RefStats:
    """Cached statistics of a reference set: ``mu [D]``, ``sigma [D, D]`` float64, ``n`` rows, and names."""

    mu: Tensor
    sigma: Tensor
    n: int
    extractor: str
    key: str
    features: Tensor | None = None


class ReferenceStats:
    """Directory-backed cache of :class:`RefStats`, keyed by dataset key and feature-extractor name.

    Args:
        cache_dir: directory for the ``.npz`` files (see the module docstring for the default).

    Example:
        >>> cache = ReferenceStats()
        >>> stats = cache.get("mnist-test", "ccexam_mnistnet_fc128", compute=lambda: extractor(real_images))
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None) -> None:
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    def path(self, key: str, extractor: str) -> Path:
        """File holding the stats of ``key`` under ``extractor``."""
        for what, name in (("reference key", key), ("extractor name", extractor)):
            if not isinstance(name, str) or not _KEY_RE.match(name):
                raise ValueError(f"{what} must match [A-Za-z0-9_.+-]+, got {name!r}")
        return self.cache_dir / f"{key}__{extractor}.npz"

    def save(self, stats: RefStats) -> Path:
        """Write ``stats`` atomically; returns the file path."""
        path = self.path(stats.key, stats.extractor)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "mu": stats.mu.double().numpy(),
            "sigma": stats.sigma.double().numpy(),
            "n": np.asarray(stats.n, dtype=np.int64),
            "extractor": np.asarray(stats.extractor),
            "key": np.asarray(stats.key),
        }
        if stats.features is not None:
            arrays["features"] = stats.features.float().numpy()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    def load(self, key: str, extractor: str, *, need_features: bool = False) -> RefStats | None:
        """Stats from disk; ``None`` if absent. Raises ``ValueError`` (one line) if the file is corrupt."""
        path = self.path(key, extractor)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                mu = torch.from_numpy(np.array(z["mu"], dtype=np.float64))
                sigma = torch.from_numpy(np.array(z["sigma"], dtype=np.float64))
                n = int(z["n"])
                file_extractor, file_key = str(z["extractor"]), str(z["key"])
                feats = torch.from_numpy(np.array(z["features"], dtype=np.float64)) if "features" in z.files else None
        except Exception as exc:  # any unreadable/truncated/garbage file
            raise ValueError(f"corrupt reference-stats file {path}: {type(exc).__name__}: {exc}") from None
        d = mu.shape[0] if mu.dim() == 1 else -1
        if d < 1 or tuple(sigma.shape) != (d, d) or n < 2:
            raise ValueError(f"corrupt reference-stats file {path}: mu {tuple(mu.shape)}, sigma {tuple(sigma.shape)}")
        if (file_key, file_extractor) != (key, extractor):
            raise ValueError(f"reference-stats file {path} holds key={file_key!r} extractor={file_extractor!r}")
        if feats is not None and tuple(feats.shape) != (n, d):
            raise ValueError(f"corrupt reference-stats file {path}: features {tuple(feats.shape)} != ({n}, {d})")
        if need_features and feats is None:
            return None
        return RefStats(mu, sigma, n, extractor, key, feats)

    def get(
        self,
        key: str,
        extractor: str,
        compute: Callable[[], Tensor] | None = None,
        *,
        need_features: bool = False,
        store_features: bool = True,
    ) -> RefStats:
        """Cached stats of ``key``/``extractor``; computes them with ``compute() -> features [N, D]`` if missing.

        Args:
            compute: zero-argument function returning reference features; called only on a cache miss.
            need_features: treat a cached file without ``features`` as a miss (KID / precision-recall need them).
            store_features: keep the features in the file (float32).
        """
        try:
            stats = self.load(key, extractor, need_features=need_features)
        except ValueError as exc:
            if compute is None:
                raise
            warnings.warn(f"{exc}; recomputing", RuntimeWarning, stacklevel=2)
            stats = None
        if stats is not None:
            return stats
        if compute is None:
            raise ValueError(
                f"no cached reference stats for key={key!r} extractor={extractor!r} in {self.cache_dir} "
                "(pass the reference images to compute them)"
            )
        feats = compute()
        mu, sigma = feature_stats(feats)
        stats = RefStats(mu, sigma, int(feats.shape[0]), extractor, key,
                         feats.detach().cpu().float() if store_features else None)
        self.save(stats)
        if stats.features is not None:  # return what a later load would give (float32-rounded features)
            stats = RefStats(mu, sigma, stats.n, extractor, key, stats.features.double())
        return stats
