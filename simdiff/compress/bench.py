"""Rate-distortion-perception evaluation behind ``benchmarks/compression.py eval``.

Every row compresses the two held-out test photos (chelsea 300x451, china 427x640) to real files and decodes them:
bits per pixel are the files' bytes x 8 over all pixels (headers included: the codec's own file for the standard
codecs and "JPEG + diffusion", the ``.sdc`` file for the learned codec), PSNR is over all pixels (from the pooled
MSE), MS-SSIM (5 scales) is the mean over the two photos, KID/FID compare the 88 non-overlapping 64x64 patches of
the decoded photos with the same patches of the originals (Inception features, offline). Times are seconds per
image on this CPU (one thread), encode and decode separately; the diffusion decoder's time is included in decode.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from simdiff.data.photos import PHOTO_SPLITS, load_photo, patch_grid

from .metrics import ms_ssim
from .standard import STANDARD_CODECS, available, decode_native, encode_native, search_quality

#: KID/FID use the 64x64 patches of the test photos at this stride (overlapping: 320 patches instead of 88)
FEATURE_STRIDE = 32

__all__ = ["Row", "test_photos", "photo_patch_tensor", "measure", "run_eval"]


@dataclass
class Row:
    """One point of a rate-distortion-perception curve."""

    method: str
    setting: str
    bpp: float
    psnr: float
    ms_ssim: float
    encode_s: float
    decode_s: float
    kid: float | None = None
    fid: float | None = None
    decoded: list[np.ndarray] = field(default_factory=list, repr=False)

    def record(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "decoded"}


def test_photos() -> list[np.ndarray]:
    """The test photos, uint8 ``[H, W, 3]`` each."""
    return [load_photo(name) for name in PHOTO_SPLITS["test"]]


def photo_patch_tensor(images: list[np.ndarray], size: int = 64, stride: int | None = None) -> torch.Tensor:
    """The ``size`` patches of each image on the grid of :func:`patch_grid` (``stride`` defaults to ``size``:
    non-overlapping) as ``[N, 3, size, size]`` in [-1, 1]."""
    out = []
    for im in images:
        for r, c in patch_grid(im.shape[0], im.shape[1], size=size, stride=stride or size):
            out.append(im[r : r + size, c : c + size])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def measure(method: str, setting: str, images: list[np.ndarray], encode: Callable[[np.ndarray, int], bytes],
            decode: Callable[[bytes, int], np.ndarray]) -> Row:
    """Encode/decode every image (``encode(image, index) -> bytes``, ``decode(bytes, index) -> image``)."""
    bits = pixels = sq = 0.0
    ssim, enc_t, dec_t, decoded = [], 0.0, 0.0, []
    for i, im in enumerate(images):
        t = time.perf_counter()
        data = encode(im, i)
        enc_t += time.perf_counter() - t
        t = time.perf_counter()
        out = decode(data, i)
        dec_t += time.perf_counter() - t
        bits += len(data) * 8
        pixels += im.shape[0] * im.shape[1]
        sq += float(np.sum((out.astype(np.float64) - im.astype(np.float64)) ** 2))
        to_t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].double()  # noqa: E731
        ssim.append(float(ms_ssim(to_t(out), to_t(im))))
        decoded.append(out)
    mse = sq / (pixels * images[0].shape[2])
    psnr = 10 * np.log10(255.0**2 / max(mse, 1e-12))
    n = len(images)
    return Row(method, setting, bits / pixels, float(psnr), float(np.mean(ssim)), enc_t / n, dec_t / n,
               decoded=decoded)


def _refiner(decoder_path: str, steps: int, eta: float = 0.0) -> Callable[[np.ndarray, int], np.ndarray]:
    from .diffusion import decode, load_decoder

    model = load_decoder(decoder_path)

    def refine(image: np.ndarray, label: int) -> np.ndarray:
        base = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        labels = torch.tensor([label]) if model.cfg.num_rates else None
        x = decode(model, base, steps=steps, eta=eta, seed=0, labels=labels)
        return ((x[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy().copy()

    return refine


def _std_row(codec: str, target: float, images: list[np.ndarray]) -> Row:
    """The highest quality within ``target`` bpp per image (searched untimed), then timed encode/decode at it."""
    qualities = [search_quality(im, codec, target)[0] for im in images]
    return measure(codec, f"<= {target} bpp", images, lambda im, i: encode_native(im, codec, qualities[i]),
                   lambda d, i: decode_native(d))


def run_eval(args) -> int:
    """The evaluation; see ``benchmarks/compression.py`` for the arguments."""
    import json
    import sys
    from pathlib import Path

    from simdiff.eval.features import InceptionFeatures
    from simdiff.eval.fid import frechet_distance_features, kid

    from .learned import HyperpriorCodec
    from .train import JPEG_QUALITIES

    torch.set_num_threads(args.threads)
    images = test_photos()
    if args.quick:
        images = [im[:176, :224].copy() for im in images]
    targets = (0.15, 0.3) if args.quick else (0.1, 0.15, 0.2, 0.3, 0.45, 0.6, 0.8)
    feature_targets = (0.15, 0.3, 0.6)
    rates = (0, 2) if args.quick else tuple(range(6))
    diffusion_rates = (0,) if args.quick else tuple(int(r) for r in args.diffusion_rates.split(","))
    jpeg_qualities = (5,) if args.quick else tuple(int(q) for q in args.jpeg_qualities.split(","))
    methods = set(args.methods.split(",")) if args.methods else None
    want = lambda m: methods is None or m in methods  # noqa: E731
    rows: list[tuple[Row, bool]] = []
    log = lambda m: print(m, flush=True)  # noqa: E731
    for codec in STANDARD_CODECS if want("standard") else ():
        if not available(codec):
            log(f"{codec}: not available, skipped")
            continue
        for target in targets:
            rows.append((_std_row(codec, target, images), target in feature_targets))
            log(f"{rows[-1][0].record()}")
    models = {r: HyperpriorCodec.load(Path(args.models) / f"hp_q{r}.safetensors") for r in rates}
    etas = [float(e) for e in str(args.eta).split(",")]
    tag = lambda eta: f"{args.steps} steps" + (f", eta {eta:g}" if eta else "")  # noqa: E731
    refiners = {eta: _refiner(args.decoder_learned, args.steps, eta) for eta in etas} if args.decoder_learned else {}
    for r, model in models.items() if want("learned") else ():
        row = measure("learned (MSE)", f"rate {r}", images, lambda im, i, m=model: m.compress(im),
                      lambda d, i, m=model: m.decompress(d))
        rows.append((row, r in diffusion_rates))
        log(f"{row.record()}")
        for eta, refine in refiners.items() if r in diffusion_rates else ():
            row = measure(f"learned + diffusion ({tag(eta)})", f"rate {r}", images,
                          lambda im, i, m=model: m.compress(im),
                          lambda d, i, m=model, r=r, f=refine: f(m.decompress(d), r))
            rows.append((row, True))
            log(f"{row.record()}")
    jpeg_refiners = {eta: _refiner(args.decoder_jpeg, args.steps, eta) for eta in etas} if args.decoder_jpeg else {}
    all_q = JPEG_QUALITIES
    for eta, jpeg_refine in jpeg_refiners.items() if want("jpeg") else ():
        for q in jpeg_qualities:
            row = measure(f"JPEG + diffusion ({tag(eta)})", f"q {q}", images,
                          lambda im, i, q=q: encode_native(im, "jpeg", q),
                          lambda d, i, q=q, f=jpeg_refine: f(decode_native(d), all_q.index(q)))
            rows.append((row, True))
            log(f"{row.record()}")
    if not args.no_features:
        feats = InceptionFeatures("cpu", batch_size=22)
        ref = feats(photo_patch_tensor(images, stride=FEATURE_STRIDE))
        for row, features in rows:
            if features:
                f = feats(photo_patch_tensor(row.decoded, stride=FEATURE_STRIDE))
                row.kid = kid(f, ref, subsets=10, subset_size=len(ref) // 2)[0]
                row.fid = frechet_distance_features(f, ref)
                log(f"features {row.method} {row.setting}: KID {row.kid:.4f} FID {row.fid:.1f}")
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("compression_quick" if args.quick else "compression")
    payload = {"command": " ".join(sys.argv), "rows": [r.record() for r, _ in rows]}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    from .bench_report import write_report

    n_patches = len(photo_patch_tensor(images, stride=FEATURE_STRIDE))
    write_report([r for r, _ in rows], images, out, name, fid_label=f"FID ({n_patches} patches)")
    return 0


# ------------------------------------------------------------------------------------------ small cases: digits

#: grey small-case data sets: name -> loader of :mod:`simdiff.data.sources`
SMALL_DATA = {"mnist": "load_mnist", "fashion": "load_fashion_mnist"}


def digit_mosaics(data: str, split: str, *, tiles: int = 8, count: int | None = None) -> np.ndarray:
    """MNIST / Fashion-MNIST images laid out ``tiles x tiles`` per mosaic, in data-set order, as uint8
    ``[count, 28 tiles, 28 tiles, 1]`` (``count`` defaults to all whole mosaics).

    The 28x28 images are coded as mosaics because every file format carries a header (about 20 bytes for ``.sdc``,
    hundreds for JPEG) that would dominate the bits of a single 784-pixel image.
    """
    from simdiff.data import sources

    if data not in SMALL_DATA:
        raise ValueError(f"unknown small-case data {data!r}; valid: {', '.join(SMALL_DATA)}")
    raw = getattr(sources, SMALL_DATA[data])(split).images  # [N, 1, 28, 28] in [-1, 1]
    x = ((raw[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    per = tiles * tiles
    n = len(x) // per if count is None else min(count, len(x) // per)
    s = x.shape[1]
    grid = x[: n * per].reshape(n, tiles, tiles, s, s).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(grid.reshape(n, tiles * s, tiles * s, 1))


def small_case_rows(codecs: dict, images: list[np.ndarray], log: Callable[[str], None] = print) -> list[Row]:
    """Rate-distortion rows on grey mosaics: each learned codec (``{rate: HyperpriorCodec}``), then every available
    standard codec at the highest quality whose files fit the learned codec's bpp (per mosaic)."""
    rows = []
    for r, model in codecs.items():
        row = measure("learned (MSE)", f"rate {r}", images, lambda im, i, m=model: m.compress(im),
                      lambda d, i, m=model: m.decompress(d))
        rows.append(row)
        log(f"{row.record()}")
        for codec in STANDARD_CODECS:
            if not available(codec):
                continue
            qualities = [search_quality(im, codec, row.bpp)[0] for im in images]
            std = measure(codec, f"<= {row.bpp:.3f} bpp", images,
                          lambda im, i, c=codec, q=qualities: encode_native(im, c, q[i]),
                          lambda d, i: decode_native(d, channels=1))
            rows.append(std)
            log(f"{std.record()}")
    return rows
