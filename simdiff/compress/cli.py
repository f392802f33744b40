"""``simdiff compress`` / ``simdiff decompress``: images to ``.sdc`` files and back.

    simdiff compress IMAGE -o OUT.sdc [--rate N] [--codec learned|jpeg|webp|avif|jxl] [--quality Q | --bpp B]
        [--model CODEC.safetensors]
    simdiff decompress IN -o OUT.png [--model CODEC.safetensors] [--diffusion DECODER.safetensors
        [--steps S] [--eta E] [--seed K] [--guidance W] [--tile T]]

IMAGE is any file Pillow reads (PNG, JPEG, ...). ``--codec learned`` (default) uses the shipped hyperprior model
for ``--rate`` (0 = fewest bits, :func:`shipped_model_path`) or ``--model``; a standard codec takes ``--quality``
or searches the quality for ``--bpp``. ``decompress`` also reads plain JPEG/WebP/AVIF/JPEG XL files, so
``--diffusion`` can sharpen any JPEG at exactly its bits. Outputs are written atomically (nothing on failure).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from simdiff.configuration import ConfigError

from .format import CODECS, Header, pack, unpack, write_atomic
from .standard import STANDARD_CODECS, StandardCodec, decode_native, search_quality, sniff

__all__ = ["add_compress_parsers", "cmd_compress", "cmd_decompress", "shipped_model_path", "MODELS_DIR"]

MODELS_DIR = Path(__file__).parent / "models"


def shipped_model_path(rate: int) -> Path:
    """``simdiff/compress/models/hp_q{rate}.safetensors`` (ConfigError naming the rates that exist if absent)."""
    path = MODELS_DIR / f"hp_q{rate}.safetensors"
    if not path.is_file():
        have = sorted(int(p.stem[4:]) for p in MODELS_DIR.glob("hp_q*.safetensors") if p.stem[4:].isdigit())
        raise ConfigError(f"no shipped codec model for rate {rate} (have: {', '.join(map(str, have)) or 'none'}); "
                          "pass --model CODEC.safetensors")
    return path


def _load_codec(model: str | None, rate: int):
    from .learned import HyperpriorCodec

    return HyperpriorCodec.load(model if model else shipped_model_path(rate))


def read_image(path: str | Path) -> np.ndarray:
    """Any Pillow-readable image -> uint8 ``[H, W, 3]`` (RGB) or ``[H, W, 1]`` (grey)."""
    try:
        with Image.open(path) as im:
            im.load()
            grey = im.mode in ("1", "L", "I;16", "I", "F")
            arr = np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise ConfigError(f"{path}: cannot read image ({str(e).splitlines()[0] if str(e) else e})") from None
    return arr[..., None].copy() if arr.ndim == 2 else arr.copy()


def write_png(path: str | Path, image: np.ndarray) -> None:
    """uint8 ``[H, W, C]`` -> PNG at ``path``, atomically."""
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


def add_compress_parsers(subparsers) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Add ``compress`` and ``decompress`` to an ``argparse`` sub-parser set."""
    c = subparsers.add_parser("compress", help="compress an image to a .sdc file",
                              description="Compress an image with the learned codec (hyperprior, range-coded) or a "
                                          "standard codec, into a .sdc file.")
    c.add_argument("image", help="input image (PNG, JPEG, ...)")
    c.add_argument("-o", "--output", required=True, help="output .sdc path")
    c.add_argument("--codec", choices=CODECS, default="learned", help="base-layer codec")
    c.add_argument("--rate", type=int, default=2, help="learned codec: shipped model index (0 = fewest bits)")
    c.add_argument("--model", help="learned codec: a codec .safetensors instead of the shipped one")
    c.add_argument("--quality", type=int, help="standard codec: quality 0..100")
    c.add_argument("--bpp", type=float, help="standard codec: highest quality within this many bits per pixel")
    c.set_defaults(func=cmd_compress)
    d = subparsers.add_parser("decompress", help="decode a .sdc (or JPEG/WebP/AVIF/JXL) file to PNG",
                              description="Decode a .sdc file, optionally refining the base layer with a diffusion "
                                          "decoder.")
    d.add_argument("input", help=".sdc file, or a JPEG/WebP/AVIF/JPEG XL file")
    d.add_argument("-o", "--output", required=True, help="output PNG path")
    d.add_argument("--model", help="learned codec .safetensors (default: the shipped model named in the file)")
    d.add_argument("--diffusion", help="diffusion decoder .safetensors to refine the base reconstruction")
    d.add_argument("--steps", type=int, default=8, help="diffusion decoder steps")
    d.add_argument("--eta", type=float, default=0.0, help="0 deterministic DDIM, 1 stochastic")
    d.add_argument("--seed", type=int, default=0, help="noise seed (same seed, same output)")
    d.add_argument("--guidance", type=float, default=0.0, help="guidance weight on the base layer")
    d.add_argument("--tile", type=int, help="diffusion decoder: predict on overlapping tiles of this side "
                                            "(blended every step, no seams; bounds memory on large images)")
    d.set_defaults(func=cmd_decompress)
    return c, d


