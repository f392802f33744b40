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


def photo_patch_tensor(images: list[np.ndarray], size: int = 64) -> torch.Tensor:
    """Non-overlapping ``size`` patches of each image (grid of :func:`patch_grid`) as ``[N, 3, size, size]`` in
    [-1, 1]."""
    out = []
    for im in images:
        for r, c in patch_grid(im.shape[0], im.shape[1], size=size, stride=size):
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


def _refiner(decoder_path: str, steps: int) -> Callable[[np.ndarray, int], np.ndarray]:
    from .diffusion import decode, load_decoder

    model = load_decoder(decoder_path)

    def refine(image: np.ndarray, label: int) -> np.ndarray:
        base = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        labels = torch.tensor([label]) if model.cfg.num_rates else None
        x = decode(model, base, steps=steps, seed=0, labels=labels)
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

    torch.set_num_threads(1)
    images = test_photos()
    if args.quick:
        images = [im[:176, :224].copy() for im in images]
    targets = (0.15, 0.3) if args.quick else (0.1, 0.15, 0.2, 0.3, 0.45, 0.6, 0.8)
    feature_targets = (0.15, 0.3, 0.6)
    rates = (0, 2) if args.quick else tuple(range(6))
    diffusion_rates = (0,) if args.quick else (0, 2)
    jpeg_qualities = (5,) if args.quick else (5, 10)
    rows: list[tuple[Row, bool]] = []
    log = lambda m: print(m, flush=True)  # noqa: E731
    for codec in STANDARD_CODECS:
        if not available(codec):
            log(f"{codec}: not available, skipped")
            continue
        for target in targets:
            rows.append((_std_row(codec, target, images), target in feature_targets))
            log(f"{rows[-1][0].record()}")
    models = {r: HyperpriorCodec.load(Path(args.models) / f"hp_q{r}.safetensors") for r in rates}
    refine = _refiner(args.decoder_learned, args.steps) if args.decoder_learned else None
    for r, model in models.items():
        row = measure("learned (MSE)", f"rate {r}", images, lambda im, i, m=model: m.compress(im),
                      lambda d, i, m=model: m.decompress(d))
        rows.append((row, r in diffusion_rates))
        log(f"{row.record()}")
        if refine is not None and r in diffusion_rates:
            row = measure(f"learned + diffusion ({args.steps} steps)", f"rate {r}", images,
                          lambda im, i, m=model: m.compress(im),
                          lambda d, i, m=model, r=r: refine(m.decompress(d), r))
            rows.append((row, True))
            log(f"{row.record()}")
    jpeg_refine = _refiner(args.decoder_jpeg, args.steps) if args.decoder_jpeg else None
    all_q = JPEG_QUALITIES
    for q in jpeg_qualities if jpeg_refine is not None else ():
        row = measure(f"JPEG + diffusion ({args.steps} steps)", f"q {q}", images,
                      lambda im, i, q=q: encode_native(im, "jpeg", q),
                      lambda d, i, q=q: jpeg_refine(decode_native(d), all_q.index(q)))
        rows.append((row, True))
        log(f"{row.record()}")
    if not args.no_features:
        feats = InceptionFeatures("cpu", batch_size=22)
        ref = feats(photo_patch_tensor(images))
        for row, want in rows:
            if want:
                f = feats(photo_patch_tensor(row.decoded))
                row.kid = kid(f, ref, subsets=10, subset_size=len(ref) // 2)[0]
                row.fid = frechet_distance_features(f, ref)
                log(f"features {row.method} {row.setting}: KID {row.kid:.4f} FID {row.fid:.1f}")
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    name = "compression_quick" if args.quick else "compression"
    payload = {"command": " ".join(sys.argv), "rows": [r.record() for r, _ in rows]}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    from .bench_report import write_report

    write_report([r for r, _ in rows], images, out, name)
    return 0
