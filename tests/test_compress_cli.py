"""`simdiff compress` / `simdiff decompress` through their parsers, and the diffusion decoder's conditioning path."""

import argparse
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from simdiff.compress.cli import add_compress_parsers, read_image
from simdiff.compress.diffusion import (
    BaseConditionedDenoiser,
    DecoderConfig,
    decode,
    decoder_loss,
    load_decoder,
    save_decoder,
)
from simdiff.compress.learned import HyperpriorCodec, HyperpriorConfig
from simdiff.configuration import ConfigError
from simdiff.data.photos import load_photo


def _run(argv):
    parser = argparse.ArgumentParser()
    add_compress_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(load_photo("china")[:70, :90]).save(path)
    return path


def _tiny_decoder(num_rates=0, seed=0):
    torch.manual_seed(seed)
    model = BaseConditionedDenoiser(DecoderConfig(channels=(8, 16), num_rates=num_rates, patch=16))
    torch.nn.init.normal_(model.backbone.conv_out.weight, std=0.05)  # not the zero init, so the output moves
    return model.eval()


def test_learned_round_trip_through_cli(photo, tmp_path, capsys):
    pytest.importorskip("constriction")
    torch.manual_seed(0)
    model = HyperpriorCodec(HyperpriorConfig(N=8, M=12, rate=1), model_id="tiny").eval()
    model.save(tmp_path / "codec.safetensors")
    out, png = tmp_path / "a.sdc", tmp_path / "a.png"
    assert _run(["compress", str(photo), "-o", str(out), "--model", str(tmp_path / "codec.safetensors")]) == 0
    assert "bpp" in capsys.readouterr().out
    assert _run(["decompress", str(out), "-o", str(png), "--model", str(tmp_path / "codec.safetensors")]) == 0
    assert read_image(png).shape == (70, 90, 3)
    expected = model.decompress(out.read_bytes())
    assert np.array_equal(read_image(png), expected)
    # a file from a shipped-model name that does not exist, and no --model: one line, no output written
    with pytest.raises(ConfigError, match="not a shipped one; pass --model"):
        _run(["decompress", str(out), "-o", str(tmp_path / "b.png")])
    assert not (tmp_path / "b.png").exists()
    # truncated file: one line, no output written
    (tmp_path / "cut.sdc").write_bytes(out.read_bytes()[:-5])
    with pytest.raises(ConfigError, match="truncated|corrupted"):
        _run(["decompress", str(tmp_path / "cut.sdc"), "-o", str(tmp_path / "c.png")])
    assert not (tmp_path / "c.png").exists()


def test_standard_codec_and_plain_jpeg_through_cli(photo, tmp_path):
    out = tmp_path / "j.sdc"
    assert _run(["compress", str(photo), "-o", str(out), "--codec", "jpeg", "--bpp", "3.0"]) == 0
    assert len(out.read_bytes()) * 8 / (70 * 90) <= 3.0 + 13 * 8 / (70 * 90)  # JPEG within budget + .sdc header
    assert _run(["decompress", str(out), "-o", str(tmp_path / "j.png")]) == 0
    assert read_image(tmp_path / "j.png").shape == (70, 90, 3)
    Image.open(photo).save(tmp_path / "plain.jpg", quality=30)
    dec = tmp_path / "dec.safetensors"
    save_decoder(_tiny_decoder(), dec)
    args = ["decompress", str(tmp_path / "plain.jpg"), "-o", str(tmp_path / "p.png"), "--diffusion", str(dec),
            "--steps", "2", "--tile", "48"]
    assert _run(args) == 0
    first = read_image(tmp_path / "p.png")
    assert _run(args) == 0 and np.array_equal(first, read_image(tmp_path / "p.png"))  # fixed seed: same output
    with pytest.raises(ConfigError, match="exactly one of --quality or --bpp"):
        _run(["compress", str(photo), "-o", str(out), "--codec", "webp"])
    with pytest.raises(ConfigError, match="cannot read image"):
        _run(["compress", str(tmp_path / "j.sdc"), "-o", str(tmp_path / "x.sdc")])
    with pytest.raises(ConfigError, match="not a diffusion decoder|cannot read decoder"):
        load_decoder(tmp_path / "j.sdc")


def test_decoder_conditioning_path():
    model = _tiny_decoder(num_rates=3)
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    base = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    lam = torch.tensor([0.5, -1.0])
    with torch.no_grad():
        v_c = model(z, lam, base=base).v
        v_u = model(z, lam).v
        assert not torch.allclose(v_c, v_u)  # the base reaches the prediction
        assert torch.allclose(v_u, model(z, lam, base=torch.zeros_like(base)).v)  # null base = zeros
        v_g = model(z, lam, base=base, guidance=2.0).v
        assert torch.allclose(v_g, v_c + 2.0 * (v_c - v_u), atol=1e-6)
        assert model(z, lam, base=base, labels=torch.tensor([0, 2])).v.shape == z.shape
    a = decode(model, base[:, :, ::2, ::2], steps=3, seed=4, size=(16, 16))
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, decode(model, base[:, :, ::2, ::2], steps=3, seed=4,
                                                                  size=(16, 16)))
    assert not torch.equal(a, decode(model, base[:, :, ::2, ::2], steps=3, seed=5, size=(16, 16)))
    s1, s2 = (decode(model, base, steps=3, eta=1.0, seed=9) for _ in range(2))  # stochastic steps, fixed seed
    assert torch.equal(s1, s2) and not torch.equal(s1, decode(model, base, steps=3, eta=0.0, seed=9))