def cmd_compress(args: argparse.Namespace) -> int:
    """Run ``simdiff compress``; returns the exit code (errors are raised as ConfigError)."""
    image = read_image(args.image)
    start = time.perf_counter()
    if args.codec == "learned":
        if args.quality is not None or args.bpp is not None:
            raise ConfigError("--quality/--bpp are for standard codecs; the learned codec takes --rate")
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        data = _load_codec(args.model, args.rate).compress(image)
    else:
        if (args.quality is None) == (args.bpp is None):
            raise ConfigError(f"--codec {args.codec} needs exactly one of --quality or --bpp")
        quality = args.quality if args.bpp is None else search_quality(image, args.codec, args.bpp)[0]
        data = StandardCodec(args.codec).compress(image, quality)
    write_atomic(args.output, data)
    h, w = image.shape[:2]
    print(f"{args.output}: {len(data)} bytes, {len(data) * 8 / (h * w):.4f} bpp ({h}x{w}, {args.codec}, "
          f"{time.perf_counter() - start:.2f} s)")
    return 0


def cmd_decompress(args: argparse.Namespace) -> int:
    """Run ``simdiff decompress``; returns the exit code (errors are raised as ConfigError)."""
    try:
        raw = Path(args.input).read_bytes()
    except OSError as e:
        raise ConfigError(f"{args.input}: cannot read ({e.strerror or e})") from None
    start = time.perf_counter()
    rate = 0
    if sniff(raw) is not None:
        image = decode_native(raw, where=args.input)
        codec = sniff(raw)
    else:
        header, payload = unpack(raw, where=args.input)
        codec, rate = header.codec, header.rate
        image = _decode_sdc(header, payload, args)
    if args.diffusion:
        image = _refine(image, args, rate if codec == "learned" else None)
    write_png(args.output, image)
    print(f"{args.output}: {image.shape[0]}x{image.shape[1]} from {codec}"
          f"{' + diffusion decoder' if args.diffusion else ''} ({time.perf_counter() - start:.2f} s)")
    return 0


def _decode_sdc(header: Header, payload: bytes, args: argparse.Namespace) -> np.ndarray:
    if header.codec in STANDARD_CODECS:
        return StandardCodec(header.codec).decompress(pack(header, payload), where=args.input)
    if args.model:
        codec = _load_codec(args.model, header.rate)
    else:
        if header.model_id != f"hp-q{header.rate}":
            raise ConfigError(f"{args.input}: made by model {header.model_id!r}, not a shipped one; pass --model")
        codec = _load_codec(None, header.rate)
    return codec.decode_payload(header, payload, where=args.input)


def _refine(image: np.ndarray, args: argparse.Namespace, rate: int | None) -> np.ndarray:
    import torch

    from .diffusion import decode, load_decoder

    model = load_decoder(args.diffusion)
    if image.shape[2] != model.cfg.image_channels:
        image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :1]
    base = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    labels = None
    if model.cfg.num_rates and rate is not None:
        labels = torch.tensor([min(rate, model.cfg.num_rates - 1)])
    x = decode(model, base, steps=args.steps, eta=args.eta, seed=args.seed, guidance=args.guidance, labels=labels,
               tile=args.tile)
    return ((x[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy().copy()
