"""Prompt adherence: the judge gives the data set's own captions full marks, and wrong prompts fail."""

from __future__ import annotations

import pytest
import torch

from simdiff.data.captions import captioned
from simdiff.data.datasets import DataConfig
from simdiff.data.transforms import uint8_to_float
from simdiff.eval.prompts import mnist_crops, parse_prompt, prompt_adherence


@pytest.fixture(scope="module")
def test_split():
    d = captioned(DataConfig(name="mnist_captions", split="test", limit=120))
    return uint8_to_float(torch.from_numpy(d["images"])[:, None]), d


def test_parse_prompt_reads_every_template():
    a, b = parse_prompt("a thick slanted 7 on the left, a small 2 on the right")
    assert (a.label, a.words, a.position) == (7, {"thickness": "thick", "slant": "slanted"}, "on the left")
    assert (b.label, b.words, b.position) == (2, {"size": "small"}, "on the right")
    one, two = parse_prompt("seven, thick and slanted, on the left; two, faint, on the right")
    assert one.label == 7 and one.words == {"thickness": "thick", "slant": "slanted"} and two.words == {
        "brightness": "faint"}
    pic = parse_prompt("a picture of an upright 8 on the left and a large 0 on the right")
    assert [p.label for p in pic] == [8, 0] and pic[0].words == {"slant": "upright"}
    assert parse_prompt("") == [] and parse_prompt("a 3")[0].position is None


def test_own_captions_score_one_and_shuffled_ones_do_not(test_split):
    x, d = test_split
    prompts = [per[0] for per in d["captions"]]
    scores = prompt_adherence(x, prompts, d["thresholds"])
    for attr in ("size", "brightness", "thickness", "slant", "position"):
        assert scores[f"{attr}_n"] > 10 and scores[f"{attr}_accuracy"] == 1.0, (attr, scores)
    assert scores["class_accuracy"] > 0.9 and scores["class_n"] > 120  # the MNIST classifier on re-centred digits
    swapped = prompts[1:] + prompts[:1]
    worse = prompt_adherence(x, swapped, d["thresholds"])
    assert worse["class_accuracy"] < 0.4 and worse["thickness_accuracy"] < 0.8


def test_mnist_crops_centre_and_fit_the_digit():
    ink = torch.zeros(1, 48, 48)
    ink[0, 5:15, 30:35] = 1.0  # 10 tall, 5 wide
    crop = mnist_crops(ink)[0, 0]
    on = (crop > 0).nonzero()
    assert crop.shape == (28, 28) and on[:, 0].max() - on[:, 0].min() + 1 == 20  # fitted to 20 rows
    assert abs(on[:, 0].float().mean() - 13.5) <= 1 and abs(on[:, 1].float().mean() - 13.5) <= 1  # centred
    assert on[:, 1].max() - on[:, 1].min() + 1 == 10


def test_a_missing_object_fails_its_checks(test_split):
    x, d = test_split
    two = [i for i in range(len(x)) if d["labels"][i, 1] >= 0][:10]
    prompts = [d["captions"][i][0] for i in two]
    assert prompt_adherence(x[two], prompts, d["thresholds"])["position_accuracy"] == 1.0
    blank = x[two].clone()
    blank[..., :, 24:] = -1.0  # erase the right-hand object
    scores = prompt_adherence(blank, prompts, d["thresholds"])
    assert scores["position_accuracy"] == 0.5 and scores["class_accuracy"] <= 0.5
