"""Tests for simdiff.nets: backbones, the denoiser wrapper, attention, the 5/3 wavelet and config errors."""

from __future__ import annotations

import math

import pytest
import torch

from simdiff import process
from simdiff.configuration import ConfigError
from simdiff.nets import BACKBONES, DiffusionModel, build_backbone, build_model, count_parameters, dwt53, idwt53
from simdiff.nets.layers import Attention, TransformerBlock
from simdiff.nets.wavelets import dwt53_1d

#: the image backbones (``video_uvit`` takes frame windows, ``token_transformer`` tokens: tested with their processes)
IMAGE_ARCHES = ("residual_uvit", "unet", "uvit")

TINY = {
    "unet": {"channels": [8, 16], "num_res_blocks": 1, "attention_levels": [1], "num_heads": 2},
    "uvit": {"channels": [8], "num_res_blocks": 1, "dim": 16, "depth": 2, "num_heads": 2},
    "residual_uvit": {"channels": [8, 8], "num_res_blocks": 1, "dim": 16, "depth": 2, "num_heads": 2},
}
UVIT_VARIANTS = [
    {"input_transform": "patch", "patch_size": 2},
    {"input_transform": "wavelet", "wavelet_levels": 1},
    {"parallel_block": True, "conditioning": "additive", "pos_emb": "learned", "qk_norm": "layer"},
]
SHAPES = [(1, 28), (1, 32), (3, 16)]


def _build(arch, c=1, size=16, num_classes=10, **extra):
    torch.manual_seed(0)
    return build_backbone(arch, {**TINY[arch], **extra}, image_channels=c, image_size=size, num_classes=num_classes)


