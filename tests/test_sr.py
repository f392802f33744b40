"""Super-resolution stage: the conditioning path, noise-conditioning augmentation, training through the trainer.

The augmentation-level claim is checked on the exact (Bayes-optimal) super-resolution denoiser of a Gaussian image
model, where ``E[x | z_t, y]`` is Gaussian conditioning in closed form (float64): with it the claim is about the
sampling path (corrupt once at the level, give the level to the model) and not about how well a tiny net trained.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from simdiff.cascade import (
    LOW_RES_NULL,
    LowResolution,
    SRConfig,
    SRLoss,
    SuperResolution,
    augment,
    build_sr_network,
    downsample,
    load_sr,
    load_sr_config,
    sample_sr,
    train_sr,
    upsample,
)
from simdiff.conditioners import null_conditioning
from simdiff.configuration import ConfigError
from simdiff.generate import SampleConfig
from simdiff.nets import build_model
from simdiff.process import DenoiserOutput, to_output
from simdiff.schedules import CosineSchedule

CONFIGS = Path(__file__).resolve().parents[1] / "simdiff" / "configs"
TINY = {"channels": [8, 16], "num_res_blocks": 1, "attention_levels": [], "mid_attention": False}


def tiny_sr(*, upsample_mode: str = "bilinear", low: int = 4, size: int = 8) -> SuperResolution:
    torch.manual_seed(0)
    net = build_model("unet", "v", TINY, image_channels=3, image_size=size, num_classes=0)
    return SuperResolution(net, channels=1, low_res_size=low, upsample=upsample_mode).eval()


def capture(model: SuperResolution) -> list[torch.Tensor]:
    """Every tensor the backbone receives (z, upsampled low-res, flag concatenated)."""
    seen: list[torch.Tensor] = []
    model.net.backbone.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_conditioning_path_sees_exactly_the_downsampled_target_without_augmentation(mode):
    model = tiny_sr(upsample_mode=mode)
    seen = capture(model)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    low = downsample(x, 4)
    assert torch.equal(low, F.avg_pool2d(x, 2))  # area downsampling at factor 2 is 2x2 averaging
    # through the training loss: clean_prob=1 (zero augmentation), no dropping; the conditioner builds low_res
    sr = SRConfig(low_res_size=4, upsample=mode, clean_prob=1.0)
    loss = SRLoss({"schedule": {"name": "cosine"}}, sr, LowResolution(4))
    out = loss(model, {"x": x}, torch.Generator().manual_seed(2))
    assert out.shape == (6,) and torch.isfinite(out).all()
    joint = seen[-1]
    assert joint.shape == (6, 3, 8, 8)
    assert torch.equal(joint[:, 1:2], upsample(low, (8, 8), mode=mode))
    assert torch.equal(joint[:, 2], torch.ones(6, 8, 8))
    if mode == "nearest":  # nearest upsampling is inverted exactly by area downsampling
        assert torch.equal(downsample(joint[:, 1:2], 4), low)
    # through sampling with aug_logsnr=None: every sampler call sees the same, uncorrupted input
    seen.clear()
    cfg = SampleConfig(sampler="ddim", steps=3, grid="uniform_logsnr", num=6)
    sample_sr(model, CosineSchedule(), low, cfg, aug_logsnr=None)
    assert len(seen) == 3
    assert all(torch.equal(j[:, 1:2], upsample(low, (8, 8), mode=mode)) for j in seen)


def test_augmentation_is_the_forward_process_in_float64():
    g = torch.Generator().manual_seed(3)
    low, e = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(4, 1, 4, 4, generator=g,
                                                                                     dtype=torch.float64)
    lam = torch.tensor([-3.0, 0.0, 5.0, math.inf], dtype=torch.float64)
    out = augment(low, lam, e)
    for i in range(3):
        a, s = math.sqrt(1 / (1 + math.exp(-lam[i]))), math.sqrt(1 / (1 + math.exp(lam[i])))
        torch.testing.assert_close(out[i], a * low[i] + s * e[i], rtol=1e-12, atol=1e-12)
        assert abs(a * a + s * s - 1) < 1e-12
    assert torch.equal(out[3], low[3])


def test_training_draws_levels_in_range_and_dropped_inputs_are_the_null_condition():
    model = tiny_sr()
    seen = capture(model)
    levels = []
    model.aug_embed.register_forward_pre_hook(lambda mod, args: levels.append(args[0].clone()))
    x = torch.rand(400, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    sr = SRConfig(low_res_size=4, aug_min=-1.0, aug_max=3.0, clean_prob=0.25, cond_drop_prob=0.5)
    SRLoss({}, sr, LowResolution(4))(model, {"x": x}, torch.Generator().manual_seed(5))
    lam = levels[-1]
    finite = lam[torch.isfinite(lam)]
    assert 0.15 < float(torch.isinf(lam).float().mean()) < 0.35  # clean_prob = 0.25
    assert float(finite.min()) >= -1.0 and float(finite.max()) <= 3.0 and float(finite.std()) > 0.8  # U[-1, 3]
    joint = seen[-1]
    flag = joint[:, 2, 0, 0]
    assert 0.4 < float(flag.mean()) < 0.6  # cond_drop_prob = 0.5
    assert torch.equal(joint[flag == 0][:, 1:], torch.zeros_like(joint[flag == 0][:, 1:]))
    assert (joint[flag == 1][:, 1].abs().sum(dim=(1, 2)) > 0).all()


def test_null_condition_is_zeros_and_flag_zero_and_matches_no_low_res():
    model = tiny_sr()
    with torch.no_grad():
        for p in model.parameters():  # a non-trivial net (the output head is zero-initialised)
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    cond = LowResolution(4)({"x": torch.rand(3, 1, 8, 8)})
    null = null_conditioning(cond, LOW_RES_NULL, batch=3)
    assert torch.equal(null["low_res"], torch.zeros(3, 1, 4, 4)) and torch.equal(null["low_res_mask"], torch.zeros(3))
    z, lam = torch.randn(3, 1, 8, 8), torch.zeros(3)
    a = model(z, lam, low_res=null["low_res"], low_res_mask=null["low_res_mask"]).x
    b = model(z, lam).x
    c = model(z, lam, **cond).x
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # guidance on the low-res input: w = 0 is the conditional model, w = 1 moves away from the unconditional one
    low, sched = cond["low_res"], CosineSchedule()
    plain = sample_sr(model, sched, low, SampleConfig(sampler="ddim", steps=3, num=3), aug_logsnr=2.0)
    guided = sample_sr(model, sched, low, SampleConfig(sampler="ddim", steps=3, num=3, guidance=1.0), aug_logsnr=2.0)
    assert guided.shape == plain.shape and not torch.allclose(guided, plain)


class ExactGaussianSR:
    """The exact denoiser ``E[x | z_t, y]`` for ``x ~ N(0, S)`` on 8x8 images and ``y = a_aug A x + s_aug e``
    (``A`` = 2x2 area downsampling to 4x4), by Gaussian conditioning in float64."""

    image_shape, low_res_shape, num_classes = (1, 8, 8), (1, 4, 4), 0

    def __init__(self):
        ij = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1).reshape(64, 2)
        d2 = (ij[:, None] - ij[None]).pow(2).sum(-1)
        self.S = (0.08 * torch.exp(-d2 / (2 * 1.5**2)) + 1e-3 * torch.eye(64)).double()
        eye = torch.eye(64, dtype=torch.float64).reshape(64, 1, 8, 8)
        self.A = F.avg_pool2d(eye, 2).reshape(64, 16).T  # [16, 64]

    def __call__(self, z, logsnr, low_res=None, aug_logsnr=None, low_res_mask=None):
        b = z.shape[0]
        lam_t = torch.as_tensor(logsnr, dtype=torch.float64).reshape(-1).expand(b)
        lam_a = torch.as_tensor(aug_logsnr, dtype=torch.float64).reshape(-1).expand(b)
        xs = []
        for i in range(b):
            at, st = torch.sigmoid(lam_t[i]).sqrt(), torch.sigmoid(-lam_t[i]).sqrt()
            H, R, obs = at * torch.eye(64, dtype=torch.float64), st**2 * torch.eye(64, dtype=torch.float64), \
                z[i].double().reshape(64)
            if low_res is not None and float(low_res_mask[i]) > 0:
                aa = torch.sigmoid(lam_a[i]).sqrt()
                sa2 = torch.sigmoid(-lam_a[i]) if torch.isfinite(lam_a[i]) else torch.tensor(0.0).double()
                H = torch.cat([H, aa * self.A])
                R = torch.block_diag(R, sa2 * torch.eye(16, dtype=torch.float64))
                obs = torch.cat([obs, low_res[i].double().reshape(16)])
            gain = self.S @ H.T @ torch.linalg.inv(H @ self.S @ H.T + R)
            xs.append((gain @ obs).reshape(1, 8, 8))
        x = torch.stack(xs).to(z.dtype)
        return to_output("x", x, z=z, logsnr=lam_t.to(z.dtype))


def test_augmentation_level_moves_samples_monotonically_away_from_the_low_res_input():
    toy = ExactGaussianSR()
    g = torch.Generator().manual_seed(6)
    x_true = (torch.linalg.cholesky(toy.S) @ torch.randn(64, 48, generator=g, dtype=torch.float64)).T
    low = downsample(x_true.reshape(48, 1, 8, 8).float(), 4)
    cfg = SampleConfig(sampler="dpmpp_2m", steps=12, num=48, seed=1)
    dist, dist_up = [], []
    for level in (None, 6.0, 3.0, 0.0, -3.0):
        x = sample_sr(toy, CosineSchedule(), low, cfg, aug_logsnr=level)
        dist.append(float((downsample(x, 4) - low).pow(2).mean()))
        dist_up.append(float((x - upsample(low, (8, 8))).pow(2).mean()))
    assert dist[0] < 1e-3  # without augmentation the samples reproduce the low-res input
    assert all(a < b for a, b in zip(dist, dist[1:])), dist
    assert all(a < b for a, b in zip(dist_up, dist_up[1:])), dist_up
    assert dist[-1] > 20 * dist[1]


def test_denoiser_output_views_are_the_first_channels():
    model = tiny_sr()
    z, lam, low = torch.randn(2, 1, 8, 8), torch.tensor([0.5, -1.0]), torch.randn(2, 1, 4, 4)
    out = model(z, lam, low_res=low, aug_logsnr=2.0)
    assert isinstance(out, DenoiserOutput) and out.x.shape == out.eps.shape == out.v.shape == (2, 1, 8, 8)
    ref = to_output("v", out.v, z=z, logsnr=lam)
    torch.testing.assert_close(ref.x, out.x) and torch.testing.assert_close(ref.eps, out.eps)
    with pytest.raises(ValueError, match="low_res must be"):
        model(z, lam, low_res=torch.randn(2, 1, 3, 3))


def test_shipped_sr_config_parses_and_trains_through_the_trainer(tmp_path):
    from simdiff.train.checkpoint import export_inference

    cfg, sr = load_sr_config(CONFIGS / "mnist_sr.yaml")
    assert sr.low_res_size == 14 and cfg.model.parameterisation == "v" and cfg.data.name == "mnist"
    cfg, sr = load_sr_config(CONFIGS / "mnist_sr.yaml", [
        "data.name=digits", "data.split=train", "data.limit=16", "sr.low_res_size=4", "train.steps=2",
        "train.batch_size=4", "train.checkpoint_every=0", "train.progress=false", "train.log_every=1",
        "sample.steps=2", "model.options.channels=[8,16]"])
    summary = train_sr(cfg, sr, tmp_path / "run")
    assert summary["step"] == 2 and summary["nonfinite_total"] == 0
    loaded = load_sr(tmp_path / "run")
    assert loaded.image_shape == (1, 8, 8) and loaded.model.low_res_shape == (1, 4, 4) and loaded.sr == sr
    export_inference(tmp_path / "run", tmp_path / "sr.safetensors")
    again = load_sr(tmp_path / "sr.safetensors")
    low = torch.rand(3, 1, 4, 4) * 2 - 1
    scfg = SampleConfig(steps=3, num=3)
    a = sample_sr(loaded.model, loaded.schedule, low, scfg, aug_logsnr=2.0)
    assert a.shape == (3, 1, 8, 8)
    assert torch.equal(a, sample_sr(again.model, again.schedule, low, scfg, aug_logsnr=2.0))
    with pytest.raises(ConfigError, match="sr.aug_min"):
        load_sr_config(CONFIGS / "mnist_sr.yaml", ["sr.aug_min=9"])
    with pytest.raises(ConfigError, match="sr:"):
        load_sr_config({"name": "x"})
    with pytest.raises(ConfigError, match="low_res_size"):
        build_sr_network(cfg, SRConfig(low_res_size=8), image_shape=(1, 8, 8), num_classes=0)