def test_decoder_learns_to_use_the_base():
    """Sixty steps on 8x8 photo crops: the conditional loss drops below the null-base loss."""
    torch.manual_seed(0)
    model = BaseConditionedDenoiser(DecoderConfig(channels=(16, 32), patch=8, base_drop_prob=0.2))
    img = torch.from_numpy(load_photo("flower")).permute(2, 0, 1).float() / 127.5 - 1
    crops = img.unfold(1, 8, 8).unfold(2, 8, 8).permute(1, 2, 0, 3, 4).reshape(-1, 3, 8, 8)
    blur = torch.nn.functional.avg_pool2d(crops, 2).repeat_interleave(2, -1).repeat_interleave(2, -2)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(len(crops), (32,), generator=gen)
        loss = decoder_loss(model, crops[idx], blur[idx], generator=gen).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.cfg = dataclasses.replace(model.cfg, base_drop_prob=0.0)  # evaluate both conditions explicitly
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        x = crops[:256]
        cond = decoder_loss(model, x, blur[:256], generator=g).mean()
        g = torch.Generator().manual_seed(7)
        null = decoder_loss(model, x, torch.zeros_like(x), generator=g).mean()
    assert cond < 0.9 * null  # seen: 0.294 vs 0.399


def test_shipped_codec_round_trip(photo, tmp_path):
    pytest.importorskip("constriction")
    from simdiff.compress.cli import MODELS_DIR

    if not (MODELS_DIR / "hp_q2.safetensors").is_file():
        pytest.skip("no shipped codec models")
    out, png = tmp_path / "s.sdc", tmp_path / "s.png"
    assert _run(["compress", str(photo), "-o", str(out), "--rate", "2"]) == 0
    assert _run(["decompress", str(out), "-o", str(png)]) == 0
    decoded, original = read_image(png).astype(float), read_image(photo).astype(float)
    assert decoded.shape == original.shape
    assert 10 * np.log10(255**2 / np.mean((decoded - original) ** 2)) > 20  # seen: ~25 dB on the test photos
    assert len(out.read_bytes()) * 8 / (70 * 90) < 2.0
    with pytest.raises(ConfigError, match="no shipped codec model for rate 9"):
        _run(["compress", str(photo), "-o", str(out), "--rate", "9"])


class _Pointwise(torch.nn.Module):
    """A backbone without spatial context: tiled and whole-image predictions must then agree exactly."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 3, 1)

    def forward(self, zb, logsnr, labels=None):
        return self.conv(zb) * torch.as_tensor(logsnr).view(-1, 1, 1, 1).sigmoid()


def test_tiled_prediction_blends_to_the_whole_image():
    model = _tiny_decoder()
    model.backbone = _Pointwise()
    z = torch.randn(1, 3, 50, 70, generator=torch.Generator().manual_seed(0))
    base = torch.rand(1, 3, 50, 70, generator=torch.Generator().manual_seed(1))
    lam = torch.tensor([0.3])
    with torch.no_grad():
        whole = model(z, lam, base=base).v
        for tile, overlap in [(32, 8), (24, 0), (40, 16)]:
            assert torch.allclose(model(z, lam, base=base, tile=tile, overlap=overlap).v, whole, atol=1e-6)
    unet = _tiny_decoder()
    with torch.no_grad():
        a = decode(unet, base * 2 - 1, steps=2, tile=32, overlap=8)
        assert a.shape == (1, 3, 50, 70) and torch.isfinite(a).all()
        assert torch.equal(decode(unet, base * 2 - 1, steps=2, tile=80), decode(unet, base * 2 - 1, steps=2))
    with pytest.raises(ValueError, match="overlap must be in"):
        unet(z, lam, base=base, tile=16, overlap=16)


def test_pixel_norm_makes_the_decoder_local_and_group_norm_does_not(tmp_path):
    """With per-pixel group statistics the prediction at a pixel ignores content beyond the receptive field, so a
    decoder trained on small crops sees the same statistics on a whole photo; GroupNorm's whole-image statistics
    change it."""
    from simdiff.compress.diffusion import PixelGroupNorm

    z = torch.randn(1, 3, 32, 160, generator=torch.Generator().manual_seed(0))
    base = torch.rand(1, 3, 32, 160, generator=torch.Generator().manual_seed(1)) * 2 - 1
    lam = torch.tensor([0.5])
    gaps = {}
    for norm in ("pixel", "group"):
        torch.manual_seed(0)
        model = BaseConditionedDenoiser(DecoderConfig(channels=(8, 16), num_res_blocks=1, patch=32, norm=norm))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))  # away from the zero-initialised output layer
            whole = model(z, lam, base=base).v[..., :16]
            crop = model(z[..., :64], lam, base=base[..., :64]).v[..., :16]
        gaps[norm] = float((whole - crop).abs().max())
        assert float(whole.std()) > 0.01  # the prediction carries signal (per-pixel statistics do not erase it)
        assert any(isinstance(m, PixelGroupNorm) for m in model.modules()) == (norm == "pixel")
    assert gaps["pixel"] < 1e-5 < 1e-2 < gaps["group"]
    # the option travels with the file; a file without it (older decoders) loads with GroupNorm
    model = BaseConditionedDenoiser(DecoderConfig(channels=(8, 16), num_res_blocks=1, patch=32))
    save_decoder(model, tmp_path / "d.safetensors")
    assert load_decoder(tmp_path / "d.safetensors").cfg.norm == "pixel"
    with pytest.raises(ConfigError, match="norm must be"):
        DecoderConfig(norm="batch")
