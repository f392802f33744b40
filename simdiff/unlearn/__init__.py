"""Unlearning for conditional diffusion models: forget / retain sets, methods as loss objects on the trainer, runs.

* :mod:`simdiff.unlearn.sets` -- forget / retain set files (prompts or class labels, optional images, anchors) and
  the image pools the losses train on.
* :mod:`simdiff.unlearn.losses` -- ESD, gradient ascent, gradient difference, SalUn-style saliency masking, concept
  ablation, and their integrity-preserving ``_ip`` variants (distillation of the original model on retain pairs).
* :mod:`simdiff.unlearn.run` -- ``simdiff unlearn``: an unlearned copy of a run, trained by
  :class:`simdiff.train.Trainer` (exact resume, checkpoints, EMA), saved as an ordinary run.
* :mod:`simdiff.eval.unlearning` -- forgetting, retention quality and model integrity.

The names below are loaded on first use, so ``simdiff.unlearn.cli`` (the argument parser) imports neither the
trainer nor the losses.
"""

from __future__ import annotations

import importlib
from typing import Any

#: the baseline methods; every one also exists as ``<name>_ip`` (integrity-preserving).
BASE_METHODS: tuple[str, ...] = ("esd", "ascent", "graddiff", "salun", "ablation")
#: every method name: the baselines and their integrity-preserving ``_ip`` variants.
METHODS: tuple[str, ...] = tuple(n for b in BASE_METHODS for n in (b, f"{b}_ip"))

_LAZY = {
    "ESD": "losses", "ConceptAblation": "losses", "GradientAscent": "losses", "GradientDifference": "losses",
    "SalUn": "losses", "UnlearnLoss": "losses", "method_class": "losses",
    "UnlearnConfig": "run", "build_unlearn_loss": "run", "load_unlearn_config": "run", "unlearn": "run",
    "ConceptSet": "sets", "PairedPools": "sets", "Pool": "sets", "encode_keys": "sets", "make_pool": "sets",
    "read_concept_set": "sets",
}

__all__ = ["BASE_METHODS", "METHODS", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"simdiff.unlearn.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'simdiff.unlearn' has no attribute {name!r}")
