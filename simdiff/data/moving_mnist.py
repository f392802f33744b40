"""Moving MNIST: MNIST digits bouncing inside a square canvas, seeded and cached.

The data set of Srivastava, Mansimov & Salakhutdinov 2015 ("Unsupervised learning of video representations using
LSTMs"): ``digits`` 28 x 28 MNIST digits move with constant velocity inside a ``size x size`` canvas (64 by
default), reflect off the walls, and are combined by a pixel-wise maximum. We generate it ourselves from the MNIST
images simdiff already loads (:func:`simdiff.data.sources.load_mnist`); the motion statistics below are our choice
(not verified against the original generator): each digit's top-left corner starts uniform in ``[0, size - 28]^2``,
moves in a uniform random direction with a speed uniform in ``speed`` pixels per frame, and its continuous
position is rounded to whole pixels when drawn (so every frame holds exact MNIST uint8 levels).

Reflection, per axis with ``L = size - 28``: ``q = p + v``; if ``q < 0`` then ``p' = -q, v' = -v``; if ``q > L``
then ``p' = 2L - q, v' = -v``; else ``p' = q, v' = v`` (a speed below ``L`` needs at most one reflection a frame).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from simdiff.data.sequences import cached_array, progress_bar, sequence_generator
from simdiff.data.sources import load_mnist
from simdiff.data.transforms import float_to_uint8, uint8_to_float

__all__ = ["MovingMNISTTracks", "moving_mnist_tracks", "render_moving_mnist", "moving_mnist", "DIGIT_SIZE"]

DIGIT_SIZE = 28


class MovingMNISTTracks(NamedTuple):
    """Where each digit is: ``indices [num, digits]`` into the MNIST split, ``positions [num, frames, digits, 2]``
    (top-left corner ``(y, x)``, float64, continuous) and ``velocities`` of the same shape (``velocities[:, t]``
    moves frame ``t`` to frame ``t + 1`` before any reflection)."""

    indices: Tensor
    positions: Tensor
    velocities: Tensor


def _check(num: int, frames: int, size: int, digits: int, speed: tuple[float, float]) -> None:
    if num < 1 or frames < 1 or digits < 1:
        raise ValueError(f"need num, frames, digits >= 1; got {num}, {frames}, {digits}")
    if size < DIGIT_SIZE:
        raise ValueError(f"size must be at least the digit size {DIGIT_SIZE}, got {size}")
    lo, hi = speed
    if not 0 <= lo <= hi or (hi >= size - DIGIT_SIZE and hi > 0):
        raise ValueError(f"speed must be a range 0 <= lo <= hi < size - {DIGIT_SIZE} = {size - DIGIT_SIZE}, "
                         f"got {tuple(speed)}")


def moving_mnist_tracks(num: int, frames: int, *, num_images: int, size: int = 64, digits: int = 2,
                        speed: tuple[float, float] = (2.0, 5.0), seed: int = 0) -> MovingMNISTTracks:
    """The digit choices and bouncing trajectories (sequence ``i`` from its own generator seeded by ``(seed, i)``).

    Args:
        num, frames: sequences and frames per sequence.
        num_images: size of the MNIST split the indices point into.
        size: canvas side; positions stay in ``[0, size - 28]``.
        digits: digits per sequence.
        speed: ``(lo, hi)`` pixels per frame, drawn uniformly.
        seed: same seed, same tracks; sequence ``i`` does not depend on ``num``.
    """
    _check(num, frames, size, digits, speed)
    free = float(size - DIGIT_SIZE)
    idx = torch.empty(num, digits, dtype=torch.long)
    p = torch.empty(num, digits, 2, dtype=torch.float64)
    v = torch.empty(num, digits, 2, dtype=torch.float64)
    for i in range(num):
        g = sequence_generator(seed, i)
        idx[i] = torch.randint(num_images, (digits,), generator=g)
        p[i] = torch.rand(digits, 2, generator=g, dtype=torch.float64) * free
        angle = torch.rand(digits, generator=g, dtype=torch.float64) * (2 * torch.pi)
        s = speed[0] + (speed[1] - speed[0]) * torch.rand(digits, generator=g, dtype=torch.float64)
        v[i] = torch.stack([s * torch.sin(angle), s * torch.cos(angle)], -1)
    positions, velocities = [p], [v]
    for _ in range(frames - 1):
        q = p + v
        low, high = q < 0, q > free
        p = torch.where(low, -q, torch.where(high, 2 * free - q, q))
        v = torch.where(low | high, -v, v)
        positions.append(p)
        velocities.append(v)
    return MovingMNISTTracks(idx, torch.stack(positions, 1), torch.stack(velocities, 1))


def render_moving_mnist(tracks: MovingMNISTTracks, images: np.ndarray, *, size: int = 64,
                        progress: bool = False) -> np.ndarray:
    """Draw ``tracks`` with uint8 digits ``images [N, 28, 28]``: uint8 ``[num, frames, 1, size, size]``.

    Each digit is placed at its rounded position and digits are combined by a pixel-wise maximum.
    """
    num, frames, digits, _ = tracks.positions.shape
    corners = tracks.positions.round().long().numpy()
    out = np.zeros((num, frames, 1, size, size), dtype=np.uint8)
    with progress_bar(num, f"moving mnist {num}x{frames}", "seq", progress) as advance:
        for i in range(num):
            glyphs = images[tracks.indices[i].numpy()]
            for t in range(frames):
                canvas = out[i, t, 0]
                for d in range(digits):
                    y, x = corners[i, t, d]
                    view = canvas[y : y + DIGIT_SIZE, x : x + DIGIT_SIZE]
                    np.maximum(view, glyphs[d], out=view)
            advance(1)
    return out


def moving_mnist(
    num: int,
    frames: int,
    *,
    size: int = 64,
    digits: int = 2,
    speed: tuple[float, float] = (2.0, 5.0),
    seed: int = 0,
    split: str = "train",
    uint8: bool = False,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
    progress: bool = True,
) -> Tensor:
    """Moving MNIST sequences ``[num, frames, 1, size, size]``: float32 in [-1, 1], or uint8 if ``uint8``.

    The float values are ``u / 127.5 - 1`` of the uint8 levels ``u`` (the project's pixel convention), so the two
    outputs are the same data. Digits come from MNIST split ``split`` ("train", "valid", "test" or
    "train+valid"; see :func:`simdiff.data.sources.load_mnist`); tracks from :func:`moving_mnist_tracks`. The
    uint8 array is cached as .npz (:mod:`simdiff.data.sequences`).

    Raises:
        DataError: MNIST not installed (with the install command) or an unknown split.
        ValueError: bad sizes or speeds.
    """
    _check(num, frames, size, digits, speed)
    params = {"num": num, "frames": frames, "size": size, "digits": digits, "speed": [float(s) for s in speed],
              "seed": seed, "split": split}

    def compute() -> np.ndarray:
        images = float_to_uint8(load_mnist(split).images[:, 0]).numpy()
        tracks = moving_mnist_tracks(num, frames, num_images=len(images), size=size, digits=digits, speed=speed,
                                     seed=seed)
        return render_moving_mnist(tracks, images, size=size, progress=progress)

    data = cached_array("moving_mnist", params, compute, shape=(num, frames, 1, size, size), dtype=np.uint8,
                        cache_dir=cache_dir, cache=cache, verbose=progress)
    u = torch.from_numpy(data)
    return u if uint8 else uint8_to_float(u.view(num * frames, 1, size, size)).view(num, frames, 1, size, size)
