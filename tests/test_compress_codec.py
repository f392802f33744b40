"""The learned hyperprior codec and the standard codecs: lossless latent coding, rate vs estimate, refusals."""

import numpy as np
import pytest
import torch
from scipy.special import ndtr

from simdiff.compress.entropy import SCALE_TABLE, decode_latents, encode_latents, snap_scales
from simdiff.compress.format import unpack
from simdiff.compress.learned import HyperpriorCodec, HyperpriorConfig
from simdiff.compress.standard import STANDARD_CODECS, StandardCodec, available, search_quality
from simdiff.compress.train import train_codec
from simdiff.configuration import ConfigError
from simdiff.data.photos import load_photo, photo_patches

pytest.importorskip("constriction")
pytest.importorskip("skimage")  # the training photos


@pytest.fixture(scope="module")
def codec():
    torch.set_num_threads(1)
    patches, _ = photo_patches("train", size=64, stride=64)
    return train_codec(patches, HyperpriorConfig(N=8, M=12, lmbda=0.013), steps=120, batch=4, lr=3e-3, seed=0,
                       model_id="tiny")


@pytest.fixture(scope="module")
def image():
    return load_photo("china")[40:168, 100:292].copy()  # 128 x 192 of a test photo


def _coded_bits(model, a):
    """Information content (bits) of the latents under exactly the distributions the coder used (float64)."""
    y = a["y_hat"].double().flatten().numpy()
    z = a["z_hat"].double()
    ry = np.abs(y).max() + 1
    rz = int(z.abs().max()) + 1
    s = snap_scales(a["scale"]).flatten().numpy()
    mass = ndtr((y + 0.5) / s) - ndtr((y - 0.5) / s)
    norm = ndtr((ry + 0.5) / s) - ndtr((-ry - 0.5) / s)
    bits_y = -np.log2(mass / norm).sum()
    tables = model.density.pmf_tables(rz)
    tables = tables / tables.sum(1, keepdims=True)
    zc = z[0].reshape(z.shape[1], -1).numpy().astype(int) + rz
    bits_z = -sum(np.log2(tables[c, zc[c]]).sum() for c in range(z.shape[1]))
    return bits_y + bits_z


def test_latents_round_trip_exactly(codec, image):
    a = codec.analyse(image)
    payload = encode_latents(a["y_hat"], a["scale"], a["z_hat"], codec.density)
    y, z = decode_latents(payload, z_shape=tuple(a["z_hat"].shape), density=codec.density, scale_fn=codec.scales)
    assert torch.equal(y, a["y_hat"]) and torch.equal(z, a["z_hat"])
    assert a["y_hat"].abs().max() > 0  # something non-trivial was coded


def test_measured_rate_matches_estimate(codec, image):
    a = codec.analyse(image)
    data = codec.compress(image)
    header, payload = unpack(data)
    coded = _coded_bits(codec, a)
    # the range coder spends within ~1% (+ its final words) of the information content under its own tables
    assert len(payload) * 8 == pytest.approx(coded, rel=0.01, abs=96)
    # ... and within a few percent of the model's own rate estimate (continuous scales, untruncated tables)
    assert len(payload) * 8 == pytest.approx(a["estimated_bits"], rel=0.03)
    # the file is the payload plus the documented ~21-byte header (model id "tiny")
    assert len(data) - len(payload) == 3 + 3 + 2 + 2 + 1 + 4 + 4 + 1 + 2 + 4


def test_decode_is_deterministic_and_matches_synthesis(codec, image):
    data = codec.compress(image)
    out1, out2 = codec.decompress(data), codec.decompress(data)
    assert out1.shape == image.shape and out1.dtype == np.uint8 and np.array_equal(out1, out2)
    with torch.no_grad():
        ref = codec.g_s(codec.analyse(image)["y_hat"])[0, :, :128, :192].clamp(0, 1).mul(255).round()
    assert np.array_equal(out1, ref.to(torch.uint8).permute(1, 2, 0).numpy())
    mse = np.mean((out1.astype(float) - image) ** 2)
    assert 10 * np.log10(255**2 / mse) > 12  # a 120-step toy codec (seen: 13.8 dB); not noise


def test_odd_sizes_and_refusals(codec, tmp_path):
    odd = load_photo("china")[:37, :53].copy()
    data = codec.compress(odd)
    assert codec.decompress(data).shape == (37, 53, 3)
    with pytest.raises(ConfigError, match="truncated|corrupted"):
        codec.decompress(data[:-3])
    other = HyperpriorCodec(HyperpriorConfig(N=8, M=12), model_id="tiny")
    with pytest.raises(ConfigError, match="made by model 'tiny'.*decode with the model that encoded it"):
        other.decompress(data)
    with pytest.raises(ValueError, match="uint8"):
        codec.compress(odd.astype(np.float32))
    codec.save(tmp_path / "m.safetensors")
    back = HyperpriorCodec.load(tmp_path / "m.safetensors")
    assert back.model_hash() == codec.model_hash() and np.array_equal(back.decompress(data), codec.decompress(data))
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(ConfigError, match="cannot read model"):
        HyperpriorCodec.load(tmp_path / "bad.safetensors")


