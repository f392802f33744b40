"""Semantica pairs on natural-photo patches: labels are photo indices, a partner is another crop of the same photo
(never the target, never the target's pixels), whole photos are held out, the test photos are disjoint from the
training photos, a tiny image-conditioned model trains and samples from photo patches deterministically, and the
few-shot report scores held-out photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import simdiff
from simdiff.configuration import ConfigError
from simdiff.data import DataConfig, build_dataset
from simdiff.data.photos import PHOTO_SPLITS, PHOTOS, load_photo, patch_grid
from simdiff.semantica import PairOptions, partner_indices, sample_from_condition_images, train_semantica
from simdiff.semantica.pairs import load_photo_source, load_source

CONFIG = Path(simdiff.__file__).parent / "configs" / "semantica_photos.yaml"
NAMES = list(PHOTOS)


@pytest.fixture(scope="module")
def train():
    return load_photo_source("train")


@pytest.fixture(scope="module")
def test_split():
    return load_photo_source("test")


def _keys(images: torch.Tensor) -> set[bytes]:
    return {im.numpy().tobytes() for im in images}


def test_labels_are_photo_indices(train):
    assert train.images.shape[1:] == (3, 32, 32) and train.class_names == tuple(NAMES) and train.num_classes == 7
    assert set(train.labels.tolist()) == {NAMES.index(n) for n in PHOTO_SPLITS["train"]} == {0, 1, 2, 3, 4}
    counts = torch.bincount(train.labels, minlength=7).tolist()
    for k, name in enumerate(NAMES[:5]):
        img = load_photo(name)
        grid = patch_grid(img.shape[0], img.shape[1], size=32, stride=16)
        first = torch.from_numpy(img[:32, :32]).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(train.images[train.labels == k][0], first)  # row-major grid: top-left corner first
        assert counts[k] == len(grid) - (9 if name == "astronaut" else 0), (name, counts[k], len(grid))
    # the all-black corner of the astronaut photo gives ten identical patches; nine are dropped
    assert train.info["dropped_duplicates"] == 9 and len(_keys(train.images)) == len(train.images)
    raw = load_photo_source("train", drop_duplicates=False)
    assert len(raw.images) == len(train.images) + 9 and len(_keys(raw.images)) == len(train.images)


def test_partners_are_other_crops_of_the_same_photo(train):
    idx = torch.arange(len(train.labels))
    part = partner_indices(train.labels, idx, generator=torch.Generator().manual_seed(0), num=3)
    assert part.shape == (len(idx), 3)
    assert torch.equal(train.labels[part], train.labels[idx, None].expand(-1, 3))
    assert not (part == idx[:, None]).any()
    flat = train.images.reshape(len(idx), -1)
    assert ((flat[part] - flat[idx, None]).abs().amax(-1) > 0).all()  # never the target's pixels either
    # left/right neighbours on the stride-16 grid overlap by half a patch, and such pairs are drawn (astronaut's
    # first row: 31 patches; indices there are not shifted by the dropped duplicates, which come later)
    targets = idx[1:30].repeat(200)
    again = partner_indices(train.labels, targets, generator=torch.Generator().manual_seed(1))[:, 0]
    assert ((again - targets).abs() == 1).any()
    assert torch.equal(train.images[idx[:29]][..., 16:], train.images[idx[1:30]][..., :16])  # half shared


def test_holdout_by_photo_removes_every_patch_of_it(train):
    flower = NAMES.index("flower")
    for held in (["flower"], [flower], [str(flower)], "flower"):
        assert PairOptions.parse({"source": "photos", "holdout_classes": held}).holdout_classes == (flower,)
    ds = build_dataset(DataConfig(name="pairs", options={"source": "photos", "holdout_classes": ["flower"]}))
    assert flower not in set(ds.labels.tolist()) and ds.info["pairs"]["train_classes"] == [0, 1, 2, 3]
    assert len(ds) == int((train.labels != flower).sum())
    assert not _keys(ds.images) & _keys(train.images[train.labels == flower])
    assert ds.class_names[int(ds.labels[-1])] == "motorcycle_left"
    with pytest.raises(ConfigError, match="unknown photo 'dog'"):
        PairOptions.parse({"source": "photos", "holdout_classes": ["dog"]})
    with pytest.raises(ConfigError, match="out of range"):
        PairOptions.parse({"source": "photos", "holdout_classes": [7]})
    with pytest.raises(ConfigError, match="patch_size applies to source photos only"):
        PairOptions.parse({"source": "mnist", "patch_size": 32})
    with pytest.raises(ConfigError, match="larger than every photo"):
        load_source("photos", "train", patch_size=4096)


def test_test_photos_are_disjoint_from_training_photos(train, test_split):
    assert set(test_split.labels.tolist()) == {NAMES.index("chelsea"), NAMES.index("china")} == {5, 6}
    assert not set(test_split.labels.tolist()) & set(train.labels.tolist())
    assert not _keys(test_split.images) & _keys(train.images)
    assert len(test_split.images) == 126 + 260 and test_split.info["dropped_duplicates"] == 0  # stride 32
    ds = build_dataset(DataConfig(name="pairs", split="test", options={"source": "photos", "patch_size": 16}))
    assert ds.images.shape[1:] == (3, 16, 16) and ds.class_names[int(ds.labels[0])] == "chelsea"


def test_tiny_training_and_few_shot_sampling_on_photo_patches(tmp_path, test_split, monkeypatch):
    from simdiff.runs import load_config

    cfg = load_config(CONFIG, ["data.limit=48", "train.steps=2", "train.batch_size=8", "train.sample_every=0",
                               "train.checkpoint_every=0", "train.progress=false", "train.log_every=1",
                               "sample.steps=2", "sample.grid=uniform_t"])
    summary = train_semantica(cfg, tmp_path / "run")
    assert summary["step"] == 2 and np.isfinite(summary["loss"])
    cond = test_split.images[test_split.labels == 5][:3]  # chelsea: a photo the model never saw
    kwargs = dict(n=4, guidance=1.0, steps=3, options={"grid": "uniform_t"})
    x, c = sample_from_condition_images(tmp_path / "run", cond, seed=0, **kwargs)
    assert x.shape == (4, 3, 32, 32) and torch.equal(c, cond) and torch.isfinite(x).all()
    again, _ = sample_from_condition_images(tmp_path / "run", cond, seed=0, **kwargs)
    other, _ = sample_from_condition_images(tmp_path / "run", cond, seed=1, **kwargs)
    assert torch.equal(x, again) and not torch.equal(x, other)

    # few-shot report on the held-out photos, with stand-ins for the sampler (real patches of the conditioning
    # photo, never the conditioning ones) and for Inception (mean and spread of each channel, to stay fast)
    from simdiff.semantica import metrics, sample

    def real_patches(loaded, cond_images, n, guidance, **kwargs):
        photo = 5 if any(torch.equal(cond_images[0], p) for p in test_split.images[test_split.labels == 5]) else 6
        return test_split.images[test_split.labels == photo][10 : 10 + n], cond_images

    monkeypatch.setattr(sample, "sample_from_condition_images", real_patches)
    monkeypatch.setattr(metrics, "features_for", lambda domain: lambda x: torch.cat([x.mean((2, 3)), x.std((2, 3))], 1))
    rep = metrics.fewshot_report(tmp_path / "run", source="photos", classes=(5, 6), shots=2, num=6, steps=2)
    for photo in ("5", "6"):
        row = rep["classes"][photo]
        assert row["class_agreement"] == 1.0 and row["copy_fraction"] == 0.0 and row["median_d_train"] > 0.05


def test_photo_conditioning_patches_spread_over_the_photo():
    # photo patches are in raster order: the conditioning shots must come from the whole photo, not its top row
    from simdiff.semantica import metrics

    spread = metrics.condition_picks(459, 5, spread=True)
    first = metrics.condition_picks(459, 5, spread=False)
    assert int(spread.sum()) == int(first.sum()) == 5
    idx = spread.nonzero().flatten()
    assert idx[0] == 0 and idx[-1] == 458 and bool((idx.diff() > 100).all())
    assert first.nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