def _perturb_zeros(model):
    """Give every all-zero parameter (zero-initialised outputs, adaLN gates, biases) small random values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("arch", IMAGE_ARCHES)
@pytest.mark.parametrize("c,size", SHAPES)
def test_output_shape_conditional_and_unconditional(arch, c, size):
    net = _perturb_zeros(_build(arch, c, size))
    z = torch.randn(2, c, size, size)
    logsnr = torch.tensor([-3.0, 4.0])
    out_u = net(z, logsnr)
    out_c = net(z, logsnr, labels=torch.tensor([0, 7]))
    assert out_u.shape == z.shape and out_c.shape == z.shape
    assert torch.isfinite(out_c).all() and not torch.allclose(out_u, out_c)


@pytest.mark.parametrize("variant", UVIT_VARIANTS)
@pytest.mark.parametrize("arch", ["uvit", "residual_uvit"])
@pytest.mark.parametrize("c,size", [(1, 28), (3, 16)])
def test_uvit_variants_shapes(arch, variant, c, size):
    net = _build(arch, c, size, **variant)
    z = torch.randn(2, c, size, size)
    assert net(z, torch.zeros(2), labels=torch.tensor([1, 2])).shape == z.shape


def test_unet_pads_non_power_of_two_sizes():
    net = _perturb_zeros(_build("unet", 1, 28, channels=[4, 4, 8, 8], attention_levels=[3]))  # 28 -> pad 32
    z = torch.randn(2, 1, 28, 28)
    assert net(z, torch.zeros(2)).shape == z.shape


def test_fresh_models_predict_zero():
    for arch in IMAGE_ARCHES:
        net = _build(arch, 1, 16)
        assert net(torch.randn(2, 1, 16, 16), torch.zeros(2)).abs().max() == 0, arch


@pytest.mark.parametrize("arch", IMAGE_ARCHES)
def test_context_tokens_and_mask(arch):
    net = _perturb_zeros(_build(arch, 1, 16, context_dim=6))
    z, logsnr = torch.randn(2, 1, 16, 16), torch.zeros(2)
    ctx = torch.randn(2, 5, 6)
    mask = torch.tensor([[True, True, False, False, False], [True, False, True, False, False]])
    base = net(z, logsnr, context=ctx, context_mask=mask)
    assert base.shape == z.shape
    assert not torch.allclose(base, net(z, logsnr))  # the context changes the prediction
    ctx2 = ctx.clone()
    ctx2[~mask] = 100.0  # masked-out tokens must not matter
    torch.testing.assert_close(net(z, logsnr, context=ctx2, context_mask=mask), base)
    empty = net(z, logsnr, context=ctx, context_mask=torch.zeros(2, 5, dtype=torch.bool))  # only the null token
    assert torch.isfinite(empty).all()
    with pytest.raises(ValueError, match="context_mask of shape"):
        net(z, logsnr, context=ctx, context_mask=mask[:, :3])


def test_context_without_cross_attention_is_an_error():
    with pytest.raises(ValueError, match="context_dim=0"):
        _build("uvit")(torch.randn(2, 1, 16, 16), torch.zeros(2), context=torch.randn(2, 3, 4))


@pytest.mark.parametrize(
    "arch,extra",
    [("unet", {}), ("uvit", {}), ("residual_uvit", {})]
    + [("uvit", v) for v in UVIT_VARIANTS]
    + [("residual_uvit", UVIT_VARIANTS[2])],
)
def test_gradients_reach_every_parameter(arch, extra):
    net = _perturb_zeros(_build(arch, 1, 16, context_dim=6, **extra))
    z = torch.randn(2, 1, 16, 16)
    out = net(z, torch.tensor([-2.0, 3.0]), labels=torch.tensor([3, 10]), context=torch.randn(2, 4, 6))
    out.square().sum().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


@pytest.mark.parametrize("arch", IMAGE_ARCHES)
def test_null_label_when_labels_none(arch):
    net = _perturb_zeros(_build(arch, 1, 16, num_classes=10))
    z, logsnr = torch.randn(2, 1, 16, 16), torch.tensor([0.5, -1.0])
    torch.testing.assert_close(net(z, logsnr), net(z, logsnr, labels=torch.full((2,), 10)))
    assert not torch.allclose(net(z, logsnr), net(z, logsnr, labels=torch.zeros(2, dtype=torch.long)))


def test_logsnr_scalar_batch_and_bad_shape():
    net = _perturb_zeros(_build("uvit"))
    z = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(net(z, torch.tensor(1.5)), net(z, torch.full((3,), 1.5)))
    assert torch.isfinite(net(z, torch.tensor([math.inf, -math.inf, 0.0]))).all()
    with pytest.raises(ValueError, match=r"\(2,\).*\(3, 1, 16, 16\)"):
        net(z, torch.zeros(2))


@pytest.mark.parametrize("kind", ["eps", "x", "v"])
def test_diffusion_model_views_consistent(kind):
    backbone = _perturb_zeros(_build("uvit")).double()
    model = DiffusionModel(backbone, kind)
    z = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    logsnr = torch.tensor([-4.0, 2.5], dtype=torch.float64)
    out = model(z, logsnr)
    torch.testing.assert_close(out.get(kind), backbone(z, logsnr).double())
    torch.testing.assert_close(process.x_from_eps(z=z, eps=out.eps, logsnr=logsnr), out.x)
    torch.testing.assert_close(process.v_from_x_eps(x=out.x, eps=out.eps, logsnr=logsnr), out.v)
    torch.testing.assert_close(process.x_from_v(z=z, v=out.v, logsnr=logsnr), out.x)
    assert model.num_classes == 10 and model.image_shape == (1, 16, 16)


def test_diffusion_model_autocast_returns_input_dtype():
    model = build_model("unet", "v", TINY["unet"], image_channels=1, image_size=16, num_classes=0,
                        autocast_dtype=torch.bfloat16)
    _perturb_zeros(model)
    z = torch.randn(2, 1, 16, 16)
    out = model(z, torch.zeros(2))
    assert out.x.dtype == z.dtype and out.v.dtype == z.dtype and torch.isfinite(out.eps).all()


@pytest.mark.parametrize("qk_norm", ["none", "rms"])
def test_attention_matches_explicit_softmax(qk_norm):
    torch.manual_seed(0)
    dim, heads, b, n, m = 12, 3, 2, 5, 4
    attn = _perturb_zeros(Attention(dim, heads, qk_norm=qk_norm)).double()
    cross = _perturb_zeros(Attention(dim, heads, context_width=7, qk_norm=qk_norm)).double()
    x = torch.randn(b, n, dim, dtype=torch.float64)
    ctx = torch.randn(b, m, 7, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True], [True, True, False, False]])

    def explicit(mod, q, k, v, mask=None):
        d = dim // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        q, k = mod.q_norm(q), mod.k_norm(k)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d)
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :], -math.inf)
        o = torch.softmax(logits, dim=-1) @ v
        return mod.proj(o.transpose(1, 2).reshape(b, -1, dim))

    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    torch.testing.assert_close(attn(x), explicit(attn, q, k, v), rtol=1e-12, atol=1e-12)
    k, v = cross.kv(ctx).chunk(2, dim=-1)
    got = cross(x, ctx, mask[:, None, None, :])
    torch.testing.assert_close(got, explicit(cross, cross.q(x), k, v, mask), rtol=1e-12, atol=1e-12)


def test_parallel_block_is_sum_of_branches():
    torch.manual_seed(0)
    blk = _perturb_zeros(TransformerBlock(8, 2, 4, parallel=True, conditioning="additive")).double()
    x, emb = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    got = blk(x, emb)
    x1 = x + blk.mod(emb)[:, None]
    h = blk.norm1(x1)
    q, k, v, m = blk.in_proj(h).split([8, 8, 8, blk.hidden], dim=-1)
    a = torch.softmax((q.view(2, 3, 2, 4).transpose(1, 2) @ k.view(2, 3, 2, 4).permute(0, 2, 3, 1)) / 2.0, -1)
    a = (a @ v.view(2, 3, 2, 4).transpose(1, 2)).transpose(1, 2).reshape(2, 3, 8)
    want = x1 + blk.attn_out(a) + blk.mlp_out(torch.nn.functional.gelu(m, approximate="tanh"))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("levels,h,w", [(1, 2, 2), (1, 6, 10), (2, 16, 12), (3, 24, 8)])
def test_wavelet_perfect_reconstruction(levels, h, w):
    x = torch.randn(2, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(levels))
    y = dwt53(x, levels)
    assert y.shape == (2, 3 * 4**levels, h // 2**levels, w // 2**levels)
    torch.testing.assert_close(idwt53(y, levels), x, rtol=0, atol=1e-12)


def test_wavelet_kills_linear_ramps_and_keeps_constants():
    r = torch.arange(12, dtype=torch.float64)
    s, d = dwt53_1d(3.0 * r - 2.0)
    torch.testing.assert_close(d[:-1], torch.zeros(5, dtype=torch.float64))  # 2 vanishing moments (interior)
    s, d = dwt53_1d(torch.full((8,), 4.0, dtype=torch.float64))
    torch.testing.assert_close(s, torch.full((4,), 4.0, dtype=torch.float64))
    torch.testing.assert_close(d, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="divisible by 4"):
        dwt53(torch.zeros(1, 1, 6, 8), 2)


def test_config_errors_are_one_line_and_list_valid_names():
    with pytest.raises(ConfigError) as e:
        build_backbone("unet", {"chanels": [8]}, image_channels=1, image_size=8, num_classes=0)
    msg = str(e.value)
    assert "chanels" in msg and "channels" in msg and "num_res_blocks" in msg and "\n" not in msg
    with pytest.raises(ConfigError) as e:
        build_backbone("vit", {}, image_channels=1, image_size=8, num_classes=0)
    assert ", ".join(sorted(BACKBONES)) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="eps, x, v"):
        build_model("unet", "score", {}, image_channels=1, image_size=8, num_classes=0)
    with pytest.raises(ConfigError, match="input_transform"):
        build_backbone("uvit", {"input_transform": "dct"}, image_channels=1, image_size=8, num_classes=0)


def test_residual_uvit_has_no_concat_skips():
    plain, resid = _build("uvit", channels=[8, 8]), _build("residual_uvit", channels=[8, 8])
    assert all(b.conv1.in_channels == 2 * b.conv1.out_channels for s in plain.up_blocks for b in s)
    assert all(b.conv1.in_channels == b.conv1.out_channels for s in resid.up_blocks for b in s)
    assert count_parameters(resid) < count_parameters(plain)


def _uvit_parameter_count(opts, *, c, size, num_classes):
    """Parameter count of a U-ViT / residual U-ViT without cross-attention, from the architecture's formula
    (conv ``k^2 c_in c_out + c_out``, linear ``n_in n_out + n_out``, norms 2 per channel), not from the module."""
    ch, d, e = list(opts["channels"]), opts["dim"], opts.get("emb_dim") or opts["dim"]
    nrb, depth, heads = opts["num_res_blocks"], opts["depth"], opts["num_heads"]
    hidden, adaln = int(d * opts.get("mlp_ratio", 4.0)), opts.get("conditioning", "adaln") == "adaln"
    qk = 0 if opts.get("qk_norm", "rms") == "none" else 2 * (d // heads)  # q and k gains over the head dimension

    def conv(k, i, o):
        return k * k * i * o + o

    def lin(i, o):
        return i * o + o

    def resblock(i, o):
        return 2 * i + conv(3, i, o) + lin(e, 2 * o) + 2 * o + conv(3, o, o) + (0 if i == o else conv(1, i, o))

    n = lin(128, e) + lin(e, e) + (num_classes + 1) * e  # log-SNR Fourier features (64 sin + 64 cos) MLP, labels
    c0 = ch[0] if ch else d
    transform = opts.get("input_transform", "none")
    if transform == "patch":
        p = opts["patch_size"]
        n += conv(p, c, c0) + conv(p, c0, c)
        factor = p
    else:
        levels = opts.get("wavelet_levels", 1) if transform == "wavelet" else 0
        n += conv(3, c * 4**levels, c0) + conv(3, c0, c * 4**levels)
        factor = 2**levels
    n += 2 * c0  # GroupNorm before the head
    widths = [*ch, d]
    for i, w in enumerate(ch):
        c_up = w if opts.get("residual") else 2 * w
        n += nrb * resblock(w, w) + conv(2, w, widths[i + 1]) + conv(2, widths[i + 1], w) + nrb * resblock(c_up, w)
    grid = -(-size // (factor * 2 ** len(ch)))
    if opts.get("pos_emb") == "learned":
        n += grid * grid * d
    norms = 0 if adaln else 2 * d
    if opts.get("parallel_block"):
        block = norms + lin(d, 3 * d + hidden) + lin(d, d) + lin(hidden, d) + qk + lin(e, 4 * d if adaln else d)
    else:
        block = (2 * norms + lin(d, 3 * d) + qk + lin(d, d) + lin(d, hidden) + lin(hidden, d)
                 + lin(e, 6 * d if adaln else d))
    return n + depth * block


COUNT_CASES = [
    ("uvit", {"channels": [8, 16], "num_res_blocks": 2, "dim": 32, "depth": 2, "num_heads": 4}, 1, 16),
    ("residual_uvit", {"channels": [8, 16], "num_res_blocks": 1, "dim": 32, "depth": 3, "num_heads": 2,
                       "emb_dim": 24, "residual": True}, 3, 16),
    ("uvit", {"channels": [8], "num_res_blocks": 1, "dim": 16, "depth": 2, "num_heads": 2,
              "input_transform": "patch", "patch_size": 2, "parallel_block": True, "conditioning": "additive",
              "pos_emb": "learned", "qk_norm": "none", "mlp_ratio": 2.0}, 1, 28),
    ("uvit", {"channels": [], "num_res_blocks": 1, "dim": 16, "depth": 1, "num_heads": 2,
              "input_transform": "wavelet", "wavelet_levels": 2, "qk_norm": "layer"}, 3, 16),
]


@pytest.mark.parametrize("arch,opts,c,size", COUNT_CASES)
def test_count_parameters_matches_the_architecture_formula(arch, opts, c, size):
    net = build_backbone(arch, {k: v for k, v in opts.items() if k != "residual"}, image_channels=c,
                         image_size=size, num_classes=10)
    want = _uvit_parameter_count(opts, c=c, size=size, num_classes=10)
    assert count_parameters(net) == want
    assert count_parameters(net, trainable_only=False) == want
    frozen = sum(p.numel() for p in net.cond.parameters())
    for p in net.cond.parameters():  # freeze the conditioning embedding
        p.requires_grad_(False)
    assert count_parameters(net) == want - frozen and frozen > 0
    assert count_parameters(net, trainable_only=False) == want


def test_count_parameters_counts_a_shared_tensor_once():
    lin, twin = torch.nn.Linear(5, 7), torch.nn.Linear(5, 7)
    twin.weight = lin.weight  # a tied weight: one tensor reached through two modules
    model = torch.nn.Sequential(lin, twin, lin)  # and the same module twice
    assert sum(v.numel() for v in model.state_dict().values()) == 3 * (35 + 7)  # state_dict repeats shared tensors
    assert count_parameters(model) == 35 + 7 + 7  # lin.weight, lin.bias, twin.bias
    twin.bias.requires_grad_(False)
    assert count_parameters(model) == 42 and count_parameters(model, trainable_only=False) == 49


@pytest.mark.parametrize("arch", ["unet", "uvit", "residual_uvit"])
def test_module_conversions_work(arch):
    """``.to()`` / ``.double()`` go through nn.Module._apply: no backbone may shadow it."""
    m = build_model(arch, "v", {}, image_channels=1, image_size=8, num_classes=0).to(torch.float64)
    out = m(torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    assert out.x.dtype == torch.float64 and next(m.parameters()).dtype == torch.float64


def test_class_embedding_is_not_drowned_by_the_logsnr_embedding():
    """Class rows start at a scale comparable to the log-SNR embedding they are added to (rows at std 0.02 were ~7x
    smaller and a short run learned to ignore the label); an unconditional model's null row stays small."""
    from simdiff.nets.conditioning import ConditionEmbedding

    torch.manual_seed(0)
    emb = ConditionEmbedding(128, 10)
    logsnr_norm = emb.logsnr(torch.linspace(-15, 15, 64)).norm(dim=-1).mean()
    class_norm = emb.label.weight[:10].norm(dim=-1).mean()
    assert class_norm >= 0.3 * logsnr_norm, (float(class_norm), float(logsnr_norm))
    assert ConditionEmbedding(128, 0).label.weight.norm() < 0.5
