"""``simdiff quantize SOURCE OUT.safetensors``: post-training quantisation from the command line.

    simdiff quantize SOURCE OUT.safetensors [--preset w8a8|w4a8|w8a16] [--config QUANT.yaml] [--set key=value ...]
        [--calibration trajectory|single|data] [--act-range minmax|percentile|mse] [--num-calib N]
        [--group-size G] [--no-split] [--eval N]

SOURCE is what ``simdiff sample`` takes (a run, checkpoint, export or ``pretrained``). Settings are applied in the
order preset, YAML (:class:`~simdiff.quant.QuantConfig` fields), ``--set``, then the explicit flags; e.g.
``--preset w4a8 --set reconstruction=adaround`` learns the int4 rounding (layer-wise AdaRound).
"""

from __future__ import annotations

import argparse
import json

from simdiff.configuration import ConfigError, apply_overrides, from_dict, load_yaml

from .model import PRESETS, QuantConfig, layer_table

__all__ = ["add_quantize_parser", "cmd_quantize", "quant_config_from_args"]


def add_quantize_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``quantize`` sub-command to an ``argparse`` sub-parser set (its ``func`` is :func:`cmd_quantize`)."""
    p = subparsers.add_parser("quantize", help="post-training quantisation (Q-Diffusion) to a .safetensors file",
                              description="Quantise a trained denoiser's weights (int8 per channel / int4 group-"
                                          "wise) and activations (int8, calibrated on the float model's own "
                                          "sampling trajectories by default) and write it with its scales.")
    p.add_argument("source", help="run directory, checkpoint directory, exported .safetensors or 'pretrained'")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--preset", choices=sorted(PRESETS), default="w8a8", help="weight/activation precision")
    p.add_argument("--config", help="YAML of QuantConfig fields (e.g. act_range: mse)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a QuantConfig field")
    p.add_argument("--calibration", choices=["trajectory", "single", "data"], help="calibration set")
    p.add_argument("--act-range", dest="act_range", choices=["minmax", "percentile", "mse"])
    p.add_argument("--num-calib", dest="num_calib", type=int, help="calibration examples")
    p.add_argument("--group-size", dest="group_size", type=int, help="int4 weight group size")
    p.add_argument("--no-split", dest="split_skips", action="store_false", default=None,
                   help="one quantiser for concatenated skip inputs (no shortcut splitting)")
    p.add_argument("--eval", dest="eval_num", type=int, default=0,
                   help="also sample N images from the quantised model and score them (0: skip)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.set_defaults(func=cmd_quantize)
    return p


def quant_config_from_args(args: argparse.Namespace) -> QuantConfig:
    """Preset -> YAML -> ``--set`` -> flags, validated (ConfigError on a bad key or value)."""
    data = dict(PRESETS[args.preset])
    if args.config:
        data.update(load_yaml(args.config))
    data = apply_overrides(data, list(args.set or []))
    for name in ("calibration", "act_range", "num_calib", "group_size", "split_skips"):
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    return from_dict(QuantConfig, data, where="quant")


def cmd_quantize(args: argparse.Namespace) -> int:
    """Load SOURCE, calibrate and quantise, save OUT, print a JSON summary (and scores with ``--eval``)."""
    from simdiff.devices import resolve_device
    from simdiff.images import check_output
    from simdiff.runs import evaluate_model, load_model
    from simdiff.shipped import resolve_source

    from .io import quantize_loaded, save_quantized

    cfg = quant_config_from_args(args)
    if not str(args.out).endswith(".safetensors"):
        raise ValueError(f"quantize: the output must be a .safetensors file, got {args.out}")
    check_output(args.out, what="OUT")  # before any model is loaded or calibrated
    if args.eval_num < 0:
        raise ConfigError(f"--eval must be >= 0, got {args.eval_num}")
    device = resolve_device(args.device, what="--device")
    source = resolve_source(args.source)
    loaded = load_model(source, device=device)
    qloaded = quantize_loaded(loaded, cfg)
    out = save_quantized(qloaded, args.out)
    rows = layer_table(qloaded.model)
    kernels: dict[str, int] = {}
    for r in rows:
        kernels[r["kernel"]] = kernels.get(r["kernel"], 0) + 1
    summary = {"out": str(out), "bytes": out.stat().st_size, "weight_bits": cfg.weight_bits,
               "activations": cfg.activations, "calibration": cfg.calibration, "num_calib": cfg.num_calib,
               "split_layers": sum(1 for r in rows if r.get("split") and len(r["split"]) > 1), "layers": kernels}
    if args.eval_num > 0:
        summary["scores"] = evaluate_model(qloaded, loaded.config.sample, num=args.eval_num, device=device)
    print(json.dumps(summary, indent=1))
    return 0
