"""``simdiff detect``: per-image DIRE scores; and the hallucination-score option of ``simdiff sample``.

    simdiff detect IMAGES_DIR_OR_FILE --model SOURCE [--method dire-free|dire] [--classifier FILE]
        [--steps N] [--order 1|2|3] [--batch-size N] [--device D] [--json OUT.json]

SOURCE is what ``simdiff sample`` takes (a run, checkpoint, export or ``pretrained``). Images are read with the
folder loader at the model's size and channel count. ``dire-free`` prints the mean DIRE error (the model's own
samples score low); ``dire`` prints a classifier's probability that the image is generated (``--classifier``: a
file written by :func:`simdiff.detect.save_classifier`, e.g. by ``benchmarks/detect.py``; its grid settings are
used unless ``--steps`` / ``--order`` are given).

``simdiff sample SOURCE --hallucination-score K [--scores OUT.csv]`` samples as usual and writes each sample's
trajectory variance over the last K steps (:func:`add_hallucination_flags`, :func:`sample_with_scores`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from simdiff.configuration import ConfigError

__all__ = ["add_detect_parser", "cmd_detect", "add_hallucination_flags", "sample_with_scores", "read_images"]

METHODS = ("dire-free", "dire")


def add_detect_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``detect`` sub-command (its ``func`` is :func:`cmd_detect`)."""
    p = subparsers.add_parser("detect", help="score images as generated or real (DIRE reconstruction error)",
                              description="Invert each image to noise with DDIM and regenerate it with the model "
                                          "(DIRE, Wang et al. 2023); print one score per image.")
    p.add_argument("images", help="an image file or a folder of images (searched recursively)")
    p.add_argument("--model", required=True, help="run directory, checkpoint, exported .safetensors or 'pretrained'")
    p.add_argument("--method", choices=METHODS, default="dire-free",
                   help="dire-free: mean reconstruction error (low = looks generated); dire: classifier probability "
                        "of 'generated' (needs --classifier)")
    p.add_argument("--classifier", help="DIRE classifier .safetensors (for --method dire)")
    p.add_argument("--steps", type=int, help="inversion / reconstruction steps (default 10, or the classifier's)")
    p.add_argument("--order", type=int, choices=[1, 2, 3], help="inversion order (default 1: DDIM)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--json", help="also write the scores to this JSON file")
    p.set_defaults(func=cmd_detect)
    return p


def read_images(path: str | Path, *, size: int, channels: int) -> tuple[list[Path], torch.Tensor]:
    """``(files, images [N, C, H, W] in [-1, 1])`` of one image file or every image under a folder."""
    from simdiff.data.folder import scan_images
    from simdiff.images import load_image

    path = Path(path)
    if path.is_dir():
        files = scan_images(path)
        if not files:
            raise ConfigError(f"{path}: no image files found")
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(f"{path}: no such image file or folder")
    return files, torch.stack([load_image(f, size=size, channels=channels) for f in files])


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")


def cmd_detect(args: argparse.Namespace) -> int:
    """Load the model (and classifier), read the images, print ``score<TAB>path`` per image."""
    from simdiff.devices import resolve_device
    from simdiff.runs import load_model
    from simdiff.samplers import make_grid
    from simdiff.shipped import resolve_source

    from .dire import classifier_scores, dire_maps, dire_score, load_classifier

    _positive("--steps", args.steps)
    _positive("--batch-size", args.batch_size)
    net, info = None, {}
    if args.method == "dire":
        if not args.classifier:
            raise ConfigError("--method dire needs --classifier FILE (a DIRE classifier, e.g. from "
                              "benchmarks/detect.py); --method dire-free needs none")
        net, info = load_classifier(args.classifier)
    elif args.classifier:
        raise ConfigError("--classifier applies to --method dire only")
    steps = args.steps or int(info.get("steps", 10))
    order = args.order or int(info.get("order", 1))
    device = resolve_device(args.device, what="--device")
    loaded = load_model(resolve_source(args.model), device=device)
    c, h, w = loaded.image_shape
    if h != w:
        raise ConfigError(f"detect reads square images; the model's are {h}x{w}")
    files, x = read_images(args.images, size=h, channels=c)
    cond = {"labels": torch.full((x.shape[0],), loaded.num_classes, device=device)} if loaded.num_classes else None
    grid = make_grid(loaded.schedule, steps, kind=info.get("grid", "uniform_t"))
    maps = dire_maps(loaded.model, x.to(device), grid, cond=cond, process=loaded.process, order=order,
                     batch_size=args.batch_size).cpu()
    if net is None:
        scores, what = dire_score(maps), "mean DIRE error (low: looks generated)"
    else:
        scores, what = torch.sigmoid(classifier_scores(net, maps)), "P(generated) by the DIRE classifier"
    print(f"# {what}; {steps} steps, order {order}")
    for f, s in zip(files, scores.tolist()):
        print(f"{s:.6g}\t{f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"method": args.method, "steps": steps, "order": order,
                                               "scores": {str(f): s for f, s in zip(files, scores.tolist())}},
                                              indent=1) + "\n")
    return 0


def add_hallucination_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--hallucination-score K`` and ``--scores FILE`` to a sampling sub-parser (``simdiff sample``)."""
    parser.add_argument("--hallucination-score", dest="hallucination_score", type=int, metavar="K",
                        help="also score each sample by the variance of its x-prediction over the last K steps "
                             "(trajectory variance, Aithal et al. 2024; high = suspicious)")
    parser.add_argument("--scores", help="CSV of per-sample scores (default: the grid path with _scores.csv)")


def sample_with_scores(args: argparse.Namespace, loaded: Any, scfg: Any, labels: torch.Tensor | None,
                       device: Any) -> torch.Tensor:
    """Sample like :func:`simdiff.generate.generate` with trajectory-variance scores; write the scores CSV
    (``index,label,score``) and print the most suspicious indices. Returns the images ``[N, C, H, W]``."""
    from simdiff.runs import class_null_cond

    from .hallucination import generate_scored

    k = args.hallucination_score
    if k is None or k < 2:
        raise ConfigError(f"--hallucination-score must be >= 2 (steps whose predictions are compared), got {k}")
    x, s = generate_scored(loaded.model, loaded.schedule, loaded.image_shape, scfg, labels=labels,
                           num_classes=loaded.num_classes, null_cond=class_null_cond(loaded.num_classes),
                           process=loaded.process, last=k, device=device)
    out = Path(args.scores) if getattr(args, "scores", None) else \
        Path(getattr(args, "out", None) or "samples.png").with_name(
            Path(getattr(args, "out", None) or "samples.png").stem + "_scores.csv")
    lab = labels.tolist() if labels is not None else [""] * len(s)
    from simdiff.train.rundir import atomic_write_bytes

    atomic_write_bytes(out, ("index,label,score\n" + "".join(f"{i},{lab[i]},{v:.6g}\n"
                                                              for i, v in enumerate(s.tolist()))).encode())
    top = torch.argsort(s, descending=True)[:5].tolist()
    print(f"wrote trajectory-variance scores (last {k} steps) to {out}; most suspicious: {top}")
    return x
