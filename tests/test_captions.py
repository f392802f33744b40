"""Captioned digits: attribute measurements on hand-made images, caption words, determinism, composition."""

from __future__ import annotations

import pytest
import torch

from simdiff.configuration import ConfigError
from simdiff.data.captions import (
    ATTRIBUTES,
    WORDS,
    attribute_words,
    caption_object,
    captioned,
    join_objects,
    measure,
    position_word,
)
from simdiff.data.datasets import DataConfig


def _bar(*, width: int, length: int = 20, shear: float = 0.0, size: int = 28, left: int = 10) -> torch.Tensor:
    """A white bar ``width`` wide and ``length`` tall; row ``r`` shifted right by ``-shear * r`` (top leans right
    for shear > 0)."""
    img = torch.zeros(size, size, dtype=torch.float64)
    top = (size - length) // 2
    for r in range(length):
        x0 = left + round(shear * (length - 1 - r))
        img[top + r, x0 : x0 + width] = 1.0
    return img


@pytest.fixture(scope="module")
def small_mnist():
    return captioned(DataConfig(name="mnist_captions", split="train", limit=200))


def test_measure_matches_closed_forms_on_bars():
    m = measure(torch.stack([_bar(width=4), _bar(width=1, shear=0.5)]))
    # area / half-perimeter / height: w l / (l + w) / l for an axis-aligned bar
    assert m["thickness"][0].item() == pytest.approx(4 * 20 / 24 / 20)
    assert m["size"].tolist() == [20.0, 20.0] and m["width"][0].item() == 4
    assert m["slant"][0].item() == pytest.approx(0.0, abs=1e-12)
    # a bar sheared half a pixel per row leaning right: slant ~ +0.5 (rounded positions)
    assert m["slant"][1].item() == pytest.approx(0.5, abs=0.03)
    mirrored = measure(_bar(width=1, shear=0.5).flip(-1)[None])
    assert mirrored["slant"].item() == pytest.approx(-m["slant"][1].item())
    assert m["cx"][0].item() == pytest.approx(11.5) and m["brightness"][0].item() == 1.0
    faint = measure(0.5 * _bar(width=4)[None])
    assert faint["brightness"].item() == 128 / 255  # 8-bit levels
    assert faint["thickness"].item() == m["thickness"][0].item()
    assert measure(torch.zeros(1, 8, 8))["thickness"].item() == 0.0


def test_hand_made_bars_get_the_right_words(small_mnist):
    th = small_mnist["thresholds"]
    words = attribute_words(measure(torch.stack([_bar(width=4), _bar(width=1, shear=0.5)])), th,
                            ("thickness", "slant"))
    assert words == [["thick", "upright"], ["thin", "slanted"]]


def test_position_words_on_a_canvas():
    canvas = 48
    left, right = torch.zeros(2, canvas, canvas, dtype=torch.float64)
    left[20:30, 2:8] = 1
    right[20:30, 40:46] = 1
    cx = measure(torch.stack([left, right]))["cx"]
    assert [position_word(float(c), lo=0, hi=canvas) for c in cx] == ["on the left", "on the right"]
    assert position_word(24.0, lo=0, hi=canvas) == "in the middle"


def test_thresholds_are_training_terciles(small_mnist):
    th = small_mnist["thresholds"]
    assert set(th) == set(ATTRIBUTES) and all(lo < hi for lo, hi in th.values())
    test_split = captioned(DataConfig(name="mnist_captions", split="test", limit=5))
    assert test_split["thresholds"] == th  # the test split is described with the training split's terciles


def test_captions_agree_with_measurements_and_layout(small_mnist):
    d = small_mnist
    th, vals, labels = d["thresholds"], d["values"], d["labels"]
    assert d["images"].shape == (200, 48, 48) and len(d["captions"]) == 200
    assert all(len(per) == 3 for per in d["captions"])
    seen_two = 0
    for i, per in enumerate(d["captions"]):
        two = labels[i, 1] >= 0
        seen_two += int(two)
        if two:  # first object in the left half, second in the right half
            assert vals["cx"][i, 0] < 24 <= vals["cx"][i, 1]
            assert all("on the left" in c and "on the right" in c for c in per)
        if not two and all(c.startswith("a ") for c in per[:1]):
            assert f" {labels[i, 0]}" in per[0]
        for c in per:
            if not two and " thick " in f" {c} ".replace(",", " "):
                assert vals["thickness"][i, 0] >= th["thickness"][1]
            if not two and " thin " in f" {c} ".replace(",", " "):
                assert vals["thickness"][i, 0] <= th["thickness"][0]
    assert 50 < seen_two < 150
    assert len({c for per in d["captions"] for c in per}) > 300  # several phrasings per image


def test_deterministic_and_independent_of_limit(small_mnist):
    again = captioned(DataConfig(name="mnist_captions", split="train", limit=20))
    assert (again["images"] == small_mnist["images"][:20]).all()
    assert again["captions"] == small_mnist["captions"][:20]
    other = captioned(DataConfig(name="mnist_captions", split="train", limit=20, options={"seed": 1}))
    assert not (other["images"] == again["images"]).all()


def test_native_size_has_stroke_words_only():
    d = captioned(DataConfig(name="mnist_captions", split="train", limit=50, options={"canvas": 0}))
    assert d["images"].shape == (50, 28, 28)
    words = {w for per in d["captions"] for c in per for w in c.replace(",", " ").split()}
    assert words & {"thick", "thin", "upright", "slanted"}
    assert not words & {"small", "large", "faint", "bright", "left", "right"}


def test_phrasing_helpers():
    assert caption_object("8", "eight", ["upright"], "", 0) == "an upright 8"
    phrase = caption_object("7", "seven", ["thick", "slanted"], "on the left", 1)
    assert phrase == "seven, thick and slanted, on the left"
    assert join_objects(["a 7 on the left", "a 2 on the right"], 0) == "a 7 on the left, a 2 on the right"
    assert join_objects(["a 7 on the left", "a 2 on the right"], 2).startswith("a picture of a 7")
    assert all(len(pair) == 2 for pair in WORDS.values())


@pytest.mark.parametrize("options, needle", [({"colour": 1}, "unknown option"), ({"canvas": 20}, "canvas"),
                                             ({"objects": [3]}, "objects"), ({"scale": [4, 10]}, "scale"),
                                             ({"uncond_prob": 1.0}, "uncond_prob")])
def test_bad_options_are_one_line_errors(options, needle):
    with pytest.raises(ConfigError, match=needle):
        captioned(DataConfig(name="mnist_captions", options=options))


def test_flips_are_refused():
    with pytest.raises(ConfigError, match="hflip"):
        captioned(DataConfig(name="mnist_captions", hflip=True))


def test_fashion_captions_use_garment_names_and_no_stroke_words():
    from simdiff.data.sources import FASHION_DIR

    if not FASHION_DIR.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    d = captioned(DataConfig(name="fashion_captions", split="test", limit=40))
    words = {w for per in d["captions"] for c in per for w in c.replace(",", " ").replace(";", " ").split()}
    assert words & {"dress", "coat", "sneaker", "trouser", "pullover", "bag"}
    assert not words & {"thick", "thin", "upright", "slanted"} and words & {"small", "large", "faint", "bright"}
