"""Sequence data sources of the trainer: windows of ``W`` consecutive frames from Kolmogorov flow or Moving MNIST.

Each example is one window ``[W, C, H, W']`` cut from a longer trajectory with
:func:`simdiff.data.sequences.sliding_windows` (a window starts every ``stride`` frames). Settings come from
``data.options`` (unknown keys are a one-line ConfigError):

* ``kolmogorov``: ``window`` (8), ``stride`` (1), ``trajectories`` (8), ``frames`` per trajectory (64),
  ``resolution`` (32), ``solver_size`` (64), ``reynolds`` (1000), ``frame_every`` (32 solver steps), ``burn_in``
  (20 time units), ``seed`` (0). Vorticity divided by :data:`~simdiff.data.kolmogorov.VORTICITY_SCALE` (roughly
  unit standard deviation, not clipped to [-1, 1]); stored as float32. The defaults are a CPU-sized version of
  :func:`~simdiff.data.kolmogorov.kolmogorov_trajectories`' (64 x 64 solved on 128 x 128): solved on 64 x 64 with the
  default time step ``0.5 dx / 7`` (twice the default's), so 32 steps per frame keep its frame spacing of 0.224 time
  units. Re = 1000 is under-resolved on 64 x 64 (energy piles up near the cutoff); what is kept, the 32 x 32 modes, is
  the large-scale flow.
* ``moving_mnist``: ``window`` (8), ``stride`` (1), ``sequences`` (256), ``frames`` per sequence (20),
  ``resolution`` (64; smaller sides are an antialiased resize of the 64 x 64 canvas re-quantised to uint8 levels,
  so the set is held as uint8), ``digits`` (2), ``seed`` (0).

Splits: ``data.split`` "train" uses ``seed``, "test" uses ``seed + 1000`` (other trajectories; for Moving MNIST also
the MNIST test digits). ``data.limit`` keeps the first windows. ``data.image_size`` / ``data.channels`` do not apply
(use ``resolution``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from simdiff.configuration import ConfigError
from simdiff.data.errors import DataError
from simdiff.data.sources import RawData
from simdiff.data.transforms import float_to_uint8, resize_images, uint8_to_float

__all__ = ["SEQUENCE_DEFAULTS", "sequence_options", "load_trajectories", "load_sequence_windows"]

TEST_SEED_OFFSET = 1000

_COMMON = {"window": 8, "stride": 1, "seed": 0}
SEQUENCE_DEFAULTS: dict[str, dict[str, Any]] = {
    "kolmogorov": {**_COMMON, "trajectories": 8, "frames": 64, "resolution": 32, "solver_size": 64,
                   "reynolds": 1000.0, "frame_every": 32, "burn_in": 20.0},
    "moving_mnist": {**_COMMON, "sequences": 256, "frames": 20, "resolution": 64, "digits": 2},
}


def sequence_options(name: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` over the defaults of sequence source ``name``; unknown keys or a bad window are a ConfigError."""
    defaults = SEQUENCE_DEFAULTS[name]
    options = dict(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(f"data.options for {name!r}: unknown key(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(sorted(defaults))}")
    out = {**defaults, **options}
    for key in ("window", "stride", "frames", "resolution", "trajectories", "sequences", "digits", "solver_size",
                "frame_every"):
        if key in out and (isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1):
            raise ConfigError(f"data.options.{key} for {name!r} must be a positive integer, got {out[key]!r}")
    if out["window"] > out["frames"]:
        raise ConfigError(f"data.options.window ({out['window']}) exceeds frames per sequence ({out['frames']})")
    return out


def _seed(opts: dict[str, Any], split: str, name: str) -> int:
    if split == "train":
        return int(opts["seed"])
    if split == "test":
        return int(opts["seed"]) + TEST_SEED_OFFSET
    raise DataError(f"unknown split {split!r} for data set {name!r}; valid: train, test")


def load_trajectories(name: str, options: dict[str, Any] | None = None, *, split: str = "train",
                      progress: bool = True) -> Tensor:
    """Whole sequences ``[num, frames, 1, R, R]`` (float32) of source ``name`` ("kolmogorov" or "moving_mnist")
    with ``options`` as in ``data.options`` (the window settings are accepted and ignored here)."""
    if name not in SEQUENCE_DEFAULTS:
        raise ConfigError(f"unknown sequence data set {name!r}; valid: {', '.join(SEQUENCE_DEFAULTS)}")
    opts = sequence_options(name, options)
    seed = _seed(opts, split, name)
    if name == "kolmogorov":
        from simdiff.data.kolmogorov import kolmogorov_trajectories

        return kolmogorov_trajectories(opts["trajectories"], opts["frames"], size=opts["resolution"],
                                       solver_size=opts["solver_size"], reynolds=float(opts["reynolds"]),
                                       frame_every=opts["frame_every"], burn_in=float(opts["burn_in"]), seed=seed,
                                       normalize=True, progress=progress)
    from simdiff.data.moving_mnist import moving_mnist

    u = moving_mnist(opts["sequences"], opts["frames"], digits=opts["digits"], seed=seed, split=split, uint8=True,
                     progress=progress)
    n, f = u.shape[:2]
    x = uint8_to_float(u.reshape(n * f, *u.shape[2:]))
    if opts["resolution"] != x.shape[-1]:
        x = uint8_to_float(float_to_uint8(resize_images(x, opts["resolution"])))
    return x.reshape(n, f, *x.shape[1:])


def load_sequence_windows(name: str, cfg: Any) -> RawData:
    """The trainer's source for ``name``: windows ``[N, W, C, H, W']`` of :func:`load_trajectories` (no labels)."""
    from simdiff.data.sequences import sliding_windows

    if cfg.image_size is not None or cfg.channels is not None:
        raise ConfigError(f"data.image_size / data.channels do not apply to the sequence data set {name!r}; "
                          f"use data.options.resolution")
    opts = sequence_options(name, cfg.options)
    seqs = load_trajectories(name, opts, split=cfg.split)
    windows = sliding_windows(seqs, opts["window"], opts["stride"])
    info = {"sequences": list(seqs.shape), "window": opts["window"], "stride": opts["stride"], "options": opts}
    return RawData(windows, None, 0, (), info)
