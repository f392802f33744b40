"""Image-conditioned few-shot generation (Semantica-style): frozen encoder x guidance weight, on held-out classes and
a held-out data set.

For each ``--encoders`` entry a model of ``simdiff/configs/semantica_mnist.yaml`` (MNIST digits 0-6, same-class
pairs) is trained for ``--steps`` steps of ``--batch`` (warm-up ``min(200, steps // 10)``, checkpoint at the end
only). Then, for each guidance weight of ``--guidance``, samples are conditioned on ``--shots`` test images of each
of these groups (mode ``each``: sample ``i`` uses conditioning image ``i mod shots``), ``--num`` samples per class:

* held-out classes: MNIST digits 7, 8, 9 (never seen in training);
* seen class: MNIST digit 3 (a training class, test images) for reference;
* held-out data set: Fashion-MNIST classes 1 (trouser), 7 (sneaker), 8 (bag), scored with the Fashion classifier;
* held-out data set: Animal-MNIST silhouettes bird (1), elephant (5), zebra (9), scored on Inception features (no
  Animal-MNIST classifier: "class agreement" is the fraction whose nearest test image of the three classes, in
  Inception features, is of the conditioning class).

Columns (means over the classes of a group): Fréchet distance and KID on the domain classifier's 128-d features
(unnormalised activations, so both are in the features' own units, larger than Inception values) against the
class's other test images, precision / recall (k = 3), class agreement (fraction the domain
classifier assigns to the conditioning class) and the copy fraction (samples within 0.05 RMS of a conditioning
image). Writes ``benchmarks/results/semantica.{json,md}`` and ``benchmarks/results/semantica_grid.png`` (per encoder
and group: the conditioning images, then samples at guidance ``--grid-guidance``). Runs live in ``--run-dir``
(default ``/tmp/semantica_bench``); a rerun with the same settings resumes instead of retraining.

Run (CPU, small; about 17 minutes of training per encoder at 0.4 s/step, 7 minutes of sampling and scoring)::

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/semantica.py --steps 2500 --batch 32 --num 48 --sample-steps 12

``--groups Animal`` evaluates only the groups whose name contains "Animal" (with the same settings, the trained
runs are reused).

``--data photos`` trains ``simdiff/configs/semantica_photos.yaml`` instead (pairs: two 32x32 crops of one of five
training photos) and scores the held-out test photos (Inception features, photo agreement); the ``--shots``
conditioning patches of a photo are spread evenly over its raster-ordered patches (first to last)::

    OMP_NUM_THREADS=1 python benchmarks/semantica.py --data photos --encoders contrastive_photos mnist_classifier \
        --steps 2000 --num 32 --guidance 0 1 --sample-steps 12 --name semantica_photos
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_info, table_markdown, write_json, write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "simdiff" / "configs" / "semantica_mnist.yaml"
#: ``--encoders`` entries: ``NAME[,tokens=global|spatial][,pairing=same_class|shifted_self]``.
GROUPS = {"held-out digits 7,8,9": ("mnist", (7, 8, 9)), "seen digit 3": ("mnist", (3,)),
          "held-out Fashion 1,7,8": ("fashion_mnist", (1, 7, 8)),
          "held-out Animal-MNIST bird, elephant, zebra": ("animal_mnist", (1, 5, 9))}
#: ``--data`` -> (config, evaluation groups). ``photos``: two crops of one photo; the held-out photos are the test
#: split's (chelsea = 5, china = 6), scored on Inception features with photo agreement as the "class agreement".
DATA = {"mnist": (CONFIG, GROUPS),
        "photos": (ROOT / "simdiff" / "configs" / "semantica_photos.yaml",
                   {"held-out photos chelsea, china": ("photos", (5, 6))})}


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """``"mnist_classifier,tokens=spatial"`` -> ``("mnist_classifier", {"tokens": "spatial"})``."""
    name, *rest = spec.split(",")
    options = dict(part.split("=", 1) for part in rest)
    unknown = set(options) - {"tokens", "pairing"}
    if unknown:
        raise SystemExit(f"--encoders {spec}: unknown option(s) {sorted(unknown)} (tokens=, pairing=)")
    return name, options


def train_run(spec: str, args) -> tuple[Path, float]:
    from simdiff.runs import load_config
    from simdiff.semantica import encoder_width, train_semantica

    encoder, options = parse_variant(spec)
    tokens = {"tokens": options["tokens"]} if "tokens" in options else {}
    run = Path(args.run_dir) / f"{args.data}_{spec.replace(',', '_').replace('=', '-')}_{args.steps}x{args.batch}"
    overrides = [f"data.options.encoder={encoder}", f"model.options.context_dim={encoder_width(encoder, tokens)}",
                 f"data.options.pairing={options.get('pairing', 'same_class')}",
                 f"train.steps={args.steps}", f"train.batch_size={args.batch}",
                 f"train.optim.warmup_steps={min(200, args.steps // 10)}", f"train.checkpoint_every={args.steps}",
                 "train.sample_every=0", "train.progress=false", "train.log_every=100"]
    start = time.perf_counter()
    cfg = load_config(DATA[args.data][0], overrides)
    if tokens:
        import dataclasses

        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, options={**cfg.data.options, "encoder_options": tokens}))
    train_semantica(cfg, run)
    return run, time.perf_counter() - start


def evaluate(run: Path, args) -> tuple[list[dict], dict]:
    from simdiff.runs import load_model
    from simdiff.semantica.metrics import condition_picks, fewshot_report
    from simdiff.semantica.pairs import load_source
    from simdiff.semantica.sample import sample_from_condition_images

    loaded = load_model(run)
    rows, grids = [], {}
    groups = {g: v for g, v in DATA[args.data][1].items() if not args.groups or any(k in g for k in args.groups)}
    for w in args.guidance:
        for group, (source, classes) in groups.items():
            start = time.perf_counter()
            rep = fewshot_report(run, source=source, classes=classes, shots=args.shots, num=args.num, guidance=w,
                                 steps=args.sample_steps, loaded=loaded)
            rows.append({"guidance": w, "group": group, **rep["mean"], "seconds": time.perf_counter() - start})
            print(f"[semantica] {run.name} w={w} {group}: {rep['mean']}", flush=True)
    for group, (source, classes) in groups.items():
        test = load_source(source, "test")
        for c in classes:
            members = test.images[test.labels == c]
            cond = members[condition_picks(len(members), args.shots, spread=source == "photos")]
            x, _ = sample_from_condition_images(loaded, cond, 8, args.grid_guidance, seed=c, steps=args.sample_steps)
            grids[(group, c)] = (cond, x)
    return rows, grids


def save_grid_png(all_grids: dict, path: Path, shots: int) -> Path:
    from simdiff.images import save_grid

    tiles = []
    for (_encoder, _group, _c), (cond, x) in all_grids.items():
        blank = torch.full((1, *cond.shape[1:]), -1.0)
        tiles.append(torch.cat([cond, blank, x]))
    return save_grid(torch.cat(tiles), path, nrow=shots + 1 + 8, scale=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoders", nargs="+", default=["mnist_classifier", "contrastive"],
                   help="NAME[,tokens=global|spatial][,pairing=same_class|shifted_self] (NAME: mnist_classifier, "
                        "contrastive, inception)")
    p.add_argument("--data", choices=sorted(DATA), default="mnist",
                   help="mnist: digits 0-6 (held out: 7-9 and Fashion-MNIST); photos: two crops of one photo (held "
                        "out: the test photos)")
    p.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--num", type=int, default=64, help="samples per class")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--grid-guidance", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--run-dir", default="/tmp/semantica_bench")
    p.add_argument("--name", default="semantica")
    p.add_argument("--groups", nargs="+", help="evaluate only the groups whose name contains one of these words")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import simdiff.semantica  # noqa: F401  (registers the pairs data set)

    start = time.perf_counter()
    table, grids, train_secs = [], {}, {}
    for encoder in args.encoders:
        run, secs = train_run(encoder, args)
        train_secs[encoder] = round(secs, 1)
        rows, g = evaluate(run, args)
        table += [{"encoder": encoder, **r} for r in rows]
        grids.update({(encoder, *k): v for k, v in g.items()})
    header = ["encoder", "guidance", "group", "FD", "KID", "precision", "recall", "class agr.", "copies"]
    body = [[r["encoder"], f"{r['guidance']:g}", r["group"], f"{r['fd']:.0f}", f"{r['kid']:.3g}",
             f"{r['precision']:.2f}", f"{r['recall']:.2f}", f"{r['class_agreement']:.2f}",
             f"{r['copy_fraction']:.2f}"] for r in table]
    wall = time.perf_counter() - start
    info = machine_info()
    md = (f"{info['date']}, {info.get('platform', '')}, {args.threads} thread(s); `{command_line()}`; wall-clock "
          f"{wall / 60:.1f} min (training: {train_secs} s)\n\n" + table_markdown(header, body) + "\n")
    write_text(f"{args.name}.md", md)
    write_json(args.name, {"machine": info, "command": command_line(), "args": vars(args), "rows": table,
                           "train_seconds": train_secs, "wall_seconds": wall})
    png = save_grid_png(grids, ROOT / "benchmarks" / "results" / f"{args.name}_grid.png", args.shots)
    print(md)
    print(f"grid: {png} (rows: encoder x group x class; {args.shots} conditioning images, a gap, 8 samples at "
          f"guidance {args.grid_guidance:g}; encoders in order {args.encoders})")


if __name__ == "__main__":
    main()
