"""One call to score generated samples against a reference set (FID, MNIST-FD, KID, precision/recall, accuracy).

Feature extraction happens once per (image set, network); reference statistics can be cached on disk under a
``reference_key`` (see :mod:`simdiff.eval.refstats`), so repeated evaluations only extract sample features.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from simdiff.configuration import ConfigError
from simdiff.eval.features import InceptionFeatures, check_images
from simdiff.eval.fid import feature_stats, frechet_distance, kid
from simdiff.eval.mnist import MNISTFeatures
from simdiff.eval.prdc import precision_recall
from simdiff.eval.refstats import ReferenceStats, RefStats

__all__ = ["evaluate_samples", "default_metrics", "check_metrics", "min_samples", "METRICS", "MNIST_METRICS",
           "MODEL_METRICS",
           "FEATURE_SPACES", "MNIST_DATA", "FASHION_DATA", "classifier_for"]

METRICS = ("mnist_fd", "fid", "kid", "precision_recall", "accuracy", "bpd", "fashion_fd")
#: metrics that score the model on real test images instead of scoring samples (``simdiff.eval.likelihood``).
MODEL_METRICS = ("bpd",)
FEATURE_SPACES = ("inception", "mnist", "fashion")
#: metrics computed with the MNIST digit classifier (they mean something only on MNIST digits).
MNIST_METRICS = ("mnist_fd", "accuracy")
#: data set names (``DataConfig.name``, case and ``-``/``_`` ignored) whose images are MNIST digits.
MNIST_DATA = frozenset({"mnist"})
#: data set names whose images Fashion-MNIST's classifier (``simdiff.eval.fashion``) scores: ``fashion_fd`` and
#: ``accuracy`` on 1 x 28 x 28 Fashion-MNIST.
FASHION_DATA = frozenset({"fashion_mnist"})
#: the fewest samples each metric is defined for: a covariance needs 2 (FID, MNIST-FD, KID's unbiased MMD^2), the
#: k-NN radii of precision/recall need k + 1 (k = 3 by default).
_MIN_SAMPLES = {"mnist_fd": 2, "fashion_fd": 2, "fid": 2, "kid": 2, "accuracy": 1, "bpd": 2}


def min_samples(metrics: tuple[str, ...] | list[str], *, pr_k: int = 3) -> int:
    """The fewest samples (and reference images) for which every metric in ``metrics`` is defined."""
    return max([_MIN_SAMPLES.get(m, pr_k + 1 if m == "precision_recall" else 1) for m in metrics] or [1])


def _is_mnist_digits(image_shape: tuple[int, ...], data_name: str | None) -> bool:
    name = (data_name or "").strip().lower().replace("-", "_")
    return tuple(int(v) for v in image_shape) == (1, 28, 28) and name in MNIST_DATA


def _is_fashion(image_shape: tuple[int, ...], data_name: str | None) -> bool:
    name = (data_name or "").strip().lower().replace("-", "_")
    return tuple(int(v) for v in image_shape) == (1, 28, 28) and name in FASHION_DATA


def classifier_for(image_shape: tuple[int, ...], data_name: str | None) -> str | None:
    """The domain classifier that scores this data (``"mnist"``, ``"fashion"``), or ``None``."""
    if _is_mnist_digits(image_shape, data_name):
        return "mnist"
    if _is_fashion(image_shape, data_name):
        return "fashion"
    return None


def _channels(image_shape: tuple[int, ...]) -> int:
    shape = tuple(int(v) for v in image_shape)
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ConfigError(f"evaluation needs images of shape (C, H, W) with C in (1, 3), got {shape}")
    return shape[0]


def default_metrics(image_shape: tuple[int, ...], data_name: str | None) -> tuple[str, ...]:
    """The metrics ``simdiff eval`` computes when none are requested, chosen from the data.

    MNIST digits (data set ``mnist`` at its native 1 x 28 x 28): ``("mnist_fd", "fid", "accuracy")`` (the MNIST
    classifier's Fréchet distance and class accuracy, plus Inception FID); Fashion-MNIST at 1 x 28 x 28:
    ``("fashion_fd", "fid", "accuracy")`` with the shipped Fashion-MNIST classifier (:mod:`simdiff.eval.fashion`);
    any other data (other 28 x 28 grey sets, resized or RGB MNIST, image folders): ``("fid", "kid",
    "precision_recall")`` on Inception features. ``accuracy`` needs class labels; a caller sampling an
    unconditional model drops it.

    Args:
        image_shape: ``(C, H, W)`` of the data. data_name: the data set's registry name (``DataConfig.name``).

    Raises:
        ValueError: images whose channel count no metric supports (not 1 or 3).
    """
    _channels(image_shape)
    if _is_mnist_digits(image_shape, data_name):
        return ("mnist_fd", "fid", "accuracy")
    if _is_fashion(image_shape, data_name):
        return ("fashion_fd", "fid", "accuracy")
    return ("fid", "kid", "precision_recall")


def check_metrics(metrics: tuple[str, ...] | list[str], image_shape: tuple[int, ...] | None, data_name: str | None,
                  *, num: int | None = None) -> None:
    """Refuse, with one line, requested ``metrics`` that are unknown, do not fit the data or the sample count.

    ``mnist_fd`` fits only MNIST digits and ``fashion_fd`` only Fashion-MNIST, at 1 x 28 x 28; ``accuracy`` fits
    either (it uses that data's classifier). The MNIST-classifier metrics (:data:`MNIST_METRICS`) fit only MNIST
    digits at 1 x 28 x 28 (see
    :func:`default_metrics`); the Inception metrics fit any 1- or 3-channel images. ``num`` (the sample count, if
    given) must reach :func:`min_samples`. ``image_shape=None`` checks only the names and ``num`` (what can be
    checked before a model is loaded).

    Raises:
        ConfigError: (a ValueError) an empty list, an unknown metric, a metric that does not fit the data, or too
            few samples.
    """
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ConfigError(f"unknown metric(s) {unknown or list(metrics)}; valid: {', '.join(METRICS)}")
    if num is not None and num < min_samples(metrics):
        raise ConfigError(f"num={num} is too few samples for {', '.join(metrics)} (they need at least "
                          f"{min_samples(metrics)})")
    if image_shape is None:
        return
    _channels(image_shape)
    shape = "x".join(str(int(v)) for v in image_shape)
    domain = classifier_for(image_shape, data_name)
    need = {"mnist_fd": "mnist", "fashion_fd": "fashion"}
    unfit = [m for m in metrics if m in need and domain != need[m] or (m == "accuracy" and domain is None)]
    if unfit:
        raise ConfigError(f"metric(s) {', '.join(unfit)} use a domain classifier and fit only MNIST digits (mnist_fd, "
                          f"accuracy) or Fashion-MNIST (fashion_fd, accuracy) at 1x28x28; this data is {data_name!r} "
                          f"at {shape} (use fid, kid, precision_recall)")


def evaluate_samples(
    samples: Tensor,
    reference: Tensor | None = None,
    *,
    metrics: tuple[str, ...] | list[str] = METRICS,
    labels: Tensor | None = None,
    reference_key: str | None = None,
    batch_size: int = 50,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    feature_space: str = "inception",
    kid_subsets: int = 10,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    generator: torch.Generator | None = None,
    classifier: str = "mnist",
) -> dict[str, float]:
    """Score ``samples`` against ``reference`` images.

    Args:
        samples: ``[N, C, H, W]`` generated images in ``[-1, 1]`` (C in {1, 3}).
        reference: ``[M, C, H', W']`` real images in ``[-1, 1]``; may be ``None`` when ``reference_key`` names
            statistics already in the cache, or when only ``"accuracy"`` is requested.
        metrics: subset of ``METRICS``:
            ``"fid"`` (Inception FID), ``"mnist_fd"`` (Fréchet distance of MNIST-classifier features),
            ``"kid"`` (-> ``kid``, ``kid_std``), ``"precision_recall"`` (-> ``precision``, ``recall``) and
            ``"accuracy"`` (fraction of samples the MNIST classifier assigns to the requested ``labels``).
        labels: ``[N]`` requested class of each (class-conditional) sample; needed for ``"accuracy"``.
        reference_key: dataset key (e.g. ``"mnist-test"``) under which reference stats are cached on disk; when
            the cache has them, ``reference`` is not re-extracted (a warning flags a different image count).
        batch_size: images per Inception forward pass (the MNIST network uses ``max(batch_size, 500)``).
        cache_dir: reference-stats cache directory (default ``$SIMDIFF_CACHE/refstats`` or
            ``~/.cache/simdiff/refstats``).
        progress: tqdm bars during feature extraction.
        device: device for the feature networks (default cuda if available, else cpu).
        feature_space: features used by KID and precision/recall, one of ``FEATURE_SPACES``.
        kid_subsets, kid_subset_size: KID subset sampling. pr_k: k of the k-NN manifolds.
        generator: RNG for the KID subsets (default seeded with 0).
        classifier: the domain classifier ``"accuracy"`` uses: ``"mnist"`` (digits) or ``"fashion"``
            (:mod:`simdiff.eval.fashion`); ``"fashion_fd"`` always uses the Fashion-MNIST classifier.

    Returns:
        ``dict`` with the keys produced by the requested metrics, all ``float``.
    """
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS or m in MODEL_METRICS]
    if unknown or not metrics:
        sample_metrics = [m for m in METRICS if m not in MODEL_METRICS]
        raise ValueError(f"unknown sample metric(s) {unknown or metrics}; valid: {', '.join(sample_metrics)}")
    if feature_space not in FEATURE_SPACES:
        raise ValueError(f"unknown feature_space {feature_space!r}; valid: {', '.join(FEATURE_SPACES)}")
    check_images(samples, name="samples")
    if reference is not None:
        check_images(reference, name="reference")

    if classifier not in ("mnist", "fashion"):
        raise ValueError(f"unknown classifier {classifier!r}; valid: mnist, fashion")
    from simdiff.eval.fashion import FashionFeatures

    extractors = {
        "inception": InceptionFeatures(device, batch_size=batch_size, progress=progress),
        "mnist": MNISTFeatures(device, batch_size=max(batch_size, 500), progress=progress),
        "fashion": FashionFeatures(device, batch_size=max(batch_size, 500), progress=progress),
    }
    needs_ref = {m for m in metrics if m != "accuracy"}
    spaces = {"fid": "inception", "mnist_fd": "mnist", "fashion_fd": "fashion", "kid": feature_space,
              "precision_recall": feature_space}
    used = {spaces[m] for m in needs_ref}
    with_feats = {feature_space} if needs_ref & {"kid", "precision_recall"} else set()
    if needs_ref and reference is None and reference_key is None:
        raise ValueError(f"metrics {sorted(needs_ref)} need `reference` images or a cached `reference_key`")

    results: dict[str, float] = {}
    if "accuracy" in metrics:
        if labels is None:
            raise ValueError("metric 'accuracy' needs `labels` (the requested class of each sample)")
        results["accuracy"] = extractors[classifier].accuracy(samples, labels)

    cache = ReferenceStats(cache_dir) if reference_key is not None else None
    fake: dict[str, Tensor] = {}
    real: dict[str, RefStats] = {}
    for space in sorted(used):
        ext = extractors[space]
        fake[space] = ext(samples)

        def compute(ext=ext) -> Tensor:
            return ext(reference)

        if cache is not None:
            real[space] = cache.get(reference_key, ext.name, compute if reference is not None else None,
                                    need_features=space in with_feats)
            if reference is not None and real[space].n != reference.shape[0]:
                warnings.warn(f"cached stats for {reference_key!r} were computed from {real[space].n} images, "
                              f"but {reference.shape[0]} reference images were passed; using the cache "
                              "(use another reference_key or delete the file to recompute)", stacklevel=2)
        else:
            feats = compute()
            mu, sigma = feature_stats(feats)
            real[space] = RefStats(mu, sigma, feats.shape[0], ext.name, "", feats)

    for metric, out_key in (("fid", "fid"), ("mnist_fd", "mnist_fd"), ("fashion_fd", "fashion_fd")):
        if metric in metrics:
            space = spaces[metric]
            mu, sigma = feature_stats(fake[space])
            results[out_key] = frechet_distance(mu, sigma, real[space].mu, real[space].sigma)
    if "kid" in metrics:
        mean, std = kid(fake[feature_space], real[feature_space].features, subsets=kid_subsets,
                        subset_size=kid_subset_size, generator=generator)
        results["kid"], results["kid_std"] = mean, std
    if "precision_recall" in metrics:
        results.update(precision_recall(real[feature_space].features, fake[feature_space], k=pr_k))
    return results
