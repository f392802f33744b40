"""Quantisers against their closed forms, and the quantised layers' kernels against each other."""

import pytest
import torch

from simdiff.quant.modules import QuantAttention, QuantLayer
from simdiff.quant.quantizers import (
    RangeObserver,
    act_qparams,
    dequantize_groupwise,
    dequantize_per_channel,
    fake_quant_act,
    pack_int4,
    quantize_groupwise,
    quantize_per_channel,
    unpack_int4,
)


def test_int8_per_channel_matches_closed_form():
    gen = torch.Generator().manual_seed(0)
    gains = torch.logspace(-3, 1, 16, dtype=torch.float64)[:, None, None, None]
    w = torch.randn(16, 8, 3, 3, generator=gen, dtype=torch.float64) * gains
    q, s = quantize_per_channel(w, 8)
    amax = w.reshape(16, -1).abs().amax(1)
    assert q.dtype == torch.int8 and s.dtype == torch.float64
    assert torch.equal(s, amax / 127)  # closed form s_o = max|w_o| / 127
    assert torch.all(q.reshape(16, -1).abs().amax(1) == 127)  # each channel's largest weight maps to +-127
    err = (dequantize_per_channel(q, s) - w).reshape(16, -1).abs().amax(1)
    assert torch.all(err <= s / 2 * (1 + 1e-12)), (err / s).max()  # round-to-nearest, nothing clipped
    assert (err / s).max() > 0.4  # ... and the bound is nearly reached (a real rounding, not a lossless copy)
    q0, s0 = quantize_per_channel(torch.zeros(3, 4), 8)  # an all-zero channel: scale 1, codes 0
    assert torch.equal(s0, torch.ones(3)) and not q0.any()


def test_int4_groupwise_matches_closed_form_and_packs():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 5, 3, 3, generator=gen, dtype=torch.float64)  # fan-in 45: two full groups of 16, one padded
    q, s = quantize_groupwise(w, 4, group_size=16)
    assert q.shape == (6, 48) and s.shape == (6, 3)
    padded = torch.nn.functional.pad(w.reshape(6, 45), (0, 3)).reshape(6, 3, 16)
    assert torch.allclose(s, padded.abs().amax(2) / 7, rtol=0, atol=0)
    assert int(q.abs().max()) == 7
    err = (dequantize_groupwise(q, s, tuple(w.shape)) - w).reshape(6, 45)
    bound = s.repeat_interleave(16, dim=1)[:, :45] / 2
    assert torch.all(err.abs() <= bound * (1 + 1e-12))
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # every int4 value, both nibbles
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16) and torch.equal(unpack_int4(packed), codes)
    with pytest.raises(ValueError, match="even number"):
        pack_int4(codes[:, :3])


def test_activation_fake_quant_and_ranges():
    scale, zp = act_qparams(-1.0, 3.0, 8)
    assert scale == pytest.approx(4 / 255) and zp == round(1 / scale)
    x = torch.linspace(-1, 3, 1001, dtype=torch.float64)
    err = fake_quant_act(x, scale, zp) - x
    assert err.abs().max() <= scale / 2 + 1e-12
    assert fake_quant_act(torch.zeros(1, dtype=torch.float64), scale, zp).item() == 0.0  # 0 is exact
    assert fake_quant_act(torch.tensor([10.0, -10.0]), scale, zp).tolist() == pytest.approx([3.0, -1.0], abs=scale)
    assert act_qparams(0.5, 2.0) == act_qparams(0.0, 2.0)  # the range is widened to contain 0
    gen = torch.Generator().manual_seed(2)
    data = torch.randn(20000, generator=gen)
    data[0] = 40.0  # one outlier
    ranges = {}
    for method in ("minmax", "percentile", "mse"):
        obs = RangeObserver(method, percentile=99.9)
        for chunk in data.split(5000):
            obs.update(chunk)
        ranges[method] = obs.range()
    assert ranges["minmax"] == (pytest.approx(float(data.min())), 40.0)
    assert 2.5 < ranges["percentile"][1] < 4.0  # the 99.9th percentile of N(0, 1) is 3.09
    assert ranges["mse"][1] < 40.0  # MSE search clips the outlier
    with pytest.raises(ValueError, match="saw no data"):
        RangeObserver().range()


