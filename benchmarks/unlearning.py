"""Unlearning methods at equal update budget on one original model: forgetting, retention quality and integrity.

Every method of :data:`simdiff.unlearn.METHODS` fine-tunes a copy of ``--teacher`` for ``--steps`` optimiser steps
(batch ``--batch-size`` forget pairs + as many retain pairs, learning rate ``--lr``; the same pools of the original
model's samples for every method, generated once) and is scored by :func:`simdiff.eval.unlearning.evaluate_unlearning`
with ``--num`` samples per set and model through the original's sampler (eta 0, one seed):

* forget rate: the fraction of forget-key samples in which the judge still finds the forget concept (before ->
  after; digit class by the MNIST classifier, or on a text model the class of every object the prompt names;
  nearest mixture component on ``gmm_images``); retain rate: the same judge on retain keys (after);
* retention FD / KID: Fréchet distance and KID of the unlearned model's retain samples against the original's
  (MNIST-classifier features for grey MNIST-like data, Inception for RGB, pixels for synthetic data);
* integrity [95% bootstrap CI]: pair-by-pair feature distance to the original's sample of the same key and seed,
  mapped to [0, 1] (see :mod:`simdiff.eval.unlearning`); PSNR of the pairs (dB).

The claim under test (Schioppa, Hoogeboom & Heek 2024): baselines that look fine on FID lose integrity, and the
integrity-preserving ``_ip`` variants (distillation of the original on retain prompts) keep it at similar
forgetting. The ``_ip`` losses and the integrity metric here are this library's documented versions; the paper's
exact losses and metric were not retrievable.

Defaults: on a text model the forget set is every prompt about the digit 7 (:data:`TEXT_FORGET`) and the retain set
prompts about the other digits (:data:`TEXT_RETAIN`); on a class-conditional model class 0 is forgotten and the
others kept. ``--forget`` / ``--retain`` take set files (:mod:`simdiff.unlearn.sets`).

Run::

    nice -n 10 python benchmarks/unlearning.py --teacher pretrained-text --steps 200
    python benchmarks/unlearning.py --teacher RUN --smoke --results-dir /tmp/u    # a few steps, a few samples

Writes ``<results-dir>/unlearning.{json,md}``, sample grids ``unlearning_before.png`` and
``unlearning_<method>.png`` (rows: forget keys, then retain keys; same seeds in every grid) and the before/after
figure ``unlearning_grid.png`` (one row per model: the original, then each method in the table's order; columns:
two samples each of the first and last forget key, then of the first and last retain key, same seeds); the
unlearned runs go to ``--runs-dir`` (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, command_line, machine_info, table_markdown, table_text, write_json, write_text  # noqa: E402

from simdiff.eval.unlearning import evaluate_unlearning  # noqa: E402
from simdiff.images import save_grid  # noqa: E402
from simdiff.runs import load_model  # noqa: E402
from simdiff.shipped import resolve_source  # noqa: E402
from simdiff.unlearn import METHODS, load_unlearn_config, unlearn  # noqa: E402
from simdiff.unlearn.run import concept_grid, concept_samples, model_conditioner  # noqa: E402

#: default forget / retain prompts of a text model (the captions' own phrasings of single digits).
TEXT_FORGET = ("a 7", "a thick 7", "a thin slanted 7", "seven, upright", "a picture of a 7")
TEXT_RETAIN = ("a 1", "a thick 2", "a slanted 3", "a thin 4", "five, upright", "a 6", "an 8",
               "nine, thick and slanted", "a 0")
DEFAULT_TEACHER = "pretrained-text"
HEADER = ["method", "forget rate (before -> after)", "retain rate", "retention FD", "retention KID", "integrity",
          "integrity 95% CI", "PSNR dB", "unlearn s"]


def _write_set(path: Path, keys) -> Path:
    path.write_text(json.dumps({"prompts" if isinstance(keys[0], str) else "labels": list(keys)}))
    return path


def _default_sets(loaded, text: bool, work: Path) -> tuple[Path, Path]:
    if text:
        return _write_set(work / "forget.json", TEXT_FORGET), _write_set(work / "retain.json", TEXT_RETAIN)
    return (_write_set(work / "forget.json", [0]),
            _write_set(work / "retain.json", list(range(1, loaded.num_classes))))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="the original run (default: %(default)s)")
    p.add_argument("--forget", help="forget set file (default: see the module docstring)")
    p.add_argument("--retain", help="retain set file")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="methods to run (default: all)")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps per method (the update budget)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--pool-size", type=int, default=256)
    p.add_argument("--num", type=int, default=200, help="evaluation samples per set and model")
    p.add_argument("--anchor", default="", help="concept ablation's anchor (default: the unconditional input)")
    p.add_argument("--smoke", action="store_true", help="3 steps, 16 samples, pools of 16 (checks it runs)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--runs-dir", type=Path, default=None, help="where the unlearned runs go (default: temporary)")
    p.add_argument("--name", default="unlearning")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.num, args.pool_size, args.batch_size = 3, 16, 16, 8
    torch.set_num_threads(args.threads)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
    start = time.perf_counter()
    args.teacher = str(resolve_source(args.teacher))  # "pretrained-text": the shipped text-to-image model
    original = load_model(args.teacher, device=args.device)
    conditioner, text = model_conditioner(original, device=args.device)
    tmp = tempfile.TemporaryDirectory()
    work = Path(tmp.name)
    runs_dir = args.runs_dir or work / "runs"
    forget, retain = (Path(args.forget), Path(args.retain)) if args.forget else _default_sets(original, text, work)
    overrides = [f"teacher={json.dumps(str(args.teacher))}", f"forget={json.dumps(str(forget))}",
                 f"retain={json.dumps(str(retain))}", f"anchor={json.dumps(args.anchor)}",
                 f"pool_size={args.pool_size}", f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
                 f"train.optim.lr={args.lr}", f"train.device={args.device}", "train.progress=false",
                 f"train.checkpoint_every={max(args.steps, 1)}"]
    base = load_unlearn_config(None, overrides)
    f_keys, r_keys = _keys(forget, text), _keys(retain, text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    concept_grid(original.model, original, conditioner, f_keys, r_keys, args.results_dir / f"{args.name}_before.png",
                 device=args.device)
    strip_keys = [f_keys[0], f_keys[-1], r_keys[0], r_keys[-1]]  # one row per model in the combined figure

    def strip(model) -> torch.Tensor:
        return concept_samples(model, original, conditioner, strip_keys, per_key=2, device=args.device)

    strips = [strip(original.model)]
    results, rows = {}, []
    pools = None
    for method in args.methods:
        cfg = dataclasses.replace(base, method=method, name=f"unlearn_{method}")
        run = runs_dir / method
        run.mkdir(parents=True, exist_ok=True)
        ablation = method.startswith("ablation")  # trains on the anchor's images: its own forget pool
        if pools is not None and not ablation and not (run / "unlearn_pools.safetensors").exists():
            (run / "unlearn_pools.safetensors").write_bytes(pools.read_bytes())  # the same pairs for every method
        t0 = time.perf_counter()
        summary = unlearn(cfg, run)
        seconds = time.perf_counter() - t0
        if pools is None and not ablation:
            pools = run / "unlearn_pools.safetensors"
        unlearned = load_model(run, device=args.device)
        scores = evaluate_unlearning(original, unlearned, f_keys, r_keys, num=args.num, device=args.device)
        concept_grid(unlearned.model, original, conditioner, f_keys, r_keys,
                     args.results_dir / f"{args.name}_{method}.png", device=args.device)
        strips.append(strip(unlearned.model))
        results[method] = {**scores, "unlearn_seconds": seconds, "final_loss": summary.get("loss")}
        rows.append([method, f"{scores.get('forget_rate_before', float('nan')):.2f} -> "
                             f"{scores.get('forget_rate', float('nan')):.2f}",
                     scores.get("retain_rate"), scores.get("retain_fd"), scores.get("retain_kid"),
                     scores["integrity"], f"[{scores['integrity_lo']:.3f}, {scores['integrity_hi']:.3f}]",
                     scores["psnr"], seconds])
        print(f"{method}: {json.dumps({k: round(v, 4) for k, v in scores.items() if isinstance(v, float)})}",
              flush=True)
    save_grid(torch.cat(strips), args.results_dir / f"{args.name}_grid.png", nrow=2 * len(strip_keys),
              scale=max(1, 64 // original.image_shape[-1]))
    total = time.perf_counter() - start
    header = (f"Unlearning on {args.teacher} ({'text' if text else 'class'} model): {args.steps} steps x batch "
              f"{args.batch_size}, lr {args.lr}, {args.num} evaluation samples per set; wall-clock {total:.0f} s")
    print(header)
    print(table_text(HEADER, rows))
    machine = machine_info()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(args.name, {"command": command_line(), "machine": machine, "settings": settings, "forget": f_keys,
                           "retain": r_keys, "results": results, "wall_clock_s": total}, args.results_dir)
    md = f"{header}\n\nMachine: {machine.get('processor')}, {machine.get('date')}. Command: `{command_line()}`\n\n"
    write_text(f"{args.name}.md", md + table_markdown(HEADER, rows), args.results_dir)
    tmp.cleanup()
    return {"results": results, "wall_clock_s": total}


def _keys(path: Path, text: bool) -> list:
    from simdiff.unlearn import read_concept_set

    return list(read_concept_set(path, text=text).keys)


if __name__ == "__main__":
    main()
