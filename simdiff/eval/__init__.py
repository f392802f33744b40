"""Evaluation metrics: FID / KID / precision-recall on offline Inception features, and MNIST-classifier
Fréchet distance and accuracy (see :mod:`simdiff.eval.features` and :mod:`simdiff.eval.mnist` for the networks).
"""

from simdiff.eval.evaluate import (
    FEATURE_SPACES,
    METRICS,
    MNIST_DATA,
    MNIST_METRICS,
    check_metrics,
    default_metrics,
    evaluate_samples,
    min_samples,
)
from simdiff.eval.features import InceptionFeatures
from simdiff.eval.fid import feature_stats, frechet_distance, frechet_distance_features, kid
from simdiff.eval.mnist import MNISTFeatures
from simdiff.eval.prdc import precision_recall
from simdiff.eval.refstats import ReferenceStats, RefStats, default_cache_dir

__all__ = [
    "FEATURE_SPACES",
    "METRICS",
    "MNIST_DATA",
    "MNIST_METRICS",
    "InceptionFeatures",
    "MNISTFeatures",
    "RefStats",
    "ReferenceStats",
    "check_metrics",
    "default_cache_dir",
    "default_metrics",
    "evaluate_samples",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_features",
    "kid",
    "min_samples",
    "precision_recall",
]
