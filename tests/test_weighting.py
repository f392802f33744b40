import math

import pytest
import torch

from simdiff.configuration import ConfigError
from simdiff.process import add_noise, to_output
from simdiff.weighting import WEIGHTINGS, get_weighting, sigmoid_bias_for_resolution

F64 = torch.float64


def _losses(kind: str, seed: int = 0):
    """x, eps, v MSE of one prediction (from a ``kind`` head) against the truth, per example, plus logsnr."""
    g = torch.Generator().manual_seed(seed)
    b = 64
    x = torch.randn(b, 1, 3, 3, generator=g, dtype=F64)
    eps = torch.randn(b, 1, 3, 3, generator=g, dtype=F64)
    logsnr = torch.linspace(-12, 12, b, dtype=F64)
    z = add_noise(x, eps, logsnr=logsnr)
    true = to_output("x", x, z=z, logsnr=logsnr)
    pred = to_output(kind, true.get(kind) + 0.3 * torch.randn(b, 1, 3, 3, generator=g, dtype=F64), z=z, logsnr=logsnr)
    mse = {k: (true.get(k) - pred.get(k)).pow(2).mean(dim=(1, 2, 3)) for k in ("x", "eps", "v")}
    return mse, logsnr


@pytest.mark.parametrize("kind", ["x", "eps", "v"])
def test_loss_space_identities(kind):
    mse, lam = _losses(kind)
    torch.testing.assert_close(get_weighting("eps")(lam) * mse["x"], mse["eps"], rtol=1e-10, atol=0)
    torch.testing.assert_close(get_weighting("v")(lam) * mse["x"], mse["v"], rtol=1e-10, atol=0)
    torch.testing.assert_close(get_weighting("x")(lam) * mse["x"], mse["x"], rtol=0, atol=0)
    snr = lam.exp()
    torch.testing.assert_close(get_weighting("snr_trunc")(lam), torch.maximum(snr, torch.ones_like(snr)))


def test_min_snr_matches_hang_et_al_eps_and_v_forms():
    mse, lam = _losses("v", seed=1)
    snr, gamma = lam.exp(), 3.0
    w = get_weighting("min_snr", gamma=gamma)(lam) * mse["x"]
    torch.testing.assert_close(w, torch.clamp(snr, max=gamma) / snr * mse["eps"], rtol=1e-10, atol=0)
    torch.testing.assert_close(w, torch.clamp(snr, max=gamma) / (snr + 1) * mse["v"], rtol=1e-10, atol=0)
    assert get_weighting("min_snr").params == {} and float(get_weighting("min_snr")(torch.tensor([50.0]))) == 5.0


def test_edm_weight_is_karras_lambda_of_sigma():
    lam = torch.linspace(-10, 10, 21, dtype=F64)
    sigma, sd = torch.exp(-lam / 2), 0.5
    karras = (sigma**2 + sd**2) / (sigma * sd) ** 2
    torch.testing.assert_close(get_weighting("edm")(lam), karras, rtol=1e-12, atol=0)
    torch.testing.assert_close(get_weighting("edm", sigma_data=1.0)(lam), get_weighting("v")(lam), rtol=1e-12, atol=0)


@pytest.mark.parametrize("bias", [-3.0, 0.0, 2.0])
def test_sigmoid_is_kingma_gao_eps_weight(bias):
    mse, lam = _losses("eps", seed=2)
    w = get_weighting("sigmoid", bias=bias)
    torch.testing.assert_close(w(lam) * mse["x"], torch.sigmoid(bias - lam) * mse["eps"], rtol=1e-10, atol=0)


def test_sigmoid_limits_and_stability():
    b = 1.5
    w = get_weighting("sigmoid", bias=b)
    hi, lo = torch.tensor([b + 40.0], dtype=F64), torch.tensor([b - 40.0], dtype=F64)
    torch.testing.assert_close(w(hi), torch.tensor([math.exp(b)], dtype=F64), rtol=1e-15, atol=0)
    torch.testing.assert_close(w(lo), lo.exp(), rtol=1e-15, atol=0)
    # no inf * 0 or overflow for extreme bias / log-SNR, float32 included
    ext = torch.tensor([-1e4, -50.0, 0.0, 50.0, 1e4])
    for bias in (-60.0, 60.0):
        out = get_weighting("sigmoid", bias=bias)(ext)
        assert out.dtype == torch.float32 and torch.isfinite(out).all() and (out >= 0).all()
    assert get_weighting("sigmoid")(torch.tensor([0.0], dtype=F64)).dtype == F64


def test_default_sigmoid_bias_is_two():
    lam = torch.linspace(-5, 5, 11, dtype=F64)
    torch.testing.assert_close(get_weighting("sigmoid")(lam), get_weighting("sigmoid", bias=2.0)(lam))


def test_bias_shift_rule():
    assert sigmoid_bias_for_resolution(2.0, ref_size=64, image_size=256) == pytest.approx(2.0 - 2 * math.log(4))
    assert sigmoid_bias_for_resolution(0.0, ref_size=32, image_size=16) == pytest.approx(2 * math.log(2))
    assert sigmoid_bias_for_resolution(1.0, ref_size=28, image_size=28) == 1.0
    lam = torch.linspace(-8, 8, 9, dtype=F64)
    shifted = get_weighting("sigmoid", bias=2.0, ref_size=64, image_size=512)(lam)
    expect = get_weighting("sigmoid", bias=2.0 + 2 * math.log(64 / 512))(lam)
    torch.testing.assert_close(shifted, expect, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="both ref_size and image_size"):
        get_weighting("sigmoid", ref_size=64)
    with pytest.raises(ValueError, match="must be > 0"):
        sigmoid_bias_for_resolution(0.0, ref_size=0, image_size=8)


def test_errors_and_serialisation():
    valid = "edm, eps, min_snr, sigmoid, snr_trunc, v, x"
    with pytest.raises(ConfigError, match=f"unknown weighting 'snr'; valid: {valid}"):
        get_weighting("snr")
    with pytest.raises(ConfigError, match="unknown parameter 'b' for weighting 'sigmoid'; valid: bias, ref_size"):
        get_weighting("sigmoid", b=1.0)
    with pytest.raises(ConfigError, match="valid: \\(none\\)"):
        get_weighting("v", gamma=1.0)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        get_weighting("min_snr", gamma=-1.0)
    for name in WEIGHTINGS:
        w = get_weighting(name)
        assert w.name == name
        w2 = get_weighting(**w.to_dict())
        assert w2 == w and hash(w2) == hash(w)
    d = get_weighting("min_snr", gamma=2.0).to_dict()
    assert d == {"name": "min_snr", "gamma": 2.0}
