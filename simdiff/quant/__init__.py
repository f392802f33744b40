"""Timestep-aware post-training quantisation of simdiff denoisers (Q-Diffusion, Li et al. 2023).

* :mod:`~simdiff.quant.quantizers`: int8 per-channel / int4 group-wise weights, int8 per-tensor activations, ranges;
* :mod:`~simdiff.quant.modules`: quantised Linear / Conv / attention layers (which run real int8 kernels: see there);
* :mod:`~simdiff.quant.calibrate`: trajectory, single-level and noised-data calibration sets;
* :mod:`~simdiff.quant.model`: :class:`QuantConfig`, :func:`quantize_model` (module swap, shortcut splitting,
  calibration);
* :mod:`~simdiff.quant.reconstruct`: optional layer-wise AdaRound (learned weight rounding);
* :mod:`~simdiff.quant.io`: :func:`quantize_loaded`, :func:`save_quantized`, :func:`load_quantized`;
* :mod:`~simdiff.quant.cli`: the ``simdiff quantize`` sub-command.
"""

from .calibrate import (
    CALIBRATIONS,
    CalibrationSet,
    noised_data_set,
    record_trajectories,
    select_single_level,
    select_uniform_steps,
)
from .cli import add_quantize_parser, cmd_quantize
from .io import QUANT_FORMAT, build_calibration, is_quantized_file, load_quantized, quantize_loaded, save_quantized
from .model import PRESETS, QuantConfig, apply_spec, calibrate_model, find_concat_inputs, layer_table, quantize_model
from .modules import ActQuant, QuantAttention, QuantLayer

__all__ = [
    "CALIBRATIONS", "CalibrationSet", "noised_data_set", "record_trajectories", "select_single_level",
    "select_uniform_steps", "add_quantize_parser", "cmd_quantize", "QUANT_FORMAT", "build_calibration",
    "is_quantized_file", "load_quantized", "quantize_loaded", "save_quantized", "PRESETS", "QuantConfig",
    "apply_spec", "calibrate_model", "find_concat_inputs", "layer_table", "quantize_model", "ActQuant",
    "QuantAttention", "QuantLayer",
]
