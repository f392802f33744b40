"""Unlearning for conditional diffusion models: forget / retain sets, methods as loss objects on the trainer, runs.

* :mod:`simdiff.unlearn.sets` -- forget / retain set files (prompts or class labels, optional images, anchors) and
  the image pools the losses train on.
* :mod:`simdiff.unlearn.losses` -- ESD, gradient ascent, gradient difference, SalUn-style saliency masking, concept
  ablation, and their integrity-preserving ``_ip`` variants (distillation of the original model on retain pairs).
* :mod:`simdiff.unlearn.run` -- ``simdiff unlearn``: an unlearned copy of a run, trained by
  :class:`simdiff.train.Trainer` (exact resume, checkpoints, EMA), saved as an ordinary run.
* :mod:`simdiff.eval.unlearning` -- forgetting, retention quality and model integrity.
"""

from simdiff.unlearn.losses import (
    ESD,
    METHODS,
    ConceptAblation,
    GradientAscent,
    GradientDifference,
    SalUn,
    UnlearnLoss,
    method_class,
)
from simdiff.unlearn.run import UnlearnConfig, build_unlearn_loss, load_unlearn_config, unlearn
from simdiff.unlearn.sets import ConceptSet, PairedPools, Pool, encode_keys, make_pool, read_concept_set

__all__ = [
    "ESD",
    "METHODS",
    "ConceptAblation",
    "ConceptSet",
    "GradientAscent",
    "GradientDifference",
    "PairedPools",
    "Pool",
    "SalUn",
    "UnlearnConfig",
    "UnlearnLoss",
    "build_unlearn_loss",
    "encode_keys",
    "load_unlearn_config",
    "make_pool",
    "method_class",
    "read_concept_set",
    "unlearn",
]
