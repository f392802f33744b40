"""Shared helpers for generated sequence data (Kolmogorov flow, Moving MNIST): seeds, the .npz cache, progress.

Sequence data sets are arrays ``[num, frames, C, H, W]`` generated locally and deterministically from a seed.
Each sequence ``i`` draws its random numbers from its own generator seeded by ``(seed, i)`` (NumPy's
``SeedSequence``), so the random inputs of sequence ``i`` do not depend on ``num``.

Cache: one ``.npz`` per (data set, parameters), named ``<name>__<16 hex digits of the SHA-256 of the parameters>.npz``
in the ``cache_dir`` argument, else ``$SIMDIFF_CACHE/sequences`` when the ``SIMDIFF_CACHE`` environment variable
(the simdiff cache root) is set, else ``~/.cache/simdiff/sequences``. The file holds the array (``data``) and the
parameters as JSON (``params``); it is written with ``np.savez`` to a temporary file in the same directory and then
renamed, so a reader never sees half a file, and read with ``np.load(allow_pickle=False)``. A file whose parameters
or array do not match what was asked for is an error, not silently regenerated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simdiff.data.errors import DataError

__all__ = ["default_cache_dir", "sequence_generator", "cache_path", "cached_array", "progress_bar", "sliding_windows"]

#: Bumped when a generator changes its output for the same parameters, so old cache files are not reused.
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$SIMDIFF_CACHE/sequences`` if set, else ``~/.cache/simdiff/sequences``."""
    root = os.environ.get("SIMDIFF_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "simdiff"
    return base / "sequences"


def sequence_generator(seed: int, index: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for sequence ``index`` of the data set seeded ``seed`` (independent streams)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) | (int(state[1]) << 32))


def _params_json(name: str, params: dict[str, Any]) -> str:
    return json.dumps({"name": name, "format": CACHE_FORMAT, **params}, sort_keys=True)


def cache_path(name: str, params: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache file for data set ``name`` generated with ``params`` (JSON-serialisable values)."""
    digest = hashlib.sha256(_params_json(name, params).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"{name}__{digest}.npz"


def _describe(a: np.ndarray) -> str:
    return f"{list(a.shape)} {a.dtype} ({a.nbytes / 2**20:.1f} MiB)"


def _save_atomic(path: Path, data: np.ndarray, params_json: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, data=data, params=np.asarray(params_json))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load(path: Path, params_json: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            stored, data = str(z["params"]), np.array(z["data"])
    except Exception as exc:  # truncated / garbage / not an npz
        raise DataError(f"corrupt sequence cache file {path} ({type(exc).__name__}: {exc}); delete it") from None
    if stored != params_json:
        raise DataError(f"sequence cache file {path} holds other parameters ({stored}); delete it")
    if data.shape != shape or data.dtype != dtype:
        raise DataError(f"sequence cache file {path} holds {_describe(data)}, expected {list(shape)} {dtype}")
    return data


def cached_array(
    name: str,
    params: dict[str, Any],
    compute: Callable[[], np.ndarray],
    *,
    shape: tuple[int, ...],
    dtype: np.dtype | type,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
    verbose: bool = True,
) -> np.ndarray:
    """Load ``name``'s array for ``params`` from the cache, or ``compute()`` it and write it there.

    Args:
        name: data set name (file-name prefix; ``[A-Za-z0-9_-]``).
        params: every parameter the array depends on (JSON-serialisable); they are hashed into the file name
            and stored in the file.
        compute: zero-argument function returning the array (called only on a miss).
        shape, dtype: what ``compute`` returns; a cached file of another shape or dtype raises ``DataError``.
        cache_dir: cache directory (default in the module docstring).
        cache: False computes without reading or writing any file.
        verbose: print one line with the shape, size, time and file.

    Raises:
        DataError: a cache file that is unreadable or holds other parameters (one line naming the file).
    """
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"data set name must match [A-Za-z0-9_-]+, got {name!r}")
    dtype = np.dtype(dtype)
    params_json = _params_json(name, params)
    path = cache_path(name, params, cache_dir) if cache else None
    start = time.perf_counter()
    if path is not None and path.is_file():
        data = _load(path, params_json, tuple(shape), dtype)
        if verbose:
            print(f"{name}: loaded {_describe(data)} from {path} in {time.perf_counter() - start:.2f} s")
        return data
    data = np.ascontiguousarray(compute())
    if data.shape != tuple(shape) or data.dtype != dtype:
        raise RuntimeError(f"{name}: generator returned {_describe(data)}, expected {list(shape)} {dtype}")
    where = ""
    if path is not None:
        _save_atomic(path, data, params_json)
        where = f", saved to {path}"
    if verbose:
        print(f"{name}: generated {_describe(data)} in {time.perf_counter() - start:.1f} s{where}")
    return data


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A tqdm bar as a context manager yielding ``advance(n)``; a no-op when ``enabled`` is False."""
    if not enabled:
        yield lambda n=1: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False) as bar:
        yield bar.update


def sliding_windows(x: torch.Tensor, window: int, stride: int | None = None) -> torch.Tensor:
    """Cut sequences ``[num, frames, ...]`` into windows ``[num * k, window, ...]`` (``k`` per sequence).

    Windows start every ``stride`` frames (default ``window``: disjoint) and are ordered sequence by sequence. Long
    trajectories cut this way give many training windows for one burn-in (the windows of one trajectory are
    correlated in time).
    """
    stride = window if stride is None else stride
    if x.dim() < 2 or window < 1 or stride < 1 or window > x.shape[1]:
        raise ValueError(f"need sequences [num, frames, ...] with 1 <= window <= frames and stride >= 1; got shape "
                         f"{tuple(x.shape)}, window {window}, stride {stride}")
    starts = range(0, x.shape[1] - window + 1, stride)
    return torch.stack([x[:, s : s + window] for s in starts], 1).flatten(0, 1)
