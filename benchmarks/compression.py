"""Compression benchmark: train the small learned codecs and diffusion decoders, then rate-distortion-perception
curves against JPEG, WebP, AVIF and JPEG XL at matched bits per pixel.

    python benchmarks/compression.py train --out DIR [--device cuda] [--codec-seconds 30] [--decoder-seconds 90]
    python benchmarks/compression.py eval --models DIR [--decoder-learned F] [--decoder-jpeg F] [--quick]

``train`` fits one hyperprior codec per lambda of ``simdiff.compress.learned.LAMBDAS`` (rates 0..5) on 128x128
training-photo patches, then two diffusion decoders on 64x64 crops: one refining the learned codec's
reconstructions (rate label 0..5), one refining JPEG at qualities ``JPEG_QUALITIES``. Files written (float16):
``hp_q{r}.safetensors`` (bundled as ``hp_models.tar``), ``decoder_learned.safetensors``,
``decoder_jpeg.safetensors``.

``eval`` compresses the two held-out test photos (chelsea 300x451, china 427x640; never seen in training) with
every codec and reports, per row: bits per pixel from the whole file's bytes (headers included), PSNR, MS-SSIM
(5 scales), KID/FID on the 64x64 patches of the decoded photos (offline Inception, 88 patches: FID on so few
patches is strongly biased; compare rows with each other only), encode and decode seconds per image on this CPU.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simdiff.compress.learned import LAMBDAS, HyperpriorCodec, HyperpriorConfig  # noqa: E402
from simdiff.compress.train import JPEG_QUALITIES  # noqa: E402
from simdiff.data.photos import photo_patches  # noqa: E402

CODEC_WIDTHS = {"N": 48, "M": 64}
SMALL_CODEC_WIDTHS = {"N": 32, "M": 48, "channels": 1}
DECODER = {"channels": (32, 64, 128), "num_res_blocks": 2, "patch": 64}


def _log(msg: str) -> None:
    print(msg, flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    from simdiff.compress.diffusion import DecoderConfig, save_decoder
    from simdiff.compress.train import codec_bases, jpeg_bases, train_decoder

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="simdiff-codecs-"))  # the single files; only the bundle goes to ``out``
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    t0 = time.time()
    patches, _ = photo_patches("train", size=128, stride=32)
    _log(f"train patches {patches.shape} ({time.time() - t0:.1f} s)")
    rates = list(range(args.rates))
    if args.codecs_from:
        _unpack_models(Path(args.codecs_from))
        codecs = [HyperpriorCodec.load(Path(args.codecs_from) / f"hp_q{r}.safetensors") for r in rates]
        _log(f"codecs loaded from {args.codecs_from}")
    else:
        codecs = _train_codecs(args, patches, rates, work, out)
    decoders = {"learned": lambda: np.stack([codec_bases(m, patches, device=args.device) for m in codecs]),
                "jpeg": lambda: jpeg_bases(patches, JPEG_QUALITIES)}
    for name in args.decoders.split(","):
        bases = decoders[name]()
        k = bases.shape[0]
        _log(f"bases {name}: {bases.shape} ({time.time() - t0:.0f} s)")
        schedule = {"name": "shifted_cosine", "image_size": 64, "noise_size": args.decoder_noise_size}
        cfg = DecoderConfig(**{**DECODER, "patch": args.decoder_patch}, num_rates=k, schedule=schedule)
        model, steps = train_decoder(patches, bases, cfg, max_seconds=args.decoder_seconds,
                                     max_steps=args.decoder_steps, batch=args.batch,
                                     lr=5e-4, device=args.device, log=_log, log_every=500)
        save_decoder(model, out / f"decoder_{name}.safetensors", half=True)
        _log(f"decoder {name}: {steps} steps in {args.decoder_seconds} s budget")
    _log(f"total {time.time() - t0:.0f} s")
    return 0


def _train_codecs(args: argparse.Namespace, patches: np.ndarray, rates: list[int], work: Path, out: Path,
                  widths: dict | None = None, prefix: str = "hp") -> list:
    """One codec per rate; with ``--warm-start-seconds`` a codec is first trained at the highest rate and every rate
    is then fine-tuned from it for ``--codec-seconds``. Files ``{prefix}_q{r}.safetensors`` (float16), bundled in
    ``out/{prefix}_models.tar``."""
    from simdiff.compress.train import train_codec

    widths = dict(CODEC_WIDTHS if widths is None else widths)
    crop = args.codec_crop
    probe_cfg = HyperpriorConfig(**widths)
    steps = _steps_for(args.codec_seconds, args.device, lambda n: train_codec(
        patches, probe_cfg, steps=n, batch=args.codec_batch, crop=crop, device=args.device))
    init = None
    if args.warm_start_seconds > 0:
        top = len(LAMBDAS) - 1
        cfg = HyperpriorConfig(**widths, lmbda=LAMBDAS[top], rate=top)
        n = max(20, int(steps * args.warm_start_seconds / args.codec_seconds))
        start = time.time()
        init = train_codec(patches, cfg, steps=n, batch=args.codec_batch, crop=crop, lr=1e-3, seed=100,
                           model_id=f"{prefix}-warm", device=args.device, log=_log, log_every=max(1, n // 8))
        _log(f"warm start at lambda {LAMBDAS[top]}: {n} steps in {time.time() - start:.0f} s")
    codecs = []
    for r in rates:
        cfg = HyperpriorConfig(**widths, lmbda=LAMBDAS[r], rate=r)
        start = time.time()
        model = train_codec(patches, cfg, steps=steps, batch=args.codec_batch, crop=crop,
                            lr=1e-3 if init is None else 3e-4, seed=r, model_id=f"{prefix}-q{r}", device=args.device,
                            log=_log, log_every=max(1, steps // 4), init=init)
        model.save(work / f"{prefix}_q{r}.safetensors", half=True)
        codecs.append(HyperpriorCodec.load(work / f"{prefix}_q{r}.safetensors"))
        _log(f"codec rate {r} lambda {LAMBDAS[r]}: {steps} steps in {time.time() - start:.0f} s")
    with tarfile.open(out / f"{prefix}_models.tar", "w") as tar:
        for r in rates:
            tar.add(work / f"{prefix}_q{r}.safetensors", arcname=f"{prefix}_q{r}.safetensors")
    return codecs


def cmd_small(args: argparse.Namespace) -> int:
    """The grey small cases: codecs trained on MNIST / Fashion-MNIST mosaics, against the standard codecs."""
    import json

    from simdiff.compress.bench import digit_mosaics, small_case_rows
    from simdiff.compress.bench_report import markdown_table

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rates = [int(r) for r in args.rates.split(",")]
    prefix = f"small_{args.data}"
    t0 = time.time()
    train = digit_mosaics(args.data, "train")
    test = list(digit_mosaics(args.data, "test", count=args.test_mosaics))
    _log(f"{args.data}: {len(train)} train mosaics {train.shape[1:]}, {len(test)} test mosaics")
    work = Path(tempfile.mkdtemp(prefix="simdiff-small-"))
    codecs = _train_codecs(args, train, rates, work, out, widths=SMALL_CODEC_WIDTHS, prefix=prefix)
    _log(f"trained in {time.time() - t0:.0f} s")
    rows = small_case_rows(dict(zip(rates, codecs)), test, log=_log)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join(sys.argv), "data": args.data, "test_images": len(test) * 64,
               "rows": [r.record() for r in rows]}
    (results / f"compression_{prefix}.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(markdown_table(rows))
    return 0


def _steps_for(seconds: float, device: str, run) -> int:
    """Steps that fit in ``seconds``, from a timed 20-step probe (after a 5-step warm-up)."""
    run(5)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.time()
    run(20)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    per = (time.time() - start) / 20
    return max(20, int(seconds / per))


def _unpack_models(folder: Path) -> None:
    tar = folder / "hp_models.tar"
    if tar.is_file() and not (folder / "hp_q0.safetensors").is_file():
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                if member.isfile() and member.name.startswith("hp_q") and "/" not in member.name:
                    (folder / member.name).write_bytes(t.extractfile(member).read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the codecs and decoders")
    t.add_argument("--out", required=True)
    t.add_argument("--device", default="cpu")
    t.add_argument("--rates", type=int, default=len(LAMBDAS))
    t.add_argument("--codec-seconds", type=float, default=30.0)
    t.add_argument("--decoder-seconds", type=float, default=90.0)
    t.add_argument("--batch", type=int, default=32, help="decoder batch")
    t.add_argument("--codec-batch", type=int, default=16)
    t.add_argument("--codec-crop", type=int, default=128, help="codec training crop side")
    t.add_argument("--warm-start-seconds", type=float, default=0.0,
                   help="train one codec at the highest rate first and fine-tune every rate from it")
    t.add_argument("--codecs-from", help="folder with trained hp_q*.safetensors: skip codec training")
    t.add_argument("--decoder-steps", type=int, help="stop the decoder at this many steps (or at the time budget)")
    t.add_argument("--decoder-patch", type=int, default=DECODER["patch"], help="decoder training crop side")
    t.add_argument("--decoder-noise-size", type=int, default=512,
                   help="decoder schedule: cosine shifted by 2 log(noise_size / 64) in log-SNR (64: no shift)")
    t.add_argument("--decoders", default="learned,jpeg", help="which decoders to train (comma-separated)")
    t.set_defaults(func=cmd_train)
    s = sub.add_parser("small", help="grey small cases: MNIST / Fashion-MNIST mosaics")
    s.add_argument("--data", choices=("mnist", "fashion"), default="fashion")
    s.add_argument("--out", required=True, help="folder for the trained small codecs")
    s.add_argument("--device", default="cpu")
    s.add_argument("--rates", default="0,2,4", help="comma-separated rate indices (lambdas)")
    s.add_argument("--codec-seconds", type=float, default=90.0)
    s.add_argument("--warm-start-seconds", type=float, default=180.0)
    s.add_argument("--codec-batch", type=int, default=8)
    s.add_argument("--codec-crop", type=int, default=128)
    s.add_argument("--test-mosaics", type=int, default=16, help="test mosaics of 8x8 images each")
    s.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    s.set_defaults(func=cmd_small)
    e = sub.add_parser("eval", help="rate-distortion-perception table and plots")
    e.add_argument("--models", required=True, help="folder with hp_q*.safetensors (or hp_models.tar)")
    e.add_argument("--decoder-learned")
    e.add_argument("--decoder-jpeg")
    e.add_argument("--steps", type=int, default=8, help="diffusion decoder steps")
    e.add_argument("--eta", default="0", help="diffusion decoder: 0 deterministic DDIM, 1 stochastic; a comma list "
                                              "gives rows for each (e.g. 0,1)")
    e.add_argument("--diffusion-rates", default="0,2", help="learned-codec rates decoded with diffusion too")
    e.add_argument("--jpeg-qualities", default="5,10", help="JPEG qualities decoded with diffusion")
    e.add_argument("--methods", help="only these row groups (comma-separated: standard, learned, jpeg)")
    e.add_argument("--threads", type=int, default=1, help="torch threads")
    e.add_argument("--name", help="results file stem (default compression / compression_quick)")
    e.add_argument("--quick", action="store_true", help="fewer points (a smoke run)")
    e.add_argument("--no-features", action="store_true", help="skip KID/FID (Inception features)")
    e.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    e.set_defaults(func=lambda a: _eval(a))
    args = parser.parse_args(argv)
    return args.func(args)


def _eval(args: argparse.Namespace) -> int:
    from simdiff.compress.bench import run_eval

    _unpack_models(Path(args.models))
    return run_eval(args)


if __name__ == "__main__":
    raise SystemExit(main())
