"""Detection of generated images and hallucination scores (``simdiff.detect``, ``simdiff detect``).

* :mod:`~simdiff.detect.hallucination`: trajectory variance of the x-prediction (Aithal et al. 2024) as a
  per-sample hallucination score, computed inside a sampling run through the sampler callback.
* :mod:`~simdiff.detect.dire`: DIRE reconstruction-error maps (Wang et al. 2023), a small CNN on them and the
  training-free mean-error score.
* :mod:`~simdiff.detect.metrics`: AUROC, ROC curve, accuracy, filtering tables.
* :mod:`~simdiff.detect.toys`: the Gaussian-mixture toys of mode interpolation with a small trained denoiser.
"""

from simdiff.detect.dire import (
    DIREClassifier,
    classifier_scores,
    dire_maps,
    dire_score,
    load_classifier,
    save_classifier,
    train_classifier,
)
from simdiff.detect.hallucination import TrajectoryVariance, generate_scored, scored_sample
from simdiff.detect.metrics import accuracy, auroc, best_threshold, filter_table, roc_curve

__all__ = [
    "TrajectoryVariance",
    "scored_sample",
    "generate_scored",
    "dire_maps",
    "dire_score",
    "DIREClassifier",
    "train_classifier",
    "classifier_scores",
    "save_classifier",
    "load_classifier",
    "auroc",
    "roc_curve",
    "accuracy",
    "best_threshold",
    "filter_table",
]
