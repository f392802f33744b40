"""Grids, uint8 conversion, atomic PNG writing and the shared robust image loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from simdiff.data import ImageLoadError
from simdiff.images import load_image, make_grid, save_grid, save_images, to_uint8


def _uint8_exact(shape, seed=0):
    """Random images whose values are exact uint8 levels, so PNG round trips are lossless."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float() / 127.5 - 1


def test_to_uint8_levels_and_layout():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 5)
    assert to_uint8(x)[..., 0].tolist() == [[0, 0, 128, 255, 255]]
    y = _uint8_exact((2, 3, 4, 5))
    u = to_uint8(y)
    assert u.shape == (2, 4, 5, 3) and u.dtype == np.uint8
    assert np.array_equal(u, ((y + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8))


def test_make_grid_geometry():
    x = torch.rand(5, 3, 4, 6) * 2 - 1
    g = make_grid(x, nrow=3, padding=2, pad_value=0.5)
    assert g.shape == (3, 2 * (4 + 2) + 2, 3 * (6 + 2) + 2)
    assert torch.equal(g[:, 2:6, 2:8], x[0])
    assert torch.equal(g[:, 2:6, 18:24], x[2])
    assert torch.equal(g[:, 8:12, 10:16], x[4])  # row 1, column 1
    assert torch.all(g[:, 8:12, 18:24] == 0.5)  # empty cell
    assert torch.all(g[:, :2] == 0.5) and torch.all(g[:, :, -2:] == 0.5) and torch.all(g[:, 6:8] == 0.5)
    assert make_grid(x).shape == (3, 2 * 6 + 2, 3 * 8 + 2)  # default nrow = ceil(sqrt(5)) = 3
    assert make_grid(x[0], padding=0).shape == (3, 4, 6)
    assert make_grid(x[:2], nrow=8, padding=0).shape == (3, 4, 12)


def test_save_grid_round_trip(tmp_path):
    x = _uint8_exact((6, 3, 5, 4))
    path = save_grid(x, tmp_path / "out" / "grid.png", nrow=3, scale=2)
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temp file left
    back = np.asarray(Image.open(path))
    want = to_uint8(make_grid(x, nrow=3)).repeat(2, axis=0).repeat(2, axis=1)
    assert back.shape == want.shape == (2 * 16, 2 * 20, 3) and np.array_equal(back, want)
    grey = save_grid(_uint8_exact((4, 1, 3, 3), seed=1), tmp_path / "g.png")
    assert Image.open(grey).mode == "L"
    with pytest.raises(ValueError, match="unknown image file extension"):
        save_grid(x, tmp_path / "grid.xyz")


def test_save_images_and_load_image_round_trip(tmp_path):
    x = _uint8_exact((3, 3, 6, 5), seed=2)
    paths = save_images(x, tmp_path / "s", prefix="img", start=7)
    assert [p.name for p in paths] == ["img_000007.png", "img_000008.png", "img_000009.png"]
    for p, xi in zip(paths, x):
        y = load_image(p)
        assert y.shape == (3, 6, 5) and y.dtype == torch.float32 and torch.equal(y, xi)
    small = load_image(paths[0], size=4, channels=1)
    assert small.shape == (1, 4, 4) and small.abs().max() <= 1


def test_load_image_exif_orientation_and_errors(tmp_path):
    arr = np.zeros((8, 16), np.uint8)
    arr[:, 8:] = 255  # left half black, right half white
    img = Image.fromarray(arr, "L")
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "o.png", exif=exif)
    y = load_image(tmp_path / "o.png")
    assert y.shape == (1, 16, 8)
    assert torch.all(y[0, :8] == -1) and torch.all(y[0, 8:] == 1)  # left half went to the top
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageLoadError, match=f"^{tmp_path / 'bad.jpg'}: "):
        load_image(tmp_path / "bad.jpg")
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "missing.png")
