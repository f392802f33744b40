"""``simdiff likelihood SOURCE``: bits per dimension of a model on real test images.

    simdiff likelihood SOURCE [--num N] [--method elbo|ode] [--conditional] [--num-times T] [--probes P]
        [--steps S] [--solver rk4|heun|euler|adaptive] [--dequantization uniform|gaussian] [--seed S] [--json OUT]

SOURCE is what ``simdiff sample`` takes (a run, checkpoint, export or ``pretrained``). Prints one JSON object: the
mean bits per dimension with its standard error over the images (``bpd_se``), the estimator's Monte-Carlo error
(``bpd_mc_se``), the terms, the settings and the wall-clock.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from simdiff.configuration import ConfigError

__all__ = ["add_likelihood_parser", "cmd_likelihood"]


def add_likelihood_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``likelihood`` sub-command (its ``func`` is :func:`cmd_likelihood`)."""
    p = subparsers.add_parser("likelihood", help="bits per dimension on the test split (VDM ELBO or PF-ODE)",
                              description="Score a model's likelihood on real test images: the VDM variational "
                                          "bound (elbo) or the exact probability-flow ODE likelihood (ode).")
    p.add_argument("source", help="run directory, checkpoint directory, exported .safetensors or 'pretrained'")
    p.add_argument("--num", type=int, default=256, help="test images (default 256)")
    p.add_argument("--method", choices=["elbo", "ode"], default="elbo")
    p.add_argument("--conditional", action="store_true", help="score log p(x | label) instead of log p(x)")
    p.add_argument("--num-times", dest="num_times", type=int, default=32, help="elbo: log-SNR draws per image")
    p.add_argument("--sampling", choices=["stratified", "antithetic", "iid"], default="stratified",
                   help="elbo: how the log-SNR draws are spread")
    p.add_argument("--proposal", choices=["fitted", "uniform", "schedule"], default="fitted",
                   help="elbo: importance density over log-SNR")
    p.add_argument("--probes", type=int, default=1, help="ode: Rademacher probes per image")
    p.add_argument("--steps", type=int, default=24, help="ode: fixed solver steps")
    p.add_argument("--solver", choices=["rk4", "heun", "euler", "adaptive"], default="rk4")
    p.add_argument("--dequantization", choices=["uniform", "gaussian"], default="uniform", help="ode only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--json", help="also write the result to this JSON file")
    p.set_defaults(func=cmd_likelihood)
    return p


def cmd_likelihood(args: argparse.Namespace) -> int:
    """Load SOURCE, score ``--num`` test images, print (and optionally write) a JSON summary."""
    from simdiff.devices import resolve_device
    from simdiff.eval.likelihood import heldout_images, likelihood_of_loaded
    from simdiff.images import check_output
    from simdiff.runs import load_model

    if args.num < 2:
        raise ConfigError(f"--num must be >= 2 (a standard error needs two images), got {args.num}")
    if args.json:
        check_output(args.json, what="--json")
    if args.method == "elbo":
        options = {"num_times": args.num_times, "sampling": args.sampling, "proposal": args.proposal}
    else:
        if args.probes < 1 or args.steps < 1:
            raise ConfigError(f"--probes and --steps must be >= 1, got {args.probes} and {args.steps}")
        options = {"probes": args.probes, "steps": args.steps, "solver": args.solver,
                   "dequantization": args.dequantization}
    device = resolve_device(args.device, what="--device")
    from simdiff.shipped import resolve_source

    source = resolve_source(args.source)
    loaded = load_model(source, device=device)
    x, labels = heldout_images(loaded.config, args.num)
    start = time.perf_counter()
    try:
        result = likelihood_of_loaded(loaded, x, labels, method=args.method, conditional=args.conditional,
                                      seed=args.seed, device=device, **options)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = {"method": args.method, "conditional": args.conditional, **result.summary(), **result.info,
           "seconds": round(time.perf_counter() - start, 2)}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0
