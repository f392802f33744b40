"""Captioned digits: MNIST / Fashion-MNIST on a canvas, with templated captions built from measured attributes.

``data: {name: mnist_captions, split: train, options: {canvas: 48, objects: [1, 2], phrasings: 3}}``
(``fashion_captions`` for Fashion-MNIST). Each example is a ``canvas x canvas`` grey image holding one or two
objects, and ``phrasings`` captions that say more than the class: ``"a thick slanted 7 on the left, a small 2 on the
right"``. ``canvas: 0`` keeps the native 28 x 28 image (one object, stroke attributes only).

Composition (all draws from one NumPy generator seeded by ``(seed, split)``, drawn for the whole split at once, so
example ``i`` does not depend on ``data.limit``): the number of objects is uniform over ``objects``; each object is
a random image of the split, resized (antialiased bilinear) to a side ``d`` uniform in ``scale`` pixels, multiplied
by a brightness factor uniform in ``brightness``, and placed with its top-left corner uniform over the canvas (one
object) or over its half (two objects: the first in the left half, the second in the right half, so they never
overlap). Objects are combined by a pixel-wise maximum and the canvas is rounded to uint8.

Attributes (:func:`measure`, on each object's own layer; the same function scores generated images in
:mod:`simdiff.eval.prompts`), with ``m = ink >= 0.5 * max(ink)`` the object's mask, ``ink`` in [0, 1]:

* ``thickness`` = ``2 * area(m) / boundary(m) / height``: the mean stroke width (area over half the perimeter,
  exact for a long bar: width ``w``, length ``l`` give ``w l / (l + w)``) relative to the bounding-box height, so
  it does not change with the object's scale;
* ``slant`` = ``-mu_xy / mu_yy`` of the ink-weighted second moments (the horizontal shear per row; positive when
  the top leans right); the caption uses ``|slant|``;
* ``size`` = bounding-box height of ``m`` in pixels; ``brightness`` = mean ink over ``m``;
* position = the ink centroid's column: left / middle / right third of the canvas (one object) or the object's
  half (two objects).

Words: for thickness (``thin`` / ``thick``), ``|slant|`` (``upright`` / ``slanted``), size (``small`` / ``large``)
and brightness (``faint`` / ``bright``) the lowest and highest terciles of the **training split's** objects (the
first 10000, composed with the same options) get the word and the middle tercile none; thickness and slant are
stroke attributes and are used for MNIST only. Each phrasing keeps each word with probability
``1 - attribute_drop`` and uses one of three templates (:data:`TEMPLATES`), so one image has several captions.
The thresholds are recorded in the data set's ``info["thresholds"]``.

Options: ``canvas`` (0 or >= 28; default 48), ``objects`` (list of 1 and/or 2; default [1, 2]), ``phrasings``
(default 3), ``scale`` ([lo, hi] pixels, default [14, canvas // 2]), ``brightness`` ([lo, hi] in (0, 1], default
[0.45, 1.0]), ``attribute_drop`` (default 0.25), ``uncond_prob`` (fraction of (image, phrasing) pairs trained with
the empty caption, read by :mod:`simdiff.text`; default 0.1), ``max_length`` (tokens per caption for the text
encoder, default 32), ``seed`` (default 0). The composition rule and the
templates are this module's own design (no paper).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from simdiff.configuration import ConfigError
from simdiff.data.errors import DataError
from simdiff.data.sources import DIGIT_CLASSES, FASHION_CLASSES, RawData, load_fashion_mnist, load_mnist
from simdiff.data.transforms import float_to_uint8, uint8_to_float

__all__ = ["measure", "tercile_thresholds", "attribute_words", "caption_object", "join_objects", "load_captions",
           "captioned", "caption_thresholds", "ATTRIBUTES", "WORDS", "TEMPLATES", "NUMBER_WORDS", "position_word"]

#: attribute -> (word for the lowest tercile, word for the highest tercile)
WORDS = {"size": ("small", "large"), "brightness": ("faint", "bright"), "thickness": ("thin", "thick"),
         "slant": ("upright", "slanted")}
ATTRIBUTES = tuple(WORDS)  # the order adjectives appear in a caption
STROKE_ATTRIBUTES = ("thickness", "slant")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a {adjs} {name} {pos}, ...", "{word}, {adj} and {adj}, {pos}; ...",
             "a picture of a {adjs} {name} {pos} and ...")
_DEFAULTS = {"canvas": 48, "objects": [1, 2], "phrasings": 3, "scale": None, "brightness": [0.45, 1.0],
             "attribute_drop": 0.25, "uncond_prob": 0.1, "max_length": 32, "seed": 0}
_SOURCES = {"mnist_captions": "mnist", "fashion_captions": "fashion_mnist"}
_THRESHOLD_SAMPLE = 10000


def measure(ink: Tensor) -> dict[str, Tensor]:
    """Attributes of one object per image. ``ink`` ``[N, H, W]`` (or ``[N, 1, H, W]``) in [0, 1], white on black.

    Ink is rounded to 8-bit levels (``k / 255``) first. Returns float64 ``[N]`` tensors: ``thickness`` (stroke
    width / bbox height), ``slant`` (shear, positive = top leans right), ``size`` (bbox height, pixels), ``width``
    (bbox width), ``brightness`` (mean ink on the mask), ``cx``, ``cy`` (ink centroid, pixels, column / row),
    ``mass`` (total ink). An empty image gives zeros.
    """
    x = ink.detach().to(torch.float64)
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"measure expects ink [N, H, W] or [N, 1, H, W], got {tuple(ink.shape)}")
    x = torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0  # 8-bit levels: a canvas and its float layers agree
    n, h, w = x.shape
    peak = x.flatten(1).amax(1).reshape(n, 1, 1)
    m = (x >= 0.5 * peak) & (peak > 0)
    mf = m.to(torch.float64)
    area = mf.sum((1, 2))
    padded = F.pad(mf, (1, 1, 1, 1))
    edges = (padded[:, 1:, :] - padded[:, :-1, :]).abs().sum((1, 2)) + (padded[:, :, 1:] - padded[:, :, :-1]).abs().sum(
        (1, 2))
    rows, cols = m.any(2), m.any(1)
    ar_h = torch.arange(h, dtype=torch.float64)
    ar_w = torch.arange(w, dtype=torch.float64)
    big = torch.tensor(1e9, dtype=torch.float64)
    height = (torch.where(rows, ar_h, -big).amax(1) - torch.where(rows, ar_h, big).amin(1) + 1).clamp_min(0)
    width = (torch.where(cols, ar_w, -big).amax(1) - torch.where(cols, ar_w, big).amin(1) + 1).clamp_min(0)
    wgt = x * mf
    mass = wgt.sum((1, 2))
    safe = mass.clamp_min(1e-12)
    cy = (wgt.sum(2) * ar_h).sum(1) / safe
    cx = (wgt.sum(1) * ar_w).sum(1) / safe
    dy = ar_h.reshape(1, h, 1) - cy.reshape(n, 1, 1)
    dx = ar_w.reshape(1, 1, w) - cx.reshape(n, 1, 1)
    mu_yy = (wgt * dy * dy).sum((1, 2))
    mu_xy = (wgt * dx * dy).sum((1, 2))
    empty = area == 0
    zero = torch.zeros_like(area)
    return {
        "thickness": torch.where(empty, zero, 2 * area / edges.clamp_min(1) / height.clamp_min(1)),
        "slant": torch.where(empty | (mu_yy <= 0), zero, -mu_xy / mu_yy.clamp_min(1e-12)),
        "size": torch.where(empty, zero, height),
        "width": torch.where(empty, zero, width),
        "brightness": torch.where(empty, zero, (x * mf).sum((1, 2)) / area.clamp_min(1)),
        "cx": cx, "cy": cy, "mass": mass,
    }


def tercile_thresholds(values: dict[str, Tensor]) -> dict[str, tuple[float, float]]:
    """``attribute -> (lower tercile, upper tercile)`` of measured values (``|slant|`` for slant)."""
    out = {}
    for name in ATTRIBUTES:
        v = values[name].abs() if name == "slant" else values[name]
        q = torch.quantile(v.to(torch.float64), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
        out[name] = (float(q[0]), float(q[1]))
    return out


def attribute_words(values: dict[str, Tensor], thresholds: dict[str, tuple[float, float]],
                    attributes: tuple[str, ...] = ATTRIBUTES) -> list[list[str]]:
    """Per object, the words of ``attributes`` whose value is in the lowest / highest tercile (middle: no word)."""
    n = next(iter(values.values())).shape[0]
    out: list[list[str]] = [[] for _ in range(n)]
    for name in attributes:
        lo, hi = thresholds[name]
        v = values[name].abs() if name == "slant" else values[name]
        for i in range(n):
            if v[i] <= lo:
                out[i].append(WORDS[name][0])
            elif v[i] >= hi:
                out[i].append(WORDS[name][1])
    return out


def position_word(cx: float, *, lo: float, hi: float) -> str:
    """``"on the left"`` / ``"in the middle"`` / ``"on the right"`` for a centroid column in the range [lo, hi)."""
    third = (hi - lo) / 3
    return "on the left" if cx < lo + third else "on the right" if cx >= hi - third else "in the middle"


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou8" or word in ("11", "18") else "a"


def caption_object(name: str, word: str, adjs: list[str], pos: str, template: int) -> str:
    """One object's phrase from template ``template`` (see :data:`TEMPLATES`); ``word`` is the spelled-out name."""
    if template == 1:
        return word + ("" if not adjs else ", " + " and ".join(adjs)) + ("" if not pos else ", " + pos)
    head = " ".join([*adjs, name])
    return f"{_article(head)} {head}" + (f" {pos}" if pos else "")


