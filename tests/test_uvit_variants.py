"""U-ViT variants (patch, wavelet, parallel blocks, learned positions) and the residual U-ViT, checked numerically.

The output head and the adaLN gates are zero at initialisation, so a fresh network predicts 0 whatever its input;
every test here first perturbs those zero parameters so that the properties below could fail.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from simdiff.nets import build_backbone, build_model, dwt53, idwt53

TINY = {"channels": [8], "num_res_blocks": 1, "dim": 16, "depth": 2, "num_heads": 2}
#: name -> (arch, options on top of TINY)
VARIANTS = {
    "uvit": ("uvit", {}),
    "patch2": ("uvit", {"input_transform": "patch", "patch_size": 2}),
    "patch4": ("uvit", {"input_transform": "patch", "patch_size": 4}),
    "wavelet1": ("uvit", {"input_transform": "wavelet", "wavelet_levels": 1}),
    "wavelet2": ("uvit", {"input_transform": "wavelet", "wavelet_levels": 2}),
    "parallel_learned": ("uvit", {"parallel_block": True, "conditioning": "additive", "pos_emb": "learned",
                                  "qk_norm": "layer"}),
    "residual": ("residual_uvit", {"channels": [8, 8]}),
    "residual_parallel_learned": ("residual_uvit", {"channels": [8, 8], "parallel_block": True,
                                                     "pos_emb": "learned"}),
    "residual_wavelet": ("residual_uvit", {"input_transform": "wavelet", "wavelet_levels": 1}),
}


def _perturb_zeros(model, *, seed=1, skip=()):
    """Give every all-zero parameter small random values, except those whose name starts with a prefix in skip."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.any() and not name.startswith(tuple(skip)):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _net(name, *, size=16, dtype=torch.float64, **extra):
    arch, opts = VARIANTS[name]
    torch.manual_seed(0)
    net = build_backbone(arch, {**TINY, **opts, **extra}, image_channels=1, image_size=size, num_classes=10)
    return _perturb_zeros(net).to(dtype).eval()


