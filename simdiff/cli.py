"""``simdiff`` command line: parse, build a config, call the library (all logic lives in the library).

    simdiff train CONFIG [--run-dir DIR] [--set key.path=value ...] [--no-resume]
    simdiff sample SOURCE [--sampler S --steps N --grid G --guidance W --interval LO HI --labels 0,1 --num N ...]
    simdiff eval SOURCE [--num N --metrics mnist_fd,fid,kid,precision_recall,accuracy,bpd (default: from the data)]
    simdiff likelihood SOURCE [--num N] [--method elbo|ode]
    simdiff detect IMAGES --model SOURCE [--method dire-free|dire]   (sample ... --hallucination-score K)
    simdiff compress IMAGE -o OUT.sdc [--rate N | --codec jpeg ...]; simdiff decompress OUT.sdc -o OUT.png
    simdiff sample CASCADE.yaml|CASCADE.safetensors [--aug-logsnr L] [--strip]; simdiff cascade pack|train-sr|sample
    simdiff sample RUN --condition-images DIR [--condition-mode each|concat|mean]; simdiff semantica train|sample|eval
    simdiff unlearn --method NAME --teacher RUN --forget FILE --retain FILE; simdiff eval RUN --unlearning
    simdiff edit IMAGE... --source-label 3 --target-label 8 [--model SOURCE] [--method ddim|edict|nulltext|ddpm ...]
    simdiff export SOURCE OUT.safetensors
    simdiff tune-grid RUN [--sampler unipc] [--steps 5 6 8 10] [--guidance W]   (then: sample RUN --grid tuned)
    simdiff quantize SOURCE OUT.safetensors [--preset w8a8|w4a8|w8a16] [--calibration trajectory|single|data] ...
    simdiff distill [CONFIG] --method NAME --teacher RUN [--student-steps K] [--run-dir DIR] [--set key=value ...]
    simdiff demo [--minutes M]
    simdiff serve [RUN_DIR_OR_FILE ...] [--host 127.0.0.1] [--port 8000] [--device auto]

SOURCE is a run directory, a checkpoint directory, an exported ``.safetensors`` file, or the short name of a model
shipped with the package: ``pretrained`` (class-conditional MNIST), ``pretrained-student`` (its 4-step distilled
student), ``pretrained-fashion`` (class-conditional Fashion-MNIST) or ``pretrained-text`` (text-to-image digits).
Errors print one line and exit with status 2. A distilled student samples only with the sampler and step count it
was distilled for (``simdiff sample SOURCE --info`` shows them); other ``--sampler`` / ``--steps`` values are
refused. A rolling-diffusion model samples a rollout
(``--frames N``: PNG strip, GIF and .npz) and ``eval`` scores its forecasts per lead time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from simdiff.configuration import ConfigError
from simdiff.shipped import PRETRAINED, resolve_source  # noqa: E402, F401  (PRETRAINED: re-exported)


def _source(value: str) -> Path:
    return resolve_source(value)


#: sampling flag -> SampleConfig field.
_SAMPLE_FLAGS = {"sampler": "--sampler", "steps": "--steps", "grid": "--grid", "guidance": "--guidance",
                 "interval": "--interval", "rescale": "--rescale", "eta": "--eta", "seed": "--seed", "num": "--num",
                 "batch_size": "--batch-size"}


def _sample_overrides(args: argparse.Namespace, base):
    """Apply sampling flags on top of a SampleConfig (each flag checked, with its name, by :func:`_check_flags`)."""
    changes = {}
    for name in ("sampler", "steps", "grid", "guidance", "rescale", "eta", "seed", "num", "batch_size"):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if getattr(args, "no_gaussian_start", False):
        changes["gaussian_start"] = False
    if getattr(args, "interval", None) is not None:
        changes["interval"] = tuple(args.interval)
    return dataclasses.replace(base, **changes)


def _check_flags(args: argparse.Namespace) -> torch.device:
    """Check every sampling flag given (by its name) and resolve ``--device``, before any model is loaded."""
    from simdiff.devices import resolve_device
    from simdiff.generate import sample_field_problem

    for field, flag in _SAMPLE_FLAGS.items():
        value = getattr(args, field, None)
        if value is None:
            continue
        problem = sample_field_problem(field, tuple(value) if field == "interval" else value)
        if problem is not None:
            raise ConfigError(f"{flag} {problem}" if problem.startswith("must") else f"{flag}: {problem}")
    return resolve_device(args.device, what="--device")


def _tuned(args: argparse.Namespace, scfg, loaded=None, device="cpu"):
    """The grid ``simdiff tune-grid`` stored in the run directory ``args.source`` when ``scfg.grid`` is "tuned"; the
    "calibrated" grid of ``loaded`` (measured once, cached beside the run or file) for a model with classes or none
    and no interval / rescale (others: measured by ``generate`` itself)."""
    if scfg.grid == "calibrated" and loaded is not None and scfg.interval is None and scfg.rescale == 0.0 \
            and (loaded.process is None or loaded.process.isotropic) and loaded.config.model.arch != "text_uvit":
        from simdiff.generate import gaussian_start_parts
        from simdiff.samplers.calibrate import calibrated_grid_for

        _, surrogate = gaussian_start_parts(loaded.model, scfg, process=loaded.process)
        return calibrated_grid_for(_source(args.source), loaded, scfg.steps,
                                   guidance=scfg.guidance if loaded.num_classes else 0.0, device=device,
                                   gaussian_start=surrogate is not None)
    if scfg.grid != "tuned":
        return None
    from simdiff.samplers.tune_cli import tuned_grid_for

    return tuned_grid_for(_source(args.source), scfg.sampler, scfg.steps, scfg.guidance)


def _check_model_flags(loaded, scfg) -> None:
    """Refuse flags the loaded model cannot honour (before sampling): guidance on an unconditional model."""
    text = loaded.config.model.arch == "text_uvit"  # guided on the empty prompt
    if scfg.guidance != 0.0 and loaded.num_classes == 0 and not text and not getattr(loaded.model, "guidance_input",
                                                                                      False):
        raise ConfigError(f"--guidance {scfg.guidance} needs a class-conditional model; this model is unconditional "
                          "(use --guidance 0)")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    from simdiff.samplers import GRID_KINDS, SAMPLERS

    p.add_argument("--sampler", choices=sorted(SAMPLERS), help="sampler (default: the run's sample.sampler)")
    p.add_argument("--steps", type=int, help="number of steps")
    p.add_argument("--grid", choices=sorted(GRID_KINDS) + ["tuned", "calibrated"],
                   help="step grid (tuned: the grid `simdiff tune-grid RUN` fitted for this sampler, steps and "
                        "guidance, read from the run directory; calibrated: a logistic in log-SNR fitted to a pilot "
                        "run of the model, cached beside it)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance weight w (0 = conditional)")
    p.add_argument("--interval", type=float, nargs=2, metavar=("LO", "HI"), help="guidance only for LO<=logSNR<=HI")
    p.add_argument("--rescale", type=float, help="guidance rescale phi in [0, 1]")
    p.add_argument("--eta", type=float, help="DDIM eta")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--num", type=int, help="number of images")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="images per sampling batch")
    p.add_argument("--no-gaussian-start", action="store_true",
                   help="start the calibrated grid at the schedule's first level instead of after the network-free "
                        "Gaussian start (models that carry their data moments)")
    p.add_argument("--device", default="auto",
                   help="auto (the first CUDA device if there is one, else the CPU), cpu, cuda, cuda:N or mps")


def cmd_train(args: argparse.Namespace) -> int:
    from simdiff.cascade.cli import cmd_train_sr, is_sr_config
    from simdiff.experiment import load_config, train

    if is_sr_config(args.config):  # a super-resolution stage (a config with an ``sr:`` section)
        return cmd_train_sr(args)

    cfg = load_config(args.config, args.set or [])
    run_dir = Path(args.run_dir or Path("runs") / cfg.name)
    summary = train(cfg, run_dir, resume=not args.no_resume)
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}, indent=1))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from simdiff.distill.experiment import distill, load_distill_config

    if args.old_steps is not None:
        raise ConfigError("distill --steps is now --student-steps (the student's sampling steps; train.steps counts "
                          "optimiser steps)")
    overrides = list(args.set or [])
    for key in ("method", "student_steps"):
        if getattr(args, key) is not None:
            overrides.append(f"{key}={getattr(args, key)}")
    cfg = load_distill_config(args.config, overrides)
    teacher = args.teacher if args.teacher is not None else cfg.teacher
    if teacher:
        cfg = dataclasses.replace(cfg, teacher=str(_source(teacher)))
    run_dir = Path(args.run_dir or Path("runs") / f"{cfg.name}_{cfg.method}")
    summary = distill(cfg, run_dir, resume=not args.no_resume)
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str, dict))}, indent=1))
    return 0


def _parse_labels(text: str | None, num: int, num_classes: int) -> torch.Tensor | None:
    if num_classes == 0:
        if text:
            raise ConfigError("--labels given but the model is unconditional")
        return None
    if not text:
        return torch.arange(num) % num_classes
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--labels must be comma-separated integers, got {text!r}") from None
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise ConfigError(f"--labels {bad[0]} out of range; the model has classes 0..{num_classes - 1}")
    return torch.tensor(values).repeat((num + len(values) - 1) // len(values))[:num]


def _refuse_pairs_run(loaded) -> None:
    if loaded.config.data.name == "pairs":
        raise ConfigError("an image-conditioned model: sample with --condition-images DIR, score with "
                          "simdiff semantica eval RUN")


def cmd_sample(args: argparse.Namespace) -> int:
    from simdiff.cascade.cascade import is_cascade_source
    from simdiff.generate import check_sample_config, generate
    from simdiff.images import check_output, save_grid, save_images
    from simdiff.runs import check_student_sampling, class_null_cond, describe, load_model

    if is_cascade_source(args.source):  # a cascade YAML or packed cascade: every stage in turn
        from simdiff.cascade.cli import cmd_sample_cascade

        return cmd_sample_cascade(args)
    if getattr(args, "condition_images", None):  # image-conditioned few-shot sampling (Semantica-style)
        from simdiff.semantica.sample import semantica_sample_command

        return semantica_sample_command(args)
    device = _check_flags(args)
    k = getattr(args, "hallucination_score", None)
    if k is not None and k < 2:
        raise ConfigError(f"--hallucination-score must be >= 2 (steps whose predictions are compared), got {k}")
    if not args.info:  # the outputs are checked before any model is loaded or image sampled
        if args.out_dir:
            check_output(args.out_dir, what="--out-dir", directory=True)
        if args.out or not args.out_dir:
            check_output(args.out or "samples.png", what="--out", image=True)
        if k is not None and getattr(args, "scores", None):
            check_output(args.scores, what="--scores")
    loaded = load_model(_source(args.source), device=device)
    _refuse_pairs_run(loaded)
    if args.info:
        print(describe(loaded))
        return 0
    if _is_rolling(loaded):  # frame-window models: a rollout (PNG strip, GIF, .npz), not an image grid
        from simdiff.video import run_rollout

        return run_rollout(args, loaded)
    discrete = _apply_discrete_flags(args, loaded)
    scfg = check_sample_config(_sample_overrides(args, loaded.config.sample), names=_SAMPLE_FLAGS)
    check_student_sampling(loaded.meta, scfg)
    _check_model_flags(loaded, scfg)
    if args.prompt or loaded.config.model.arch == "text_uvit":  # text-to-image: one grid row per prompt
        from simdiff.text_prompts import sample_command

        return sample_command(args, loaded, scfg, device=device, logsnrs=_tuned(args, scfg))
    labels = _parse_labels(args.labels, scfg.num, loaded.num_classes)
    start = time.perf_counter()
    if k is not None:  # trajectory-variance hallucination scores beside the samples
        from simdiff.detect.cli import sample_with_scores

        x = sample_with_scores(args, loaded, scfg, labels, device)
    else:
        x = generate(loaded.model, loaded.schedule, loaded.image_shape, scfg, labels=labels,
                     num_classes=loaded.num_classes, null_cond=class_null_cond(loaded.num_classes), device=device,
                     progress=True, process=loaded.process, logsnrs=_tuned(args, scfg, loaded, device))
    secs = time.perf_counter() - start
    if args.out_dir:
        save_images(x, args.out_dir)
        print(f"wrote {len(x)} images to {args.out_dir}")
    if (args.out or not args.out_dir) and discrete:  # text: a PNG strip and a .txt beside it; image tokens: a grid
        out = loaded.process.save_samples(x, Path(args.out or "samples.png"))
        print(f"wrote {len(x)} samples to {out}")
    elif args.out or not args.out_dir:
        out = Path(args.out or "samples.png")
        nrow = loaded.num_classes if loaded.num_classes and args.labels is None and scfg.num % loaded.num_classes == 0 \
            else None
        save_grid(x, out, nrow=nrow, scale=max(1, 64 // loaded.image_shape[-1]))
        print(f"wrote grid of {len(x)} images to {out}")
    name = f"{loaded.process.sampler} ({loaded.process.precision})" if discrete else scfg.sampler
    print(f"{name}, {scfg.steps} steps: {len(x) / secs:.1f} samples/s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from simdiff.eval import check_metrics
    from simdiff.generate import check_sample_config
    from simdiff.images import check_output
    from simdiff.runs import check_student_sampling, evaluate_model, load_model, model_metrics

    device = _check_flags(args)
    metrics = None if args.metrics in (None, "auto") else tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    num = 1000 if args.num is None else args.num
    if metrics is not None:
        try:
            check_metrics(metrics, None, None, num=num)
        except ConfigError as e:
            raise ConfigError(f"--metrics: {e}") from None
    if args.json:
        check_output(args.json, what="--json")
    if args.unlearning:
        from simdiff.eval.unlearning import evaluate_unlearning_run

        scores = evaluate_unlearning_run(args.source, teacher=args.teacher, num=args.num or 200,
                                         sample_cfg=None, device=device)
        print(json.dumps(scores, indent=1))
        if args.json:
            _write_text(Path(args.json), json.dumps(scores, indent=1))
        return 0
    if args.teacher:
        raise ConfigError("--teacher is for --unlearning only")
    loaded = load_model(_source(args.source), device=device)
    _refuse_pairs_run(loaded)
    if _is_rolling(loaded):  # forecasts scored against held-out trajectories per lead time
        from simdiff.video import run_rollout_eval

        result = run_rollout_eval(args, loaded)
        print(json.dumps(result, indent=1))
        if args.json:
            _write_text(Path(args.json), json.dumps(result, indent=1))
        return 0
    scfg = check_sample_config(_sample_overrides(args, loaded.config.sample), names=_SAMPLE_FLAGS)
    check_student_sampling(loaded.meta, scfg)
    _check_model_flags(loaded, scfg)
    if loaded.config.model.arch == "text_uvit":  # captions of test images as prompts: FID/KID + prompt adherence
        from simdiff.text_prompts import evaluate_text_model

        result = evaluate_text_model(loaded, scfg, num=num, metrics=metrics or ("fid", "kid"), device=device,
                                     progress=True)
    else:
        metrics = model_metrics(loaded, metrics, num=num)  # a bad metric is refused before the grid is measured
        result = evaluate_model(loaded, scfg, num=num, metrics=metrics, device=device,
                                logsnrs=_tuned(args, scfg, loaded, device))
    result = {"sampler": scfg.sampler, "steps": scfg.steps, "grid": scfg.grid, "num": num, **result}
    print(json.dumps(result, indent=1))
    if args.json:
        _write_text(Path(args.json), json.dumps(result, indent=1))
    return 0


_DISCRETE_FLAGS = {"discrete_sampler": ("sampler", "--discrete-sampler"),
                   "tokens_per_call": ("tokens_per_call", "--tokens-per-call"),
                   "precision": ("precision", "--precision")}


def _add_discrete_flags(p: argparse.ArgumentParser) -> None:
    from simdiff.discrete.masked import SAMPLERS
    from simdiff.discrete.sampling import PRECISIONS

    g = p.add_argument_group("masked discrete diffusion (default: the run's diffusion.process settings)")
    g.add_argument("--discrete-sampler", choices=SAMPLERS,
                   help="tau_leaping (a fixed grid of --steps) or first_hitting (exact unmasking times)")
    g.add_argument("--tokens-per-call", type=int, help="first_hitting: tokens unmasked per network call (1 = exact)")
    g.add_argument("--precision", choices=PRECISIONS, help="categorical sampling precision (float64: exact)")


def _apply_discrete_flags(args: argparse.Namespace, loaded) -> bool:
    """For a discrete model, rebuild its process with the discrete sampling flags; refuse them for any other model.
    Returns whether the model is discrete."""
    from simdiff.processes import build_process, is_discrete

    given = {key: getattr(args, attr) for attr, (key, _) in _DISCRETE_FLAGS.items()
             if getattr(args, attr, None) is not None}
    if not is_discrete(loaded.process):
        if given:
            flag = next(flag for key, flag in _DISCRETE_FLAGS.values() if key in given)
            raise ConfigError(f"{flag} applies to masked discrete diffusion models only")
        return False
    if given.get("tokens_per_call", 1) < 1:
        raise ConfigError(f"--tokens-per-call must be an integer >= 1, got {given['tokens_per_call']}")
    if given:  # the choices of the other two flags are checked by the parser
        loaded.process = build_process({**loaded.process.spec, **given}, loaded.schedule)
    return True


def _is_rolling(loaded) -> bool:
    from simdiff.processes import RollingDiffusion

    return isinstance(loaded.process, RollingDiffusion)


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``; none is left behind on failure."""
    import os
    import tempfile

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise ConfigError(f"{path}: cannot write ({e.strerror or e})") from None


