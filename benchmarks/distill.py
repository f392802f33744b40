"""Few-step generation by distillation on MNIST: every ``simdiff.distill`` method at 1, 2, 4, 8 steps vs the teacher.

For each (method, student steps) pair the teacher (default: ``simdiff/pretrained/mnist_uvit.safetensors``, i.e.
``simdiff sample pretrained``) is distilled with :func:`simdiff.distill.experiment.distill` for ``--train-steps``
trainer steps at ``--batch`` images, then the student is sampled with the sampler it recorded (its
``sampler_spec``) and scored. The teacher is scored with ``--sampler`` on ``--grid`` at ``--teacher-steps``.

Scores (against the data set's test split, or the train split where there is none):

* MNIST FD: Fréchet distance of the MNIST classifier's 128-d features (``simdiff.eval.mnist``; any image size is
  resized to 28x28), on ``--fd-samples`` images;
* FID: offline Inception FID (``simdiff.eval.fid``), on ``--fid-samples`` images (0 skips it).

Training cost per student: images seen (``train steps x batch``, teacher calls per image differ by method) and wall
minutes of the distillation run (``guided_progressive`` adds its shared stage-one run's cost to every row).
Valid pairs: ``em`` distils a one-step generator (steps = 1 only); ``progressive`` / ``guided_progressive`` halve
from ``--progressive-start`` (default ``2 x steps``: one round) to the student's steps, so the start must be
``steps x 2^k``. Invalid pairs are listed as skipped.

Run: ``python benchmarks/distill.py [--quick]`` (``--quick``: a tiny teacher trained on the 8x8 ``digits`` data set
in about a minute, a few trainer steps per method, MNIST FD only). Writes ``<out>/distill.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, command_line, machine_info, table_markdown, table_text, write_json, write_text  # noqa: E402

from simdiff.configuration import from_dict  # noqa: E402
from simdiff.distill.experiment import DistillConfig, distill  # noqa: E402
from simdiff.eval import evaluate_samples  # noqa: E402
from simdiff.experiment import ExperimentConfig, load_model, reference_images  # noqa: E402
from simdiff.experiment import train as train_experiment  # noqa: E402
from simdiff.generate import SampleConfig, generate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRETRAINED = ROOT / "simdiff" / "pretrained" / "mnist_uvit.safetensors"
METHODS = ("progressive", "guided_progressive", "consistency", "moment_matching", "em")
#: the tiny 8x8 digits teacher of ``--quick`` (trains in about a minute on one CPU thread).
QUICK_TEACHER = {
    "name": "distill_bench_teacher",
    "data": {"name": "digits", "image_size": 8},
    "model": {"arch": "uvit", "parameterisation": "v",
              "options": {"channels": [32], "dim": 64, "depth": 2, "num_heads": 2, "num_res_blocks": 1}},
    "diffusion": {"schedule": {"name": "shifted_cosine", "image_size": 8, "noise_size": 32},
                  "weighting": "sigmoid", "cond_drop_prob": 0.1},
    "train": {"steps": 600, "batch_size": 64, "checkpoint_every": 0, "log_every": 50, "progress": False,
              "ema_half_life_images": 2000, "optim": {"lr": 2e-3, "warmup_steps": 20}},
    "sample": {"sampler": "unipc", "steps": 8, "grid": "uniform_t", "num": 16},
}
#: method_params of --quick (the library defaults assume long runs: 64-1280 teacher steps, 8 Langevin steps).
QUICK_PARAMS = {"consistency": {"teacher_steps": 8}, "em": {"langevin_steps": 1}}


def valid_pair(method: str, steps: int, progressive_start: int) -> str | None:
    """``None`` when ``method`` can distil a ``steps``-step student, else the reason it cannot."""
    if method == "em" and steps != 1:
        return "em distils a one-step generator"
    if method in ("progressive", "guided_progressive"):
        start = progressive_start or 2 * steps
        ratio, rem = divmod(start, steps)
        if start <= steps or rem or ratio & (ratio - 1):
            return f"progressive rounds cannot halve {start} -> {steps}"
    return None


class Scorer:
    """Samples -> {"mnist_fd", "fid"} against fixed reference images (feature statistics cached by key)."""

    def __init__(self, loaded, args: argparse.Namespace) -> None:
        self.n_fd, self.n_fid, self.device = args.fd_samples, args.fid_samples, args.device
        self.ref, key = reference_images(loaded.config, max(self.n_fd, self.n_fid, 1000))
        self.key = re.sub(r"[^A-Za-z0-9_.+-]+", "_", key)  # the stats cache allows no spaces/brackets in keys
        self.num_classes, self.args = loaded.num_classes, args

    def __call__(self, loaded, sample_cfg: SampleConfig) -> dict[str, Any]:
        num = max(self.n_fd, self.n_fid)
        labels = torch.arange(num) % self.num_classes if self.num_classes > 0 else None
        t0 = time.perf_counter()
        with torch.no_grad():
            x = generate(loaded.model, loaded.schedule, loaded.image_shape,
                         dataclasses.replace(sample_cfg, num=num, seed=self.args.seed, batch_size=self.args.batch),
                         labels=labels, num_classes=loaded.num_classes, device=self.device)
        out: dict[str, Any] = {"sample_seconds": time.perf_counter() - t0}
        for metric, n in (("mnist_fd", self.n_fd), ("fid", self.n_fid)):
            if n <= 0:
                out[metric] = None
                continue
            try:
                res = evaluate_samples(x[:n], self.ref, metrics=(metric,), reference_key=self.key, progress=False,
                                       device=self.device)
                out[metric] = float(res[metric])
            except Exception as e:  # noqa: BLE001 - a missing feature network must not lose the other numbers
                out[metric], out[f"{metric}_error"] = None, f"{type(e).__name__}: {e}"
        return out


def quick_teacher(work: Path, device: str) -> Path:
    cfg = from_dict(ExperimentConfig, {**QUICK_TEACHER, "train": {**QUICK_TEACHER["train"], "device": device}})
    t0 = time.perf_counter()
    train_experiment(cfg, work / "teacher")
    print(f"quick teacher: {cfg.train.steps} steps in {(time.perf_counter() - t0) / 60:.2f} min", flush=True)
    return work / "teacher"


def run_distill(args, teacher: str, method: str, steps: int, run_dir: Path, params: dict[str, Any]) -> dict:
    """One distillation run; returns its cost (images seen, minutes) and run directory."""
    train = {"steps": args.train_steps, "batch_size": args.batch, "checkpoint_every": 0, "progress": False,
             "log_every": max(args.train_steps // 10, 1), "ema_half_life_images": args.ema_half_life_images,
             "device": args.device, "seed": args.seed, "optim": {"lr": args.lr, "warmup_steps": args.warmup}}
    cfg = from_dict(DistillConfig, {"name": run_dir.name, "method": method, "teacher": teacher, "student_steps": steps,
                                    "method_params": params, "train": train, "sample": {"num": 16}})
    t0 = time.perf_counter()
    distill(cfg, run_dir, resume=False)
    return {"images_seen": args.train_steps * args.batch, "minutes": (time.perf_counter() - t0) / 60,
            "run_dir": str(run_dir)}


def method_params(args, method: str, steps: int) -> dict[str, Any]:
    params = dict(QUICK_PARAMS.get(method, {})) if args.quick else {}
    params.update(args.method_params.get(method, {}))
    if method in ("progressive", "guided_progressive"):
        params["start_steps"] = args.progressive_start or 2 * steps
    return params


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="simdiff_distill_bench_"))
    if work.is_dir() and any(work.iterdir()) and args.work:
        raise SystemExit(f"--work {work} is not empty (runs are never resumed or overwritten); pick a new directory")
    teacher_path = quick_teacher(work, args.device) if args.quick else Path(
        PRETRAINED if args.teacher == "pretrained" else args.teacher)
    if not teacher_path.exists():
        raise SystemExit(f"teacher {teacher_path} does not exist (train one, or pass --teacher RUN | FILE.safetensors)")
    teacher = load_model(teacher_path, device=args.device)
    score = Scorer(teacher, args)
    result: dict[str, Any] = {"teacher": {"path": str(teacher_path), "sampler": args.sampler, "grid": args.grid,
                                          "guidance": args.guidance, "rows": []}, "students": [], "skipped": []}
    for n in args.teacher_steps:
        cfg = SampleConfig(sampler=args.sampler, steps=n, grid=args.grid, guidance=args.guidance)
        row = {"steps": n, "sampler": args.sampler, "grid": args.grid, **score(teacher, cfg)}
        result["teacher"]["rows"].append(row)
        print(f"teacher {args.sampler}/{args.grid} {n} steps: {json.dumps(row)}", flush=True)

    stage_one: dict[str, Any] | None = None
    for method in args.methods:
        for steps in args.steps:
            why = valid_pair(method, steps, args.progressive_start)
            if why:
                result["skipped"].append({"method": method, "steps": steps, "why": why})
                continue
            row: dict[str, Any] = {"method": method, "steps": steps}
            try:
                src = str(teacher_path)
                if method == "guided_progressive":  # stage one once (w-conditioned student), shared by every K
                    if stage_one is None:
                        stage_one = run_distill(args, src, "guided", 2 * max(args.steps), work / "guided_stage1",
                                                dict(args.method_params.get("guided", {})))
                    src = stage_one["run_dir"]
                cost = run_distill(args, src, method, steps, work / f"{method}_{steps}",
                                   method_params(args, method, steps))
                if method == "guided_progressive":
                    cost["images_seen"] += stage_one["images_seen"]
                    cost["minutes"] += stage_one["minutes"]
                row.update(cost)
                student = load_model(cost["run_dir"], device=args.device)
                scfg = student.config.sample
                if getattr(student.model, "guidance_input", False):
                    scfg = dataclasses.replace(scfg, guidance=args.guidance)
                row.update({"sampler": scfg.sampler, **score(student, scfg)})
            except Exception as e:  # noqa: BLE001 - one failing method must not lose the others' numbers
                row["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            result["students"].append(row)
            print(f"{method} {steps} steps: {json.dumps(row)}", flush=True)
    result["work_dir"] = str(work)
    return result


def tables(result: dict[str, Any]) -> tuple[list[str], list[list[Any]], list[str], list[list[Any]]]:
    th = ["teacher sampler", "steps", "MNIST FD", "FID", "sample s"]
    t = result["teacher"]
    rows = sorted(t["rows"], key=lambda r: (r.get("sampler", t["sampler"]) != t["sampler"], r["steps"]))
    trows = [[f"{r.get('sampler', t['sampler'])}/{r.get('grid', t['grid'])}", str(r["steps"]), r["mnist_fd"], r["fid"],
              r["sample_seconds"]] for r in rows]
    sh = ["method", "steps", "sampler", "images seen", "minutes", "MNIST FD", "FID"]
    srows = []
    for r in result["students"]:
        if "error" in r:
            srows.append([r["method"], str(r["steps"]), "error: " + r["error"][:60], "-", "-", "-", "-"])
        else:
            srows.append([r["method"], str(r["steps"]), r["sampler"], str(r["images_seen"]), r["minutes"],
                          r["mnist_fd"], r["fid"]])
    return th, trows, sh, srows


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    m = result["machine"]
    th, trows, sh, srows = tables(result)
    t = result["teacher"]
    lines = [
        "## Few-step generation by distillation" + (" (--quick smoke run: NOT a result)" if args.quick else ""),
        "",
        f"Run {m['date']} on {m['platform']} ({m['cpu_count']} CPUs, {m.get('torch_threads')} torch threads), "
        f"torch {m['torch']}, device {args.device}. Command: `{result['command']}`.",
        "",
        f"Teacher: `{t['path']}`, sampled with the sampler/grid of each row, guidance w = "
        f"{t['guidance']}. Students: {args.train_steps} trainer steps x batch {args.batch} each, sampled with the "
        f"sampler they recorded; guided students get w = {args.guidance} as an input. MNIST FD on "
        f"{args.fd_samples} samples, FID (offline Inception) on {args.fid_samples} samples ('-' = not computed), "
        "both against the data set's test split (train split where it has none), same seed for every row.",
        "",
        "**Teacher**", "", table_markdown(th, trows), "", "**Students**", "", table_markdown(sh, srows), "",
    ]
    if result["skipped"]:
        lines += ["Skipped pairs: " + "; ".join(f"{s['method']} @ {s['steps']} ({s['why']})"
                                                for s in result["skipped"]) + ".", ""]
    lines += [
        "Caveats:",
        "",
        "* Images seen = trainer steps x batch; the teacher network calls per image differ by method (progressive: "
        "2 per example, consistency: its ADDIM segment, moment matching / EMD: auxiliary network updates), so "
        "wall minutes are the fairer cost on the same machine. `guided_progressive` rows include the stage-one "
        "(guided) run they share.",
        "* Every method gets the same trainer budget and library-default hyper-parameters (except those listed in "
        "the JSON); none was tuned per method, and the published recipes train 10^4-10^5 steps.",
        "* FD values from few samples are biased upwards (Fréchet distances shrink with N); compare rows with the "
        "same sample count only.",
    ]
    if args.quick:
        lines += ["* --quick: a tiny uvit teacher trained for about a minute on the 8x8 `digits` set (resized to "
                  "28x28 for MNIST features) and a handful of distillation steps. It proves the harness runs end "
                  "to end; its numbers say nothing about the methods."]
    lines += ["* Paper-scale run (needs a GPU; days on CPU): `python benchmarks/distill.py --device cuda "
              "--train-steps 20000 --batch 128 --fd-samples 10000 --fid-samples 10000 --progressive-start 256` "
              "(progressive students then halve 256 -> K over log2(256/K) rounds)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--teacher", default="pretrained", help="'pretrained', a run directory or an exported .safetensors")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=[*METHODS, "guided"],
                   help="methods to distil (none: teacher rows only)")
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8], help="student sampling steps")
    p.add_argument("--train-steps", type=int, default=2000, help="trainer steps per student")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-half-life-images", type=float, default=0.0, help="student EMA (0: none)")
    p.add_argument("--progressive-start", type=int, default=0,
                   help="progressive / guided_progressive teacher steps of the first round (0: 2 x steps)")
    p.add_argument("--method-params", type=json.loads, default={},
                   help='JSON {method: {param: value}}, e.g. \'{"em": {"langevin_steps": 4}}\'')
    p.add_argument("--fd-samples", type=int, default=5000)
    p.add_argument("--fid-samples", type=int, default=5000)
    p.add_argument("--teacher-steps", nargs="*", type=int, default=[8, 16, 32, 256],
                   help="teacher rows (none: students only, e.g. for a run split over processes; see --merge)")
    p.add_argument("--sampler", default="unipc", help="teacher sampler (simdiff.samplers.SAMPLERS)")
    p.add_argument("--grid", default="uniform_t", help="teacher step grid")
    p.add_argument("--guidance", type=float, default=0.0, help="CFG weight for the teacher and guided students")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work", default="", help="where student runs go (default: a fresh temporary directory)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="directory for distill.json / distill.md")
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny digits teacher, few steps, MNIST FD only")
    p.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                   help="no runs: merge the distill.json files of runs split over processes into one table")
    args = p.parse_args(argv)
    if args.merge:
        return args
    if args.quick:
        args.steps = [s for s in args.steps if s <= 2] or [1]
        args.train_steps, args.batch, args.lr, args.warmup = min(args.train_steps, 8), min(args.batch, 32), 1e-3, 0
        args.fd_samples, args.fid_samples = min(args.fd_samples, 300), 0
        args.teacher_steps = [s for s in args.teacher_steps if s <= 32] or [8]
    bad = [s for s in [*args.steps, *args.teacher_steps] if s < 1]
    if bad or args.train_steps < 1 or args.batch < 1:
        p.error(f"steps, --train-steps and --batch must be >= 1 (got {bad or [args.train_steps, args.batch]})")
    return args


def merge(paths: list[str]) -> tuple[dict[str, Any], argparse.Namespace]:
    """One result from the ``distill.json`` of runs split over processes (same flags except methods/teacher rows)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    keep = ("train_steps", "batch", "lr", "fd_samples", "fid_samples", "seed", "teacher", "guidance", "device")
    for p, part in zip(paths[1:], parts[1:]):
        diff = [k for k in keep if part["args"].get(k) != parts[0]["args"].get(k)]
        if diff:
            raise SystemExit(f"--merge: {p} differs from {paths[0]} in {', '.join(diff)}; only like runs merge")
    result = {**parts[0], "students": [], "skipped": []}
    result["teacher"] = {**parts[0]["teacher"], "rows": []}
    for part in parts:
        result["teacher"]["rows"] += part["teacher"]["rows"]
        result["students"] += part["students"]
        result["skipped"] += part["skipped"]
    result["command"] = " ; ".join(part["command"] for part in parts)
    result["total_minutes"] = max(part["total_minutes"] for part in parts)
    result["merged_from"] = list(paths)
    return result, argparse.Namespace(**{**parts[0]["args"], "quick": any(p["args"].get("quick") for p in parts)})


def write_results(result: dict[str, Any], args: argparse.Namespace, out: Path) -> None:
    """``out/distill.{json,md}`` and the two tables on stdout."""
    write_json("distill", result, out)
    write_text("distill.md", markdown(result, args), out)
    th, trows, sh, srows = tables(result)
    print(table_text(th, trows), table_text(sh, srows), sep="\n\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.merge:
        result, run_args = merge(args.merge)
        write_results(result, run_args, out)
        print(f"\nmerged {len(args.merge)} runs into {out / 'distill.json'} and {out / 'distill.md'}")
        return 0
    t0 = time.perf_counter()
    result = run(args)
    result.update({"machine": machine_info(), "command": command_line(), "args": vars(args),
                   "total_minutes": (time.perf_counter() - t0) / 60})
    write_results(result, args, out)
    print(f"\nwrote {out / 'distill.json'} and {out / 'distill.md'} ({result['total_minutes']:.1f} min)")
    return 1 if any("error" in r for r in result["students"]) or math.isnan(result["total_minutes"]) else 0


if __name__ == "__main__":
    sys.exit(main())
