"""The .sdc container (round trip, refusals with one line, atomic writes) and the photo-patch data set."""

import importlib.util

import numpy as np
import pytest

from simdiff.compress.format import FORMAT_VERSION, Header, pack, read_container, unpack, write_atomic
from simdiff.configuration import ConfigError
from simdiff.data.photos import PHOTO_SPLITS, load_photos, photo_patches

needs_skimage = pytest.mark.skipif(importlib.util.find_spec("skimage") is None,
                                   reason="scikit-image (most test photos) is not installed")


def _file():
    header = Header("learned", 300, 451, 3, "hp-q2", b"\x01\x02\x03\x04", 2)
    payload = bytes(range(256)) * 3
    return header, payload, pack(header, payload)


def test_round_trip_and_size():
    header, payload, data = _file()
    back, body = unpack(data)
    assert back == header and body == payload
    assert len(data) - len(payload) == 3 + 3 + 2 + 2 + 1 + 5 + 4 + 1 + 2 + 4  # documented ~20-byte header


@pytest.mark.parametrize("cut", [1, 5, 20, 300, 700])
def test_truncated_is_one_line(cut):
    _, _, data = _file()
    with pytest.raises(ConfigError) as e:
        unpack(data[:-cut], where="x.sdc")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("x.sdc: ") and ("truncated" in msg or "corrupted" in msg)


def test_every_flipped_byte_is_refused():
    _, _, data = _file()
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x5A
        with pytest.raises(ConfigError):
            unpack(bytes(bad))


def test_other_version_and_garbage():
    _, _, data = _file()
    with pytest.raises(ConfigError, match=f"version {FORMAT_VERSION + 1} is not supported"):
        unpack(data[:3] + bytes([FORMAT_VERSION + 1]) + data[4:])
    with pytest.raises(ConfigError, match="bad magic"):
        unpack(b"\x89PNG\r\n\x1a\n" + data)
    with pytest.raises(ConfigError, match="trailing"):
        unpack(data + b"\0")


def test_header_validation():
    with pytest.raises(ConfigError, match="unknown codec"):
        Header("gif", 1, 1)
    with pytest.raises(ConfigError, match="ASCII"):
        Header("learned", 1, 1, model_id="é")
    with pytest.raises(ConfigError, match="rate index"):
        Header("jpeg", 1, 1, rate=300)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "a.sdc"
    write_atomic(out, b"old")

    with pytest.raises(TypeError):
        write_atomic(out, object())  # type: ignore[arg-type]
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.sdc"]
    _, _, data = _file()
    write_atomic(out, data)
    assert read_container(out)[1] == _file()[1]
    with pytest.raises(ConfigError, match="cannot read"):
        read_container(tmp_path / "missing.sdc")


@needs_skimage
def test_photo_split_is_by_photo_and_deterministic():
    assert not set(PHOTO_SPLITS["train"]) & set(PHOTO_SPLITS["test"])
    test, src = photo_patches("test")
    assert test.shape == (88, 64, 64, 3) and test.dtype == np.uint8 and np.bincount(src).tolist() == [28, 60]
    train, _ = photo_patches("train")
    assert train.shape == (1176, 64, 64, 3)
    # no test patch occurs among the training patches
    train_keys = {p.tobytes() for p in train}
    assert not any(p.tobytes() in train_keys for p in test)
    again, _ = photo_patches("test")
    assert np.array_equal(again, test)


@needs_skimage
def test_photos_loader_options():
    from types import SimpleNamespace

    raw = load_photos(SimpleNamespace(split="test", options={"patch_size": 128}))
    assert tuple(raw.images.shape) == (21, 3, 128, 128) and raw.images.min() >= -1 and raw.images.max() <= 1
    with pytest.raises(ValueError, match="unknown option"):
        load_photos(SimpleNamespace(split="test", options={"size": 3}))
    with pytest.raises(ValueError, match="unknown split"):
        load_photos(SimpleNamespace(split="valid", options={}))
