"""Few-shot sampling: a tiny model trained on an easy pairing follows its conditioning image; seeds repeat;
the nearest-neighbour copy check flags an exact copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from simdiff.generate import SampleConfig
from simdiff.losses import DiffusionLoss, LossConfig
from simdiff.nets import build_model
from simdiff.schedules import schedule_from_dict
from simdiff.semantica import PairBatches, PairOptions, copy_check, nearest_rms, sample_conditioned
from simdiff.semantica.encoders import ImageEncoder

SIZE = 8


class _Halves(nn.Module):
    def forward(self, x):  # [n, 1, H, W] -> [n, 1, 2]: mean brightness of the left and right halves
        w = x.shape[-1] // 2
        return torch.stack([x[..., :w].mean((1, 2, 3)), x[..., w:].mean((1, 2, 3))], -1)[:, None]


def _images(label: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Class 0: bright left half; class 1: bright right half (values in [-1, 1], a little noise)."""
    x = torch.full((len(label), 1, SIZE, SIZE), -0.8)
    left = label == 0
    x[left, :, :, : SIZE // 2] = 0.8
    x[~left, :, :, SIZE // 2 :] = 0.8
    return (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module")
def trained():
    from simdiff.data import ImageDataset

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(128) % 2
    ds = ImageDataset(_images(labels, g), labels, num_classes=2)
    enc = ImageEncoder(_Halves(), name="halves", version="1", num_tokens=1, width=2)
    pairs = PairBatches(ds, enc, PairOptions(source="digits", uncond_prob=0.1))
    net = build_model("uvit", "v", {"channels": [16], "dim": 32, "depth": 1, "num_heads": 2, "emb_dim": 32,
                                    "context_dim": 2}, image_channels=1, image_size=SIZE, num_classes=0)
    loss_cfg = LossConfig(schedule={"name": "cosine"})
    loss = DiffusionLoss.from_config(loss_cfg)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(150):
        idx = torch.randint(len(pairs), (32,), generator=g)
        batch = pairs.transform(pairs[idx], g)
        value = loss(net, batch, g).mean()
        opt.zero_grad()
        value.backward()
        opt.step()
    net.eval()
    return net, enc, schedule_from_dict(loss_cfg.schedule), g


def _side(x: torch.Tensor) -> torch.Tensor:
    """+1 where the left half is brighter than the right, -1 otherwise."""
    return torch.sign(x[..., : SIZE // 2].mean((1, 2, 3)) - x[..., SIZE // 2 :].mean((1, 2, 3)))


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_samples_follow_the_class_of_their_conditioning_image(trained, guidance):
    net, enc, schedule, _ = trained
    g = torch.Generator().manual_seed(7)
    cond = _images(torch.tensor([0, 0, 1, 1]), g)  # new images: two of class A (left), two of class B (right)
    cfg = SampleConfig(sampler="ddim", steps=10, guidance=guidance, seed=3)
    x = sample_conditioned(net, schedule, enc, cond[:, None], cfg, per_condition=16, image_shape=(1, SIZE, SIZE))
    assert x.shape == (64, 1, SIZE, SIZE)
    side = _side(x).reshape(4, 16)
    assert float((side[:2] > 0).double().mean()) > 0.85 and float((side[2:] < 0).double().mean()) > 0.85
    # outputs are closer to the class-A template than to the class-B one when conditioned on class A
    a, b = _images(torch.tensor([0]), g), _images(torch.tensor([1]), g)
    da, db = nearest_rms(x[:32], a)[0], nearest_rms(x[:32], b)[0]
    assert float((da < db).double().mean()) > 0.85


def test_same_seed_same_samples_other_seed_other_samples(trained):
    net, enc, schedule, _ = trained
    cond = _images(torch.tensor([0, 1]), torch.Generator().manual_seed(1))[:, None]
    kw = dict(per_condition=3, image_shape=(1, SIZE, SIZE))
    cfg = SampleConfig(sampler="ddim", steps=4, guidance=1.0, seed=11)
    a = sample_conditioned(net, schedule, enc, cond, cfg, **kw)
    b = sample_conditioned(net, schedule, enc, cond, cfg, **kw)
    c = sample_conditioned(net, schedule, enc, cond, SampleConfig(sampler="ddim", steps=4, guidance=1.0, seed=12), **kw)
    assert a.shape == (6, 1, SIZE, SIZE) and torch.equal(a, b) and not torch.allclose(a, c)
    # several conditioning images per sample: concatenated (2 tokens) or averaged (1 token)
    both = _images(torch.tensor([0, 0]), torch.Generator().manual_seed(2))[None]  # [1, 2, C, H, W]
    for mode in ("each", "mean"):
        x = sample_conditioned(net, schedule, enc, both, cfg, mode=mode, **kw)
        assert x.shape == (3, 1, SIZE, SIZE) and bool((_side(x) > 0).all())


def test_copy_check_flags_an_exact_copy():
    g = torch.Generator().manual_seed(0)
    cond = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    train = torch.rand(20, 1, 8, 8, generator=g) * 2 - 1
    samples = torch.stack([cond[1], cond[2] + 0.01, train[5], -cond[0]])
    out = copy_check(samples, cond_images=cond, train_images=train)
    assert out["copies"].tolist() == [True, True, False, False]
    assert float(out["d_cond"][0]) < 1e-6 and abs(float(out["d_cond"][1]) - 0.01) < 1e-6
    assert float(out["d_train"][2]) < 1e-6 and out["train_copy_fraction"] == 0.25 and out["copy_fraction"] == 0.5
    # nearest_rms against brute force
    d, j = nearest_rms(samples, train)
    brute = ((samples[:, None] - train[None]) ** 2).mean((2, 3, 4)).sqrt()
    torch.testing.assert_close(d, brute.min(1).values.double(), rtol=1e-6, atol=1e-6)
    assert torch.equal(j, brute.argmin(1))


def test_fewshot_scores_rank_real_digits_above_noise():
    from simdiff.semantica import fewshot_scores
    from simdiff.semantica.pairs import load_source

    sevens = load_source("mnist", "test", classes=[7]).images
    real = fewshot_scores(sevens[:60], sevens[60:300])
    noise = fewshot_scores(torch.rand(60, 1, 28, 28) * 2 - 1, sevens[60:300])
    assert real["fd"] < noise["fd"] / 3 and real["kid"] < noise["kid"] and real["precision"] > noise["precision"]
