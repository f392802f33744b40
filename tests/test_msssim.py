"""MS-SSIM / SSIM / PSNR: closed forms, invariants and agreement with reference implementations."""

import math

import numpy as np
import pytest
import torch

from simdiff.compress.metrics import MS_SSIM_WEIGHTS, ms_ssim, psnr, ssim
from simdiff.data.photos import load_photo


def _photo_pair(seed: int = 0, noise: float = 20.0):
    img = torch.from_numpy(load_photo("china")).permute(2, 0, 1)[None].double()  # [1, 3, 427, 640]
    g = torch.Generator().manual_seed(seed)
    return img, (img + noise * torch.randn(img.shape, generator=g, dtype=torch.float64)).clamp(0, 255)


def test_identical_is_one_and_noise_decreases():
    x, _ = _photo_pair()
    assert ms_ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)
    values = [ms_ssim(x, _photo_pair(1, s)[1]).item() for s in (2.0, 8.0, 32.0)]
    assert 1.0 > values[0] > values[1] > values[2] > 0.0


def test_constant_images_closed_form():
    # constant images: every contrast-structure term is (0 + C2) / (0 + C2) = 1, so MS-SSIM is the luminance term of
    # the coarsest scale raised to its exponent: ((2ab + C1) / (a^2 + b^2 + C1)) ^ 0.1333
    a, b = 100.0, 140.0
    x, y = torch.full((1, 1, 176, 176), a), torch.full((1, 1, 176, 176), b)
    c1 = (0.01 * 255) ** 2
    expected = ((2 * a * b + c1) / (a * a + b * b + c1)) ** MS_SSIM_WEIGHTS[-1]
    assert ms_ssim(x, y, weights=MS_SSIM_WEIGHTS).item() == pytest.approx(expected, rel=1e-12)


def test_against_pytorch_msssim_and_skimage():
    x, y = _photo_pair()
    x, y = x[..., :256, :384], y[..., :256, :384]
    # reference values computed with pytorch_msssim 1.0.0 (ms_ssim / ssim, data_range=255) on this exact pair
    pm = pytest.importorskip("pytorch_msssim")
    assert ms_ssim(x, y).item() == pytest.approx(pm.ms_ssim(x.float(), y.float(), data_range=255).item(), abs=2e-5)
    assert ssim(x, y).item() == pytest.approx(pm.ssim(x.float(), y.float(), data_range=255).item(), abs=2e-5)
    metrics = pytest.importorskip("skimage.metrics")
    ref = metrics.structural_similarity(
        x[0].permute(1, 2, 0).numpy(), y[0].permute(1, 2, 0).numpy(), data_range=255, gaussian_weights=True,
        sigma=1.5, use_sample_covariance=False, channel_axis=2)
    assert ssim(x, y).item() == pytest.approx(ref, abs=1e-9)


def test_small_patches_need_fewer_scales():
    x = torch.rand(2, 3, 64, 64) * 255
    with pytest.raises(ValueError, match="needs sides >= 161"):
        ms_ssim(x, x)
    assert torch.allclose(ms_ssim(x, x, scales=3), torch.ones(2, dtype=torch.float64))


def test_psnr_closed_form():
    x = torch.zeros(1, 3, 8, 8)
    y = x + 5.0  # MSE 25
    assert psnr(x, y).item() == pytest.approx(10 * math.log10(255**2 / 25), rel=1e-12)
    assert psnr(x, x).item() == math.inf
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, y[..., :4])
    assert np.isfinite(ssim(x, y, win_size=7).item())