def test_scale_table_snaps_upwards():
    s = torch.tensor([0.0, 0.11, 0.5, 1e6], dtype=torch.float64)
    snapped = snap_scales(s)
    assert torch.all(snapped >= s.clamp(0.11, SCALE_TABLE[-1].item()) - 1e-12)
    assert set(snapped.tolist()) <= set(SCALE_TABLE.tolist())


@pytest.mark.parametrize("name", sorted(STANDARD_CODECS))
def test_standard_codecs_hit_target_bpp(name, image):
    if not available(name):
        pytest.skip(f"{name} not available")
    quality, data = search_quality(image, name, 0.5)
    bpp = len(data) * 8 / (image.shape[0] * image.shape[1])
    assert bpp <= 0.5
    if quality < 100:
        from simdiff.compress.standard import encode_native

        assert len(encode_native(image, name, quality + 1)) * 8 / (128 * 192) > 0.5 or quality == 100
    codec = StandardCodec(name)
    sdc = codec.compress(image, quality)
    out = codec.decompress(sdc)
    assert out.shape == image.shape and np.array_equal(out, codec.decompress(data))
    with pytest.raises(ConfigError):
        codec.decompress(sdc[:-10])


def test_grey_codec_on_digit_sized_images():
    """The small cases (MNIST-sized, one channel): 28x28 is padded to 64 and cropped back; latents still exact."""
    torch.manual_seed(0)
    model = HyperpriorCodec(HyperpriorConfig(N=8, M=12, channels=1), model_id="grey").eval()
    rng = np.random.default_rng(0)
    digit = (rng.random((28, 28, 1)) * 255).astype(np.uint8)
    data = model.compress(digit)
    out = model.decompress(data)
    assert out.shape == (28, 28, 1) and np.array_equal(out, model.decompress(data))
    a = model.analyse(digit)
    _, payload = unpack(data)
    y, z = decode_latents(payload, z_shape=tuple(a["z_hat"].shape), density=model.density, scale_fn=model.scales)
    assert torch.equal(y, a["y_hat"]) and torch.equal(z, a["z_hat"])
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 1\]"):
        model.compress(np.repeat(digit, 3, axis=2))


def test_warm_start_copies_the_init_and_then_trains(codec):
    patches, _ = photo_patches("train", size=64, stride=64)
    cfg = HyperpriorConfig(N=8, M=12, lmbda=0.0018, rate=0)
    same = train_codec(patches[:8], cfg, steps=0, batch=2, init=codec)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), codec.state_dict().values()))
    tuned = train_codec(patches, cfg, steps=20, batch=4, lr=1e-3, init=codec)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), codec.state_dict().values()))
    with pytest.raises(ValueError, match="widths"):
        train_codec(patches[:8], HyperpriorConfig(N=8, M=16), steps=0, init=codec)


def test_digit_mosaics_lay_images_out_in_order_and_grey_rows_are_measured():
    from simdiff.compress.bench import digit_mosaics, small_case_rows
    from simdiff.data.sources import load_mnist

    m = digit_mosaics("mnist", "test", tiles=6, count=2)  # 168 x 168: MS-SSIM's 5 scales need 161+
    assert m.shape == (2, 168, 168, 1) and m.dtype == np.uint8
    raw = load_mnist("test").images
    img = lambda i: ((raw[i, 0] + 1) * 127.5).round().to(torch.uint8).numpy()  # noqa: E731
    assert np.array_equal(m[0, 0:28, 28:56, 0], img(1))  # row 0, column 1
    assert np.array_equal(m[1, 28:56, 0:28, 0], img(36 + 6))  # second mosaic, row 1, column 0
    with pytest.raises(ValueError, match="unknown small-case data"):
        digit_mosaics("cifar", "test")
    tiny = HyperpriorCodec(HyperpriorConfig(N=4, M=4, channels=1), model_id="grey").eval()
    rows = small_case_rows({0: tiny}, list(m), log=lambda s: None)
    assert rows[0].method == "learned (MSE)" and rows[0].bpp > 0
    for row in rows[1:]:  # every standard codec is searched to the learned codec's bits (or its lowest quality)
        assert row.method in STANDARD_CODECS and np.isfinite(row.psnr) and 0 < row.ms_ssim <= 1