@pytest.mark.parametrize("cls", [torch.nn.Conv2d, torch.nn.ConvTranspose2d])
def test_conv_weights_are_quantised_per_output_channel(cls):
    torch.manual_seed(0)
    conv = cls(6, 4, 3, padding=1).requires_grad_(False)
    with torch.no_grad():  # output channels of very different magnitude
        (conv.weight[:, 0] if cls is torch.nn.ConvTranspose2d else conv.weight[0]).mul_(100)
    q = QuantLayer(conv, weight_bits=8, group_size=32, act="none", split=None, int8_kernel=True)
    w_oi = conv.weight.transpose(0, 1) if cls is torch.nn.ConvTranspose2d else conv.weight
    step = w_oi.reshape(w_oi.shape[0], -1).abs().amax(1) / 127
    err = (q._weight - conv.weight).abs()
    err_oi = err.transpose(0, 1) if cls is torch.nn.ConvTranspose2d else err
    assert torch.all(err_oi.reshape(4, -1).amax(1) <= step / 2 * (1 + 1e-5))
    x = torch.randn(2, 6, 5, 5)
    assert torch.allclose(q(x), conv(x), atol=float(step.max()) * 6 * 9)
    assert not q.int8_kernel  # the int8 GEMM is for Linear layers only


def _calibrated_linear(split):
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40)
    q = QuantLayer(lin, weight_bits=8, group_size=32, act="int8", split=split, int8_kernel=True)
    x = torch.randn(3, 7, 48) * 2 + 0.5
    x[..., :16] *= 10  # the first branch has a ten times wider range
    for a in q.acts:
        a.start_observing("minmax", 99.9)
    q(x)
    for a in q.acts:
        a.freeze()
    return lin, q, x


def test_int8_gemm_equals_fake_quantisation_and_split_helps():
    lin, q, x = _calibrated_linear([16, 32])
    assert q.int8_kernel
    y_int = q(x)
    q.int8_kernel = False
    y_fake = q(x)
    assert torch.allclose(y_int, y_fake, rtol=0, atol=1e-5 * float(y_fake.abs().max()))  # same integer sums
    with torch.no_grad():
        ref = lin(x)
    err_split = float((y_fake - ref).norm() / ref.norm())
    _, q1, _ = _calibrated_linear(None)
    err_one = float((q1(x) - ref).norm() / ref.norm())
    assert err_split < 0.7 * err_one, (err_split, err_one)  # separate ranges quantise the narrow branch finer
    assert set(q.state_dict()) == {"bias", "qweight_0", "wscale_0", "qweight_1", "wscale_1", "acts.0.scale",
                                   "acts.0.zero_point", "acts.1.scale", "acts.1.zero_point"}


def test_quant_attention_matches_float_attention_when_unquantised():
    from simdiff.nets.layers import Attention

    torch.manual_seed(0)
    attn = Attention(16, 2, qk_norm="rms", zero_out=False)
    x = torch.randn(2, 9, 16)
    qa = QuantAttention(attn, "none")  # SDPA path
    with torch.no_grad():
        ref = attn(x)
        assert torch.allclose(qa(x), ref, atol=1e-6)
        qi = QuantAttention(attn, "int8")  # explicit softmax on fake-quantised q, k, v, p
        for a in (qi.act_q, qi.act_k, qi.act_v):
            a.start_observing("minmax", 99.9)
        qi(x)
        for a in (qi.act_q, qi.act_k, qi.act_v):
            a.freeze()
        err = float((qi(x) - ref).norm() / ref.norm())
    assert 0 < err < 0.05, err
    assert qi.act_p.scale.item() == pytest.approx(1 / 255) and qi.act_p.zero_point.item() == 0
