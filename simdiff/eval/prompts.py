"""Prompt adherence of text-to-image samples on captioned digits, judged by the measurements that made the captions.

A prompt in the caption grammar of :mod:`simdiff.data.captions` (one or two objects; ``"a thick slanted 7 on the
left, a small 2 on the right"``, ``"seven, thick and slanted, on the left"``, ...) is parsed into objects
(:func:`parse_prompt`): a class (numeral or number word), attribute words and a position. A generated canvas is cut
into its objects the way the data set places them -- the whole canvas for one object, the left and right halves for
two -- and each object is

* classified by the MNIST classifier (:class:`simdiff.eval.mnist.MNISTFeatures`) after MNIST's own normalisation:
  the ink's bounding box brought to full brightness, scaled (aspect kept) to fit 20 x 20 and placed by its centre
  of mass in a 28 x 28 frame (:func:`mnist_crops`);
* measured with :func:`simdiff.data.captions.measure` and given words with the data set's tercile thresholds
  (:func:`simdiff.data.captions.attribute_words`), and a position with :func:`~simdiff.data.captions.position_word`.

:func:`prompt_adherence` reports, per attribute, the fraction of the objects whose prompt names it that get the
same word back (``<attribute>_accuracy`` with the count ``<attribute>_n``); ``class_accuracy`` covers every object
with a class. An object must be present (:data:`MIN_PEAK`, :data:`MIN_AREA`) to pass any check, so an empty half
of a two-object canvas fails its object's position, class and attributes. On the data set's own images and
captions every attribute scores 1 (the captions were made this way, see ``tests/test_prompts_eval.py``), so the
scores measure the model, not the judge. The criterion is the
captions' own (lowest / highest tercile), so "thick" is judged right only when the stroke is in the training set's
thickest third. Classes are parsed and judged for digits only (numerals and number words); on ``fashion_captions``
prompts the attributes and positions are judged and ``class_n`` is 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from simdiff.data.captions import ATTRIBUTES, NUMBER_WORDS, WORDS, attribute_words, measure, position_word

__all__ = ["ObjectSpec", "parse_prompt", "split_objects", "mnist_crops", "prompt_adherence"]

_WORD_ATTR = {w: a for a, pair in WORDS.items() for w in pair}
#: an object is present when its brightest pixel has at least this ink and its mask (>= half the peak) at least
#: ``MIN_AREA`` pixels; an absent object fails every check its prompt names (class, attributes, position).
MIN_PEAK, MIN_AREA = 0.25, 4
_SPLIT = re.compile(r";|,\s+(?=an?\s)|\s+and\s+(?=an?\s)")


@dataclass
class ObjectSpec:
    """One object of a prompt: ``label`` (0-9 or None), ``words`` (attribute -> word), ``position`` (or None)."""

    label: int | None = None
    words: dict[str, str] = field(default_factory=dict)
    position: str | None = None


def parse_prompt(prompt: str) -> list[ObjectSpec]:
    """The objects a prompt asks for (empty list for the empty prompt)."""
    text = prompt.lower().strip()
    if text.startswith("a picture of "):
        text = text[len("a picture of "):]
    out = []
    for chunk in (c.strip() for c in _SPLIT.split(text)):
        if not chunk:
            continue
        spec = ObjectSpec()
        for tok in re.findall(r"[a-z0-9]+", chunk):
            if spec.label is None and (tok.isdigit() and len(tok) == 1 or tok in NUMBER_WORDS):
                spec.label = int(tok) if tok.isdigit() else NUMBER_WORDS.index(tok)
            elif tok in _WORD_ATTR:
                spec.words[_WORD_ATTR[tok]] = tok
            elif tok in ("left", "right", "middle"):
                spec.position = {"left": "on the left", "right": "on the right", "middle": "in the middle"}[tok]
        out.append(spec)
    return out


def split_objects(images: Tensor, count: int) -> Tensor:
    """Ink ``[B * count, S, S']`` in [0, 1] of each object of ``images`` ``[B, 1, S, S']`` (in [-1, 1]): the canvas
    for one object; for two, the canvas with its right half zeroed (left object) and with its left half zeroed
    (right object), so coordinates stay those of the canvas."""
    ink = ((images[:, 0].float() + 1) / 2).clamp(0, 1)
    if count == 1:
        return ink
    half = ink.shape[-1] // 2
    left, right = ink.clone(), ink.clone()
    left[..., half:] = 0
    right[..., :half] = 0
    return torch.stack([left, right], 1).flatten(0, 1)


def mnist_crops(ink: Tensor) -> Tensor:
    """Objects ``[N, S, S']`` (ink in [0, 1]) -> MNIST-normalised digits ``[N, 1, 28, 28]`` in [-1, 1]: the ink's
    bounding box (pixels >= half the peak) divided by its peak, scaled to fit 20 x 20 with its aspect ratio, and
    placed with its centre of mass at the centre of the 28 x 28 frame (as MNIST was made)."""
    out = torch.zeros(len(ink), 1, 28, 28)
    for i, x in enumerate(ink):
        m = x >= 0.5 * x.max()
        if x.max() <= 0 or not m.any():
            continue
        rows, cols = m.any(1).nonzero().squeeze(1), m.any(0).nonzero().squeeze(1)
        crop = x[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        h, w = crop.shape
        scale = 20.0 / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        small = F.interpolate(crop[None, None] / crop.max(), size=(nh, nw), mode="bilinear", antialias=True,
                              align_corners=False)[0, 0].clamp(0, 1)
        # centre of mass at the frame's centre (MNIST's own placement), kept inside the frame
        mass = small.sum().clamp_min(1e-12)
        cy = float((small.sum(1) * torch.arange(nh)).sum() / mass)
        cx = float((small.sum(0) * torch.arange(nw)).sum() / mass)
        top = min(max(round(13.5 - cy), 0), 28 - nh)
        left = min(max(round(13.5 - cx), 0), 28 - nw)
        out[i, 0, top : top + nh, left : left + nw] = small
    return out * 2 - 1


def prompt_adherence(images: Tensor, prompts: list[str], thresholds: dict[str, tuple[float, float]], *,
                     classifier=None) -> dict[str, float]:
    """Per-attribute adherence of ``images`` ``[B, 1, S, S]`` (in [-1, 1]) to ``prompts`` (``B`` strings).

    Args:
        thresholds: the data set's tercile thresholds (:func:`simdiff.data.captions.caption_thresholds`).
        classifier: an object with ``predict(images [N, 1, 28, 28]) -> [N]``; default the MNIST classifier.

    Returns:
        ``class_accuracy``, ``<attribute>_accuracy`` for size, brightness, thickness, slant and position, each with
        its count ``<name>_n`` (accuracies of attributes no prompt names are NaN).
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    specs = [parse_prompt(p) for p in prompts]
    hits: dict[str, list[bool]] = {name: [] for name in ("class", *ATTRIBUTES, "position")}
    crops, labels = [], []
    for count in (1, 2):
        rows = [i for i, s in enumerate(specs) if len(s) == count]
        if not rows:
            continue
        ink = split_objects(images[rows], count)
        values = measure(ink)
        words = attribute_words(values, thresholds)
        peak = ink.flatten(1).amax(1)
        present = (peak >= MIN_PEAK) & ((ink >= 0.5 * peak[:, None, None]).flatten(1).sum(1) >= MIN_AREA)
        for j, i in enumerate(rows):
            for k, spec in enumerate(specs[i]):
                n = j * count + k
                got = {_WORD_ATTR[w]: w for w in words[n]} if present[n] else {}
                for attr, want in spec.words.items():
                    hits[attr].append(got.get(attr) == want)
                if spec.position is not None:
                    width = ink.shape[-1]
                    lo, hi = (0, width) if count == 1 else ((0, width // 2) if k == 0 else (width // 2, width))
                    where = position_word(float(values["cx"][n]), lo=0, hi=width) if count == 1 else (
                        "on the left" if values["cx"][n] < width / 2 else "on the right")
                    hits["position"].append(bool(present[n]) and where == spec.position and lo <= values["cx"][n] < hi)
                if spec.label is not None:
                    crops.append(ink[n])
                    labels.append(spec.label if present[n] else -1)  # a missing object is a miss
    if crops:
        if classifier is None:
            from simdiff.eval.mnist import MNISTFeatures

            classifier = MNISTFeatures()
        pred = classifier.predict(mnist_crops(torch.stack(crops)))
        hits["class"] = (pred.cpu() == torch.tensor(labels)).tolist()
    out: dict[str, float] = {}
    for name, h in hits.items():
        out[f"{name}_accuracy"] = float(sum(h) / len(h)) if h else float("nan")
        out[f"{name}_n"] = float(len(h))
    return out
