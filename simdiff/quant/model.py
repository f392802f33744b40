"""Post-training quantisation of a simdiff denoiser (Q-Diffusion, Li et al. 2023): config, module swap, calibration.

:func:`quantize_model` deep-copies a denoiser (a :class:`~simdiff.nets.DiffusionModel` or a distilled student
wrapper), swaps every ``nn.Linear`` / ``nn.Conv2d`` / ``nn.ConvTranspose2d`` for a :class:`QuantLayer` (except the
layers named in ``keep_float``: the first and last convolution by default, kept in float as is usual in PTQ; not
verified against Q-Diffusion's paper) and every :class:`~simdiff.nets.layers.Attention` for a
:class:`QuantAttention`, then runs the calibration inputs through it to set the activation ranges. The result is the
same kind of module with the same call signature, so every sampler, guidance and student wrapper runs on it.

Shortcut splitting: a one-batch trace records every ``torch.cat`` (a ``TorchFunctionMode``); a Linear/Conv whose
input is such a concatenation along its channel dimension, and the ``conv1`` / ``skip`` convolutions of a
:class:`~simdiff.nets.layers.ResBlock` whose input is one (``conv1`` sees ``SiLU(GroupNorm(cat))``, which keeps the
channel positions), are split at the branch boundaries (:class:`QuantLayer`). The U-Net's and U-ViT's up-path
blocks are where this happens; the residual U-ViT (SiD2) has no concatenated skips, so nothing is split there.

Calibration order: weights are quantised first, then every activation range is observed in one pass of the
calibration set through the model with quantised weights and float activations (no sequential calibration). With
``reconstruction="adaround"`` each layer's weight rounding is then learned on the calibration inputs
(:mod:`simdiff.quant.reconstruct`, layer-wise, not BRECQ's block-wise reconstruction).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from simdiff.configuration import ConfigError, to_dict
from simdiff.nets.layers import Attention, ResBlock

from .calibrate import CALIBRATIONS, CalibrationSet
from .modules import ACT_MODES, ActQuant, QuantAttention, QuantLayer
from .quantizers import ACT_RANGES

__all__ = ["QuantConfig", "PRESETS", "quantize_model", "apply_spec", "find_concat_inputs", "layer_table",
           "calibrate_model"]

_QUANTISABLE = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


@dataclass(frozen=True)
class QuantConfig:
    """How to quantise and calibrate.

    Attributes:
        weight_bits: 8 (per output channel) or 4 (group-wise, ``group_size`` consecutive fan-in elements).
        activations: "int8" (per-tensor calibrated, asymmetric), "float16" (W8A16: weight-only, inputs rounded to
            float16), "none" (weight-only, float32 inputs).
        act_range: "minmax", "percentile" (two-sided ``percentile``) or "mse" (see :class:`RangeObserver`).
        split_skips: separate quantisers for the branches of concatenated skips (shortcut splitting).
        attention: quantise the inputs of the attention matmuls (q, k, v, softmax output).
        keep_float: last names of modules left in float (default: the first and last convolution).
        int8_kernels: run int8-weight int8-activation Linear layers on ``torch._int_mm``.
        calibration: "trajectory", "single" or "data" (:mod:`simdiff.quant.calibrate`).
        num_calib: calibration examples. calib_runs: trajectories recorded (trajectory / single).
        calib_sampler / calib_steps / calib_guidance: the float model's sampling for the recording (sampler
            ``None``: the model's own ``sample.sampler``).
        single_level: the grid fraction of the single-level calibration (0 noisiest, 1 cleanest).
        reconstruction: "adaround" learns each layer's weight rounding on the calibration inputs after the
            activation ranges are set (:mod:`simdiff.quant.reconstruct`, ``recon_iters`` Adam steps per layer);
            "none" rounds to nearest.
    """

    weight_bits: int = 8
    group_size: int = 32
    activations: Literal["int8", "float16", "none"] = "int8"
    act_range: Literal["minmax", "percentile", "mse"] = "minmax"
    percentile: float = 99.99
    split_skips: bool = True
    attention: bool = True
    keep_float: tuple[str, ...] = ("stem", "conv_in", "head", "conv_out")
    int8_kernels: bool = True
    calibration: Literal["trajectory", "single", "data"] = "trajectory"
    num_calib: int = 256
    calib_runs: int = 32
    calib_sampler: str | None = None
    calib_steps: int = 20
    calib_guidance: float = 0.0
    single_level: float = 0.5
    reconstruction: Literal["none", "adaround"] = "none"
    recon_iters: int = 300
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.weight_bits not in (4, 8):
            raise ConfigError(f"quant weight_bits must be 4 or 8, got {self.weight_bits}")
        if self.activations not in ACT_MODES:
            raise ConfigError(f"quant activations must be one of {', '.join(ACT_MODES)}, got {self.activations!r}")
        if self.act_range not in ACT_RANGES:
            raise ConfigError(f"quant act_range must be one of {', '.join(ACT_RANGES)}, got {self.act_range!r}")
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"quant calibration must be one of {', '.join(CALIBRATIONS)}, got {self.calibration!r}")
        if self.group_size < 2 or self.group_size % 2:
            raise ConfigError(f"quant group_size must be an even number >= 2, got {self.group_size}")
        if self.reconstruction not in ("none", "adaround"):
            raise ConfigError(f"quant reconstruction must be none or adaround, got {self.reconstruction!r}")
        for name in ("num_calib", "calib_runs", "calib_steps", "batch_size", "recon_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"quant {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.single_level <= 1.0:
            raise ConfigError(f"quant single_level must be in [0, 1], got {self.single_level}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"quant percentile must be in (50, 100], got {self.percentile}")


#: named settings of ``simdiff quantize --preset``.
PRESETS: dict[str, dict] = {
    "w8a8": {"weight_bits": 8, "activations": "int8"},
    "w4a8": {"weight_bits": 4, "activations": "int8"},
    "w8a16": {"weight_bits": 8, "activations": "float16"},
}


class _CatRecorder(TorchFunctionMode):
    """Remembers the outputs of ``torch.cat`` (kept alive so their ids stay unique) with the branch sizes."""

    def __init__(self):
        super().__init__()
        self.cats: dict[int, tuple[torch.Tensor, int, list[int]]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.cat:
            tensors = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            dim = dim % out.dim()
            self.cats[id(out)] = (out, dim, [int(t.shape[dim]) for t in tensors])
        return out


def find_concat_inputs(model: nn.Module, z, logsnr, cond) -> dict[str, list[int]]:
    """Names of the Linear/Conv layers of ``model`` whose input channels are a concatenation -> branch sizes."""
    rec = _CatRecorder()
    found: dict[str, list[int]] = {}
    handles = []

    def make_hook(name: str, mod: nn.Module):
        def hook(_m, args):
            if not args or not torch.is_tensor(args[0]) or id(args[0]) not in rec.cats:
                return
            x, dim, sizes = rec.cats[id(args[0])]
            if x is not args[0] or len(sizes) < 2:
                return
            if isinstance(mod, nn.Linear) and dim == x.dim() - 1:
                found[name] = sizes
            elif isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)) and dim == 1:
                found[name] = sizes
            elif isinstance(mod, ResBlock) and dim == 1:
                found[f"{name}.conv1"] = sizes
                if isinstance(mod.skip, nn.Conv2d):
                    found[f"{name}.skip"] = sizes
        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, (*_QUANTISABLE, ResBlock)):
            handles.append(mod.register_forward_pre_hook(make_hook(name, mod)))
    try:
        with torch.inference_mode(), rec:
            model(z, logsnr, **cond)
    finally:
        for h in handles:
            h.remove()
    return found


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def apply_spec(model: nn.Module, spec: dict) -> nn.Module:
    """Swap ``model``'s layers in place as ``spec`` (from :func:`quantize_model`) records; returns ``model``.

    Used both to quantise and to rebuild a saved quantised model (whose codes and scales are then loaded)."""
    qc = spec["config"]
    for name, entry in spec["layers"].items():
        mod = model.get_submodule(name)
        if not isinstance(mod, _QUANTISABLE):
            raise ConfigError(f"quantisation spec names {name!r}, which is a {type(mod).__name__}, not a Linear/Conv")
        _set(model, name, QuantLayer(mod, weight_bits=qc["weight_bits"], group_size=qc["group_size"],
                                     act=qc["activations"], split=entry.get("split"),
                                     int8_kernel=qc["int8_kernels"]))
    for name in spec["attention"]:
        mod = model.get_submodule(name)
        if not isinstance(mod, Attention):
            raise ConfigError(f"quantisation spec names {name!r} as attention, but it is a {type(mod).__name__}")
        _set(model, name, QuantAttention(mod, qc["activations"]))
    return model


def calibrate_model(model: nn.Module, calib: CalibrationSet, cfg: QuantConfig) -> None:
    """Observe every int8 activation over ``calib`` (batches of ``cfg.batch_size``) and freeze the ranges."""
    quants = [m for m in model.modules() if isinstance(m, ActQuant)]
    for q in quants:
        q.start_observing(cfg.act_range, cfg.percentile)
    if any(q.state == "observe" for q in quants):
        with torch.inference_mode():
            for z, logsnr, cond in calib.batches(cfg.batch_size):
                model(z, logsnr, **cond)
    for q in quants:
        q.freeze()


def quantize_model(model: nn.Module, calib: CalibrationSet | None, cfg: QuantConfig = QuantConfig()) -> nn.Module:
    """A quantised copy of ``model`` (same call signature), calibrated on ``calib``.

    ``calib`` may be ``None`` only when nothing needs it (``activations`` not "int8" and ``split_skips`` off).
    The copy carries ``quant_spec`` (a JSON-safe dict: config, quantised layer names with their splits, attention
    module names) for :func:`simdiff.quant.save_quantized`.
    """
    needs_data = cfg.activations == "int8" or cfg.split_skips or cfg.reconstruction != "none"
    if calib is None and needs_data:
        raise ValueError("quantize_model needs calibration inputs for int8 activations or shortcut splitting")
    qmodel = copy.deepcopy(model).eval().requires_grad_(False)
    splits = {}
    if cfg.split_skips:
        z, logsnr, cond = next(calib.subset(torch.arange(min(2, len(calib)))).batches(2))
        splits = find_concat_inputs(qmodel, z, logsnr, cond)
    layers = {}
    for name, mod in qmodel.named_modules():
        if isinstance(mod, _QUANTISABLE) and name.rpartition(".")[2] not in cfg.keep_float:
            layers[name] = {"split": splits.get(name)}
    attention = []
    if cfg.attention and cfg.activations != "none":
        attention = [name for name, mod in qmodel.named_modules() if isinstance(mod, Attention)]
    spec = {"config": to_dict(cfg), "layers": layers, "attention": attention,
            "calibration": None if calib is None else {"kind": calib.kind, "num": len(calib)}}
    apply_spec(qmodel, spec)
    if cfg.activations == "int8":
        calibrate_model(qmodel, calib, cfg)
    if cfg.reconstruction == "adaround":
        if calib is None:
            raise ValueError("adaround reconstruction needs calibration inputs")
        from .reconstruct import adaround_model

        adaround_model(qmodel, model, calib, iters=cfg.recon_iters, batch_size=cfg.batch_size, seed=cfg.seed)
    qmodel.quant_spec = spec
    return qmodel


def layer_table(model: nn.Module) -> list[dict]:
    """One row per quantised module of ``model``: name, type, weights, activations, split, kernel."""
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLayer):
            rows.append({"name": name, **mod.describe()})
        elif isinstance(mod, QuantAttention):
            rows.append({"name": name, "type": "attention matmuls", "weights": "-", "activations": mod.act,
                         "split": None, "kernel": "fake-quantised q, k, v, softmax; float32 matmul"})
        elif isinstance(mod, _QUANTISABLE):
            rows.append({"name": name, "type": type(mod).__name__, "weights": "float32", "activations": "float32",
                         "split": None, "kernel": "float"})
    return rows