def _inputs(n=4, size=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(n, 1, size, size, generator=g, dtype=dtype)
    return z, torch.linspace(-5.0, 5.0, n, dtype=dtype), torch.tensor([0, 3, 7, 10, 2, 5][:n])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_batch_independence_permutation_and_determinism(name):
    """Each example's output depends on that example alone: a batch equals its examples run one by one, a permuted
    batch gives the permuted outputs, and two calls give the same bits."""
    net = _net(name)
    z, lam, labels = _inputs()
    out = net(z, lam, labels=labels)
    assert out.abs().max() > 1e-3  # the perturbation made the output non-trivial
    assert torch.equal(out, net(z, lam, labels=labels))
    single = torch.cat([net(z[i:i + 1], lam[i:i + 1], labels=labels[i:i + 1]) for i in range(len(z))])
    torch.testing.assert_close(out, single, rtol=0, atol=1e-12)
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(net(z[perm], lam[perm], labels=labels[perm]), out[perm], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_output_depends_on_logsnr_and_label_of_its_own_example(name):
    net = _net(name)
    z, lam, labels = _inputs()
    out = net(z, lam, labels=labels)
    lam2, labels2 = lam.clone(), labels.clone()
    lam2[1] += 1.0
    labels2[2] = 9
    out2 = net(z, lam2, labels=labels2)
    changed = (out2 - out).flatten(1).abs().amax(1)
    assert changed[1] > 1e-4 and changed[2] > 1e-4, changed  # the examples whose log-SNR / label changed
    assert changed[0] < 1e-12 and changed[3] < 1e-12, changed  # the others did not move


@pytest.mark.parametrize("name", ["wavelet1", "wavelet2", "residual_wavelet"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_wavelet_input_path_reconstructs_perfectly(name, dtype, tol):
    """The first layer sees the 5/3 DWT of the (zero-padded) input, which inverts back to it; the network's output is
    the inverse DWT of the head's output, cropped to the input size."""
    net = _net(name, size=28, dtype=dtype)
    levels = net.wavelet.levels
    z, lam, labels = _inputs(size=28, dtype=dtype)
    seen = {}
    net.stem.register_forward_pre_hook(lambda _m, args: seen.__setitem__("stem_in", args[0]))
    net.head.register_forward_hook(lambda _m, _a, out: seen.__setitem__("head_out", out))
    out = net(z, lam, labels=labels)
    pad = (-28) % net.multiple
    padded = F.pad(z, (0, pad, 0, pad))
    assert seen["stem_in"].shape == (4, 4**levels, (28 + pad) // 2**levels, (28 + pad) // 2**levels)
    torch.testing.assert_close(seen["stem_in"], dwt53(padded, levels), rtol=0, atol=tol)
    torch.testing.assert_close(idwt53(seen["stem_in"], levels), padded, rtol=0, atol=tol)
    torch.testing.assert_close(net.wavelet.inverse(net.wavelet(padded)), padded, rtol=0, atol=tol)
    torch.testing.assert_close(out, idwt53(seen["head_out"], levels)[..., :28, :28], rtol=0, atol=tol)


@pytest.mark.parametrize("name", ["uvit", "patch2", "patch4", "wavelet2", "residual"])
def test_zero_padding_then_crop(name):
    """A size the downsampling does not divide is zero-padded and cropped back: a 28x28 input gives the top-left of
    the output for the zero-padded 32x32 input (same token grid)."""
    net = _net(name, size=28)
    z, lam, labels = _inputs(size=28)
    pad = (-28) % net.multiple
    if name in ("patch4", "wavelet2"):
        assert pad == 4  # these variants do pad
    padded = F.pad(z, (0, pad, 0, pad))
    torch.testing.assert_close(net(z, lam, labels=labels), net(padded, lam, labels=labels)[..., :28, :28],
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["patch2", "patch4"])
def test_patch_stem_is_non_overlapping(name):
    """With patch size p the stem sees each p x p patch once: changing one pixel changes one stem output token."""
    net = _net(name)
    p = net.cfg.patch_size
    z, _, _ = _inputs()
    z2 = z.clone()
    z2[0, 0, 5, 9] += 1.0
    diff = (net.stem(z2) - net.stem(z)).abs().sum(1)[0]
    assert diff.shape == (16 // p, 16 // p)
    changed = diff.nonzero().tolist()
    assert changed == [[5 // p, 9 // p]], changed


@pytest.mark.parametrize("name", ["parallel_learned", "residual_parallel_learned"])
def test_learned_positions_are_used(name):
    net = _net(name)
    z, lam, labels = _inputs()
    out = net(z, lam, labels=labels)
    assert isinstance(net.pos, torch.nn.Parameter) and net.pos.shape == (1, net.grid[0] * net.grid[1], 16)
    with torch.no_grad():
        net.pos[0, 5] += 0.5  # one token's position vector
    assert (net(z, lam, labels=labels) - out).abs().max() > 1e-4
    with pytest.raises(ValueError, match="learned position embedding"):
        net(torch.zeros(1, 1, 32, 32, dtype=torch.float64), torch.zeros(1))


def test_sincos_positions_are_fixed_and_break_token_symmetry():
    """Fixed positions are a buffer, not a parameter; without them a constant input would give identical tokens."""
    net = _net("uvit")
    assert "pos" not in dict(net.named_parameters()) and net.pos.shape == (1, 64, 16)
    assert not torch.allclose(net.pos[0, 0], net.pos[0, 9])


@pytest.mark.parametrize("arch,expect_change", [("residual_uvit", False), ("uvit", True)])
def test_residual_levels_see_the_lower_path_only_through_the_difference(arch, expect_change):
    """SiD2 residual U-ViT: ``h = Up(T(Down(h_before)) - Down(h_before)) + h_before``. With the transformer stack the
    identity (its adaLN gates at zero) the lowest level contributes ``Up(pos)``, independent of the Down conv, so
    re-randomising that conv leaves the output unchanged; the plain U-ViT's output moves."""
    torch.manual_seed(0)
    net = build_backbone(arch, {**TINY, "channels": [8, 8]}, image_channels=1, image_size=16, num_classes=10)
    _perturb_zeros(net, skip=("blocks.",)).double().eval()  # head and ResBlocks perturbed, transformer kept identity
    z, lam, labels = _inputs()
    out = net(z, lam, labels=labels)
    assert out.abs().max() > 1e-3
    with torch.no_grad():
        for p in net.downs[-1].parameters():
            p.copy_(torch.randn_like(p))
    diff = (net(z, lam, labels=labels) - out).abs().max()
    if expect_change:
        assert diff > 1e-3, diff
    else:
        assert diff < 1e-12, diff


#: relative RMS difference of bf16 autocast vs float32 measured on these tiny nets (5 seeds, CPU, torch 2.13):
#: 0.007-0.012 for every variant; the bound is about 3x the largest. A float32 run would give ~1e-7, so the
#: lower bound checks that autocast really ran in bf16.
BF16_REL_RMS_MAX = 0.04


@pytest.mark.parametrize("name", ["uvit", "patch2", "wavelet1", "parallel_learned", "residual"])
def test_bf16_autocast_close_to_float32(name):
    arch, opts = VARIANTS[name]
    models = []
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        models.append(build_model(arch, "v", {**TINY, **opts}, image_channels=1, image_size=16, num_classes=10,
                                  autocast_dtype=dtype))
    ref, bf16 = models
    _perturb_zeros(ref)
    bf16.load_state_dict(ref.state_dict())
    z, lam, labels = _inputs(dtype=torch.float32)
    with torch.no_grad():
        a = ref.predict(z, lam, labels=labels)
        b = bf16.predict(z, lam, labels=labels)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    rel = float((a - b).norm() / a.norm())
    assert 1e-4 < rel < BF16_REL_RMS_MAX, rel
    out = bf16(z, lam, labels=labels)
    assert out.x.dtype == torch.float32 and torch.isfinite(out.eps).all()