def cmd_export(args: argparse.Namespace) -> int:
    from simdiff.train import export_inference

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    import yaml

    sample = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("sample.") or key.count(".") != 1:
            raise ConfigError(f"--set {item!r}: export takes sampling defaults only, as sample.FIELD=VALUE")
        sample[key.split(".", 1)[1]] = yaml.safe_load(value)
    out = export_inference(args.source, args.out, dtype=dtypes[args.dtype], sample=sample)
    print(f"exported EMA weights with config to {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_moments(args: argparse.Namespace) -> int:
    from simdiff.experiment import add_data_moments

    if args.rank is not None and args.rank < 1:
        raise ConfigError(f"--rank must be >= 1, got {args.rank}")
    path, m = add_data_moments(_source(args.source), rank=args.rank)
    groups = f"{m.num_classes} classes + the whole set" if m.num_classes else "the whole set"
    print(f"data moments ({groups}, rank {m.basis.shape[-1]}) stored in {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import math

    from simdiff.demo import run_demo
    from simdiff.eval import min_samples

    if not math.isfinite(args.minutes) or args.minutes <= 0:
        raise ConfigError(f"--minutes must be a positive number, got {args.minutes}")
    need = min_samples(("mnist_fd", "accuracy"))
    if args.num_eval < need:
        raise ConfigError(f"--num-eval must be >= {need} (the MNIST Fréchet distance needs a covariance), "
                          f"got {args.num_eval}")
    if args.num_fid != 0 and args.num_fid < min_samples(("fid",)):
        raise ConfigError(f"--num-fid must be 0 (no FID) or >= {min_samples(('fid',))}, got {args.num_fid}")

    run_demo(minutes=args.minutes, run_dir=Path(args.run_dir), num_eval=args.num_eval, num_fid=args.num_fid)
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit status 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"simdiff: error: {' '.join(message.split())} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from simdiff.cascade.cli import add_cascade_flags, add_cascade_parser
    from simdiff.compress.cli import add_compress_parsers
    from simdiff.detect.cli import add_detect_parser, add_hallucination_flags
    from simdiff.invert.cli import add_edit_parser
    from simdiff.likelihood.cli import add_likelihood_parser
    from simdiff.quant.cli import add_quantize_parser
    from simdiff.samplers.tune_cli import add_tune_grid_parser
    from simdiff.semantica.sample import add_condition_flags, add_semantica_parser
    from simdiff.serve import add_serve_parser
    from simdiff.text_prompts import add_prompt_flags
    from simdiff.unlearn.cli import add_unlearn_parser
    from simdiff.video import add_rollout_flags

    parser = _Parser(prog="simdiff", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a diffusion model from a YAML config")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--run-dir", help="output directory (default runs/<name>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.steps=100")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if the run dir has checkpoints")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="distil a trained teacher into a few-step student",
                       description="Distil a trained simdiff diffusion model (the teacher) into a few-step student "
                                   "with one of: progressive, guided, consistency, moment_matching, em. CONFIG is an "
                                   "optional YAML of DistillConfig fields (see configs/distill_progressive.yaml).")
    p.add_argument("config", nargs="?", help="optional YAML with DistillConfig fields")
    p.add_argument("--method", help="progressive | guided | guided_progressive | consistency | moment_matching | em")
    p.add_argument("--teacher", help="teacher run directory, checkpoint directory or exported .safetensors")
    p.add_argument("--student-steps", dest="student_steps", type=int,
                   help="the student's sampling steps (progressive: the final count); train.steps counts optimiser "
                        "steps")
    p.add_argument("--steps", dest="old_steps", type=int, help=argparse.SUPPRESS)  # refused: see --student-steps
    p.add_argument("--run-dir", help="output directory (default runs/<name>_<method>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. train.steps=100 or method_params.huber_c=0.01")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if the run dir has checkpoints")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("sample", help="sample images from a run, checkpoint, export or 'pretrained'")
    p.add_argument("source")
    _add_sampling_flags(p)
    add_rollout_flags(p)
    _add_discrete_flags(p)
    p.add_argument("--labels", help="comma-separated class labels (cycled); default: all classes in turn")
    add_prompt_flags(p)
    p.add_argument("--out", help="grid PNG path (default samples.png)")
    p.add_argument("--out-dir", help="also write individual PNGs here")
    p.add_argument("--info", action="store_true", help="print what the model is and exit")
    add_hallucination_flags(p)
    add_cascade_flags(p)
    add_condition_flags(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="sample and score against the data set's test split")
    p.add_argument("source")
    _add_sampling_flags(p)
    add_rollout_flags(p)
    p.add_argument("--metrics", default="auto",
                   help="comma-separated: mnist_fd, fid, kid, precision_recall, accuracy, bpd (bits/dim of test "
                        "images, no samples); default 'auto': MNIST-classifier metrics for 28x28 grey digits, "
                        "FID/KID/precision-recall otherwise")
    p.add_argument("--json", help="also write the scores to this JSON file")
    p.add_argument("--unlearning", action="store_true",
                   help="score an unlearned run against its original: forgetting, retention FD/KID, integrity + CI, "
                        "PSNR")
    p.add_argument("--teacher", help="with --unlearning: the original run (default: the one the run recorded)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write EMA weights + config to one .safetensors file")
    p.add_argument("source", help="run directory or checkpoint directory")
    p.add_argument("out")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="weight precision in the file (float16 halves its size)")
    p.add_argument("--set", action="append", metavar="sample.FIELD=VALUE",
                   help="replace a recorded sampling default, e.g. --set sample.grid=calibrated (repeatable)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("moments", help="store the training data's Gaussian moments with a run or exported model "
                       "(the Gaussian start of sampling; runs trained now have them)")
    p.add_argument("source", help="run directory or exported .safetensors file")
    p.add_argument("--rank", type=int, default=None, help="eigen-directions kept per class (default 32)")
    p.set_defaults(func=cmd_moments)

    p = sub.add_parser("demo", help="the shipped model, a short training run and their scores on one HTML page")
    p.add_argument("--minutes", type=float, default=5.0, help="training budget in wall-clock minutes (default 5)")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--num-eval", type=int, default=500, help="samples for MNIST Fréchet distance and accuracy")
    p.add_argument("--num-fid", type=int, default=0, help="samples for Inception FID (slow on CPU; 0 skips)")
    p.set_defaults(func=cmd_demo)
    add_quantize_parser(sub)
    add_likelihood_parser(sub)
    add_edit_parser(sub)
    add_detect_parser(sub)
    add_compress_parsers(sub)
    add_cascade_parser(sub)
    add_tune_grid_parser(sub)
    add_serve_parser(sub)
    add_unlearn_parser(sub)
    add_semantica_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error, already printed as one line (2)
        return e.code if isinstance(e.code, int) else 2
    from simdiff.data import DataError
    from simdiff.train import CheckpointError, NonFiniteError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, DataError, NonFiniteError, ValueError, FileNotFoundError) as e:
        return _error(e)
    except OSError as e:  # a file the OS refuses (permissions, a folder for a file, a full disk, ...)
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return _error(f"{where}{e.strerror or e}")
    except KeyboardInterrupt:
        resumable = args.command in ("train", "distill", "unlearn")
        print("simdiff: interrupted" + (" (the last checkpoint is intact; rerun the same command to resume)"
                                        if resumable else ""), file=sys.stderr)
        return 130


def _error(message: object) -> int:
    """Print ``simdiff: error: <message>`` as one line on stderr; the exit status 2."""
    text = " ".join(str(message).split()) or type(message).__name__
    print(f"simdiff: error: {text}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