def join_objects(phrases: list[str], template: int) -> str:
    """Join the object phrases of one caption (``", "`` or ``" and "`` / ``"; "`` by template)."""
    if template == 2:
        return "a picture of " + " and ".join(phrases)
    return (", " if template == 0 else "; ").join(phrases)


def _options(cfg: Any) -> dict[str, Any]:
    unknown = sorted(set(cfg.options) - set(_DEFAULTS))
    if unknown:
        raise ConfigError(f"{cfg.name} data: unknown option(s) {unknown}; valid: {sorted(_DEFAULTS)}")
    o = {**_DEFAULTS, **cfg.options}
    canvas = o["canvas"]
    if not isinstance(canvas, int) or (canvas != 0 and canvas < 28):
        raise ConfigError(f"{cfg.name} data: canvas must be 0 (native 28x28) or an integer >= 28, got {canvas!r}")
    objects = sorted(set(o["objects"])) if isinstance(o["objects"], (list, tuple)) else o["objects"]
    if not isinstance(objects, list) or not objects or not set(objects) <= {1, 2}:
        raise ConfigError(f"{cfg.name} data: objects must be a list of 1 and/or 2, got {o['objects']!r}")
    if canvas == 0 and objects != [1]:
        objects = [1]
    o["objects"] = objects
    if o["scale"] is None:
        o["scale"] = [min(14, canvas // 2), canvas // 2 if 2 in objects else canvas - 4] if canvas else [28, 28]
    lo, hi = o["scale"]
    limit = canvas // 2 if 2 in objects else canvas
    if canvas and not (8 <= lo <= hi <= limit):
        raise ConfigError(f"{cfg.name} data: scale must be [lo, hi] with 8 <= lo <= hi <= {limit}, got {o['scale']}")
    b0, b1 = o["brightness"]
    if not 0 < b0 <= b1 <= 1:
        raise ConfigError(f"{cfg.name} data: brightness must be [lo, hi] with 0 < lo <= hi <= 1, got {o['brightness']}")
    for key in ("attribute_drop", "uncond_prob"):
        if not 0 <= o[key] < 1:
            raise ConfigError(f"{cfg.name} data: {key} must be in [0, 1), got {o[key]!r}")
    if not isinstance(o["max_length"], int) or o["max_length"] < 8:
        raise ConfigError(f"{cfg.name} data: max_length must be an integer >= 8, got {o['max_length']!r}")
    if not isinstance(o["phrasings"], int) or o["phrasings"] < 1:
        raise ConfigError(f"{cfg.name} data: phrasings must be an integer >= 1, got {o['phrasings']!r}")
    return o


def _load(source: str, split: str) -> RawData:
    if source == "mnist":
        return load_mnist(split)
    return load_fashion_mnist(split)


def _layout(o: dict[str, Any], n_pool: int, n: int, seed_key: int) -> dict[str, np.ndarray]:
    """All random draws of a split (one generator, drawn in bulk)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(o["seed"]), seed_key]))
    canvas = o["canvas"] or 28
    count = rng.choice(np.asarray(o["objects"]), size=n)
    index = rng.integers(0, n_pool, size=(n, 2))
    side = rng.integers(o["scale"][0], o["scale"][1] + 1, size=(n, 2))
    bright = rng.uniform(o["brightness"][0], o["brightness"][1], size=(n, 2)) if o["canvas"] else np.ones((n, 2))
    u = rng.random((n, 2, 2))
    half = canvas // 2
    free_x = np.where(count[:, None] == 2, half - side, canvas - side)
    x0 = np.floor(u[..., 0] * (free_x + 1)).astype(np.int64) + np.array([0, half])[None] * (count[:, None] == 2)
    y0 = np.floor(u[..., 1] * (canvas - side + 1)).astype(np.int64)
    keep = rng.random((n, int(o["phrasings"]), 2, len(ATTRIBUTES))) >= o["attribute_drop"]
    template = rng.integers(0, len(TEMPLATES), size=(n, int(o["phrasings"])))
    if not o["canvas"]:
        x0[:], y0[:], side[:] = 0, 0, 28
    return {"count": count, "index": index, "side": side, "bright": bright, "x0": x0, "y0": y0, "keep": keep,
            "template": template}


def _render(pool: np.ndarray, lay: dict[str, np.ndarray], n: int, canvas: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 canvases ``[n, S, S]`` and each object's tile ``[n, 2, D, D]`` (ink in [0, 1] at uint8 levels, the
    object at the tile's top-left corner, ``D`` the largest side): the object's layer of the canvas, cropped."""
    s = canvas or 28
    big = int(lay["side"].max())
    tiles = np.zeros((n, 2, big, big), dtype=np.float32)
    src = torch.from_numpy(pool)
    for k in range(2):
        sides = lay["side"][:n, k]
        for d in np.unique(sides):
            rows = np.nonzero((sides == d) & (lay["count"][:n] > k))[0]
            if len(rows) == 0:
                continue
            glyph = src[torch.from_numpy(lay["index"][rows, k])].float()[:, None] / 255.0
            if d != 28:
                glyph = F.interpolate(glyph, size=(int(d), int(d)), mode="bilinear", antialias=True,
                                      align_corners=False)
            scale = torch.from_numpy(lay["bright"][rows, k]).float()[:, None, None]
            tiles[rows, k, :d, :d] = (glyph[:, 0].clamp(0, 1) * scale).numpy()
    tiles = np.round(tiles * 255.0) / 255.0  # each object at the canvas's uint8 levels
    images = np.zeros((n, s, s), dtype=np.uint8)
    levels = np.round(tiles * 255.0).astype(np.uint8)
    for i in range(n):
        for k in range(int(lay["count"][i])):
            y, x = lay["y0"][i, k], lay["x0"][i, k]
            h, w = min(big, s - y), min(big, s - x)
            view = images[i, y : y + h, x : x + w]
            np.maximum(view, levels[i, k, :h, :w], out=view)
    return images, tiles


@functools.lru_cache(maxsize=4)
def _split_data(source: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    raw = _load(source, split)
    pool = float_to_uint8(raw.images[:, 0]).numpy()
    return pool, raw.labels.numpy()


def _compose(cfg: Any, o: dict[str, Any], split: str, n_max: int | None):
    source = _SOURCES[cfg.name]
    pool, labels = _split_data(source, split)
    n_all = len(pool)
    lay = _layout(o, n_all, n_all, sum(map(ord, split)))
    n = n_all if n_max is None else min(n_max, n_all)
    images, tiles = _render(pool, lay, n, o["canvas"])
    present = np.arange(2)[None, :] < lay["count"][:n, None]
    values = measure(torch.from_numpy(tiles.reshape(n * 2, *tiles.shape[2:])))
    values = {k: v.reshape(n, 2) for k, v in values.items()}
    values["cx"] = values["cx"] + torch.from_numpy(lay["x0"][:n]).to(torch.float64)
    values["cy"] = values["cy"] + torch.from_numpy(lay["y0"][:n]).to(torch.float64)
    obj_labels = np.where(present, labels[lay["index"][:n]], -1)
    return images, obj_labels, values, lay, n


@functools.lru_cache(maxsize=8)
def _thresholds(name: str, options_json: str) -> dict[str, tuple[float, float]]:
    import json

    from simdiff.data.datasets import DataConfig

    o = json.loads(options_json)
    images, obj_labels, values, _, n = _compose(DataConfig(name=name, options=o), o, "train", _THRESHOLD_SAMPLE)
    present = torch.from_numpy(obj_labels >= 0)
    return tercile_thresholds({k: v[present] for k, v in values.items()})


def caption_thresholds(cfg: Any) -> dict[str, tuple[float, float]]:
    """The tercile thresholds (training split) that caption a :class:`~simdiff.data.datasets.DataConfig`."""
    import json

    if cfg.name not in _SOURCES:
        raise ConfigError(f"unknown captioned data set {cfg.name!r}; valid: {', '.join(_SOURCES)}")
    return _thresholds(cfg.name, json.dumps(_options(cfg), sort_keys=True))


def captioned(cfg: Any) -> dict[str, Any]:
    """Build a captioned split from a :class:`~simdiff.data.datasets.DataConfig`: ``images`` uint8 ``[n, S, S]``,
    ``labels`` ``[n, 2]`` (``-1``: no second object), ``captions`` (``n`` lists of ``phrasings`` strings),
    ``values`` (:func:`measure` per object, ``[n, 2]``), ``thresholds`` and the resolved ``options``."""
    import json

    if cfg.name not in _SOURCES:
        raise ConfigError(f"unknown captioned data set {cfg.name!r}; valid: {', '.join(_SOURCES)}")
    o = _options(cfg)
    if cfg.image_size is not None or cfg.channels not in (None, 1) or cfg.hflip:
        raise ConfigError(f"{cfg.name} data: image_size, channels and hflip do not apply (set options.canvas)")
    splits = ("train", "test") if cfg.name == "fashion_captions" else ("train", "valid", "test", "train+valid")
    if cfg.split not in splits:
        raise DataError(f"unknown split {cfg.split!r} for data set {cfg.name!r}; valid: {', '.join(splits)}")
    thresholds = _thresholds(cfg.name, json.dumps(o, sort_keys=True))
    images, obj_labels, values, lay, n = _compose(cfg, o, cfg.split, cfg.limit)
    attrs = ATTRIBUTES if cfg.name == "mnist_captions" else tuple(a for a in ATTRIBUTES if a not in STROKE_ATTRIBUTES)
    if not o["canvas"]:
        attrs = tuple(a for a in attrs if a in STROKE_ATTRIBUTES)
    words = attribute_words({k: v.reshape(-1) for k, v in values.items()}, thresholds, attrs)
    names = [str(i) for i in range(10)] if cfg.name == "mnist_captions" else [
        c.lower() for c in ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                            "ankle boot")]
    spelled = list(NUMBER_WORDS) if cfg.name == "mnist_captions" else names
    canvas = o["canvas"]
    captions = []
    for i in range(n):
        count = int(lay["count"][i])
        per = []
        for p in range(int(o["phrasings"])):
            t = int(lay["template"][i, p])
            phrases = []
            for k in range(count):
                lab = int(obj_labels[i, k])
                adjs = [w for w in words[2 * i + k] if lay["keep"][i, p, k, _word_attr(w)]]
                if not canvas:
                    pos = ""
                elif count == 2:
                    pos = "on the left" if k == 0 else "on the right"
                else:
                    pos = position_word(float(values["cx"][i, k]), lo=0, hi=canvas)
                phrases.append(caption_object(names[lab], spelled[lab], adjs, pos, t))
            per.append(join_objects(phrases, t))
        captions.append(per)
    return {"images": images, "labels": obj_labels, "captions": captions, "values": values,
            "thresholds": thresholds, "options": o}


def _word_attr(word: str) -> int:
    return next(i for i, a in enumerate(ATTRIBUTES) if word in WORDS[a])


def load_captions(cfg: Any) -> RawData:
    """The ``mnist_captions`` / ``fashion_captions`` source: images ``[n, 1, S, S]``, labels = the first (left)
    object's class; ``info`` holds ``captions``, ``object_labels`` ``[n, 2]``, ``thresholds`` and ``options``."""
    d = captioned(cfg)
    x = uint8_to_float(torch.from_numpy(d["images"])[:, None])
    info = {"captions": d["captions"], "object_labels": torch.from_numpy(d["labels"]),
            "thresholds": d["thresholds"], "caption_options": d["options"],
            "attributes": {k: v for k, v in d["values"].items()}}
    names = DIGIT_CLASSES if cfg.name == "mnist_captions" else FASHION_CLASSES
    return RawData(x, torch.from_numpy(d["labels"][:, 0].astype(np.int64)), 10, names, info)
