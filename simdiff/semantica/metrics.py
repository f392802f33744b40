"""Few-shot metrics of image-conditioned generation and a nearest-neighbour copy check.

Semantica (Kumar, Houlsby & Hoogeboom 2024) argues that image-variation metrics that reward similarity to the
conditioning image miss diversity, and scores **few-shot** generation instead: samples conditioned on a few images of
a data set are compared as a set with that data set (FID). Here, with domain features instead of Inception:

* :func:`fewshot_scores`: Fréchet distance, KID (Binkowski et al. 2018) and improved precision / recall (Kynkäänniemi
  et al. 2019) of the samples against reference images of the held-out class or data set, on the 128-d features of
  the MNIST classifier (:mod:`simdiff.eval.mnist`) or the Fashion-MNIST classifier (:mod:`simdiff.eval.fashion`);
  for photo patches (``domain="photos"``) on the 2048-d Inception-v3 pool3 features (:mod:`simdiff.eval.features`,
  slow on a CPU). With a few hundred samples the Fréchet distance is biased upwards (far more so on 2048-d
  features); compare values at equal ``n``.
* :func:`copy_check`: for each sample the pixel-space RMS distance to its nearest conditioning image and to its
  nearest training image; a sample is flagged as a copy when its nearest conditioning image is within ``tol``
  (default 0.05 RMS in ``[-1, 1]`` units: less than 3% of the range per pixel). Not from the paper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from simdiff.configuration import ConfigError

__all__ = ["nearest_rms", "copy_check", "fewshot_scores", "features_for", "fewshot_report", "condition_picks"]


def nearest_rms(queries: Tensor, support: Tensor, *, chunk: int = 512) -> tuple[Tensor, Tensor]:
    """Per query ``[n, ...]`` the RMS pixel distance to its nearest row of ``support`` ``[m, ...]`` and its index.

    Computed in float64 from ``|a|^2 + |b|^2 - 2 a.b`` (clamped at 0), in chunks of queries."""
    if len(support) == 0:
        raise ValueError("nearest_rms needs a non-empty support set")
    q = queries.reshape(len(queries), -1).double()
    s = support.reshape(len(support), -1).double()
    if q.shape[1] != s.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and support {tuple(support.shape)} differ in size")
    s2 = (s * s).sum(1)
    dists, index = [], []
    for i in range(0, len(q), chunk):
        part = q[i : i + chunk]
        d2 = ((part * part).sum(1)[:, None] + s2[None] - 2 * part @ s.T).clamp_min(0)
        v, j = d2.min(1)
        dists.append((v / q.shape[1]).sqrt())
        index.append(j)
    return torch.cat(dists), torch.cat(index)


def copy_check(samples: Tensor, *, cond_images: Tensor, train_images: Tensor, tol: float = 0.05) -> dict[str, Any]:
    """Are the samples copies of their conditioning images (or of training images)?

    Returns:
        ``{"d_cond": [n] tensor, "d_train": [n] tensor, "copies": [n] bool (d_cond <= tol), "copy_fraction",
        "train_copy_fraction" (d_train <= tol), "closer_to_cond_fraction" (d_cond < d_train),
        "median_d_cond", "median_d_train"}``.
    """
    d_cond, _ = nearest_rms(samples, cond_images)
    d_train, _ = nearest_rms(samples, train_images)
    copies = d_cond <= tol
    return {"d_cond": d_cond, "d_train": d_train, "copies": copies, "copy_fraction": float(copies.double().mean()),
            "train_copy_fraction": float((d_train <= tol).double().mean()),
            "closer_to_cond_fraction": float((d_cond < d_train).double().mean()),
            "median_d_cond": float(d_cond.median()), "median_d_train": float(d_train.median())}


def features_for(domain: str):
    """The feature network of ``domain``: 128-d classifier features for ``mnist`` | ``fashion_mnist``, 2048-d
    Inception pool3 features (no classifier) for ``photos`` and ``animal_mnist``."""
    if domain == "mnist":
        from simdiff.eval.mnist import MNISTFeatures

        return MNISTFeatures("cpu")
    if domain == "fashion_mnist":
        from simdiff.eval.fashion import FashionFeatures

        return FashionFeatures("cpu")
    if domain in ("photos", "animal_mnist"):
        from simdiff.eval.features import InceptionFeatures

        return InceptionFeatures("cpu")
    raise ConfigError(f"few-shot features exist for mnist, fashion_mnist, animal_mnist and photos, not {domain!r}")


def fewshot_scores(samples: Tensor, reference: Tensor, *, domain: str = "mnist", k: int = 3,
                   kid_subset: int = 100, sample_features: Tensor | None = None,
                   reference_features: Tensor | None = None) -> dict[str, float]:
    """Fréchet distance, KID (mean over 10 subsets of ``kid_subset``) and precision/recall (``k``-NN) of
    ``samples`` against ``reference`` images, on the ``domain`` features (either set's features may be passed
    precomputed)."""
    from simdiff.eval.fid import frechet_distance_features, kid
    from simdiff.eval.prdc import precision_recall

    feats = features_for(domain) if sample_features is None or reference_features is None else None
    fs = feats(samples) if sample_features is None else sample_features
    fr = feats(reference) if reference_features is None else reference_features
    kid_mean, _ = kid(fs, fr, subsets=10, subset_size=min(kid_subset, len(fs), len(fr)))
    pr = precision_recall(fr, fs, k=k)
    return {"fd": frechet_distance_features(fs, fr), "kid": kid_mean, **pr}


def condition_picks(n: int, shots: int, *, spread: bool) -> torch.Tensor:
    """Boolean mask over ``n`` ordered test images choosing ``shots`` conditioning images: the first ``shots``, or
    (``spread``) ``shots`` evenly spaced ones from the first to the last."""
    mask = torch.zeros(n, dtype=torch.bool)
    idx = torch.linspace(0, n - 1, shots).round().long() if spread else torch.arange(shots)
    mask[idx] = True
    return mask


def fewshot_report(run, *, source: str = "mnist", classes=(7, 8, 9), shots: int = 5, num: int = 200,
                   guidance: float = 1.0, seed: int = 0, steps: int | None = None, mode: str = "each",
                   loaded=None) -> dict[str, Any]:
    """Few-shot evaluation of a pairs model on held-out ``classes`` of ``source`` (test split).

    Per class: ``shots`` conditioning images (the first of that class in the test split; for ``photos``, whose
    patches are in raster order, ``shots`` patches evenly spread over the photo, so that five patches of a sky are
    not all the photo shows), ``num`` samples
    (mode ``each``), scored against the remaining test images of that class (:func:`fewshot_scores`) and checked for
    copies against the conditioning images (at the model's size) and the model's training images (its data set).
    Also ``class_agreement``: the fraction of samples the domain classifier assigns to the class; for ``photos``
    (no classifier; ``classes`` are photo indices, the held-out test photos are 5 and 6) the fraction whose nearest
    test patch of the ``classes`` photos in Inception features belongs to the conditioning photo, and likewise for
    ``animal_mnist`` (no classifier: the nearest test image of the ``classes`` decides). Photo patches are
    cut at the model's patch size. Returns a JSON-able dict with per-class and mean scores."""
    from simdiff.data import build_dataset
    from simdiff.runs import load_model
    from simdiff.semantica.pairs import load_source, register
    from simdiff.semantica.sample import sample_from_condition_images

    register()
    loaded = loaded if loaded is not None else load_model(run)
    train = build_dataset(loaded.config.data).images  # the model's training images, at its size
    options = {"patch_size": int(loaded.image_shape[-1])} if source == "photos" else {}
    test = load_source(source, "test", **options)
    feats = features_for(source)
    pool = None
    if not hasattr(feats, "predict"):  # photos: nearest test patch of the evaluated photos decides the photo
        keep = torch.isin(test.labels, torch.as_tensor(list(classes), dtype=torch.long))
        pool = (feats(test.images[keep]), test.labels[keep])
    out: dict[str, Any] = {"source": source, "shots": shots, "num": num, "guidance": guidance, "classes": {}}
    for c in classes:
        members = test.images[test.labels == c]
        if len(members) <= shots:
            raise ConfigError(f"class {c} of {source} has {len(members)} test images, need more than {shots}")
        pick = condition_picks(len(members), shots, spread=source == "photos")
        cond, reference = members[pick], members[~pick]
        x, cond = sample_from_condition_images(loaded, cond, num, guidance, mode=mode, seed=seed + c, steps=steps)
        fs = feats(x)
        fr = pool[0][pool[1] == c][~pick] if pool is not None else None
        scores = fewshot_scores(x, reference, domain=source, sample_features=fs, reference_features=fr)
        check = copy_check(x, cond_images=cond, train_images=train)
        row = {**scores, "copy_fraction": check["copy_fraction"], "median_d_cond": check["median_d_cond"],
               "median_d_train": check["median_d_train"]}
        if pool is None:
            row["class_agreement"] = float((feats.predict(x) == c).double().mean())
        else:
            nearest = torch.cdist(fs.double(), pool[0].double()).argmin(1)
            row["class_agreement"] = float((pool[1][nearest] == c).double().mean())
        out["classes"][str(c)] = {k: round(v, 5) for k, v in row.items()}
    keys = next(iter(out["classes"].values())).keys()
    out["mean"] = {k: round(sum(r[k] for r in out["classes"].values()) / len(classes), 5) for k in keys}
    return out
