"""Unlearning metrics: forgetting, retention quality and model integrity (original vs unlearned, pair by pair).

* **forgetting** (:func:`forgetting_rate`): the fraction of samples drawn for forget keys in which a judge still
  finds the forget concept. Judges: for class-conditional models a classifier of the class (the MNIST classifier on
  28 x 28 digits, :func:`nearest_component_judge` on the ``gmm_images`` mixture); for text models the digit class of
  every object the prompt names, by :func:`simdiff.eval.prompts.prompt_adherence` (``class_accuracy``).
* **retention quality**: Fréchet distance and KID of the unlearned model's samples of the retain keys against the
  original model's samples of the same keys (same seeds), in a feature space (MNIST-classifier features for grey
  images, Inception for RGB); for text models also prompt adherence on the retain prompts.
* **integrity** (:func:`integrity_score`): for retain keys and fixed seeds, both models sample through the same
  deterministic sampler (``eta = 0``, the same starting noise), and each pair ``(a_i, b_i)`` is compared by a
  perceptual distance ``d_i = ||f(a_i) - f(b_i)||_2`` with ``f`` the features of an offline network (no LPIPS
  weights exist offline): MNIST-classifier penultimate features (128-d) for grey MNIST-like images, Inception
  pool3 (2048-d) for RGB, or the values themselves (``"pixel"``: synthetic sets such as ``gmm_images``, vector
  toys). The distance is mapped to [0, 1] by the scale of *unpaired* samples: ``d_ref`` is the median of
  ``||f(a_i) - f(a_{i+1})||`` over the original's own samples (neighbouring samples have other seeds and, keys
  being cycled, other keys), and ``s_i = clip(1 - d_i / d_ref, 0, 1)``: 1 for an identical image, 0 for an image
  as far from its pair as an unrelated sample is. The score is the mean of ``s_i`` with a percentile bootstrap
  confidence interval over pairs. Also the pixel PSNR of each pair (images in [-1, 1], peak-to-peak 2; identical
  pairs are capped at :data:`PSNR_CAP` dB). This metric is this library's construction after the description in
  Schioppa, Hoogeboom & Heek (2024, "Model Integrity when Unlearning with T2I Diffusion Models"): compare the
  original and unlearned models' images for the same prompt and seed with a perceptual distance; **their exact
  metric was not retrievable**, so the feature network and the [0, 1] mapping are documented choices, not the
  paper's.

:func:`evaluate_unlearning` computes all of them for two loaded models and two concept sets;
:func:`evaluate_unlearning_run` does so for an unlearned run, reading the original and the sets from its record
(what ``simdiff eval RUN --unlearning`` calls).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from simdiff.configuration import ConfigError

__all__ = ["PSNR_CAP", "forgetting_rate", "pair_psnr", "integrity_score", "feature_fn", "nearest_component_judge",
           "class_judge", "sample_keys", "evaluate_unlearning", "evaluate_unlearning_run"]

#: the PSNR (dB) reported for identical pairs (and the cap of every pair).
PSNR_CAP = 100.0


def forgetting_rate(images: Tensor, keys: Sequence[Any], judge: Callable[[Tensor, list[Any]], Tensor]) -> float:
    """Fraction of ``images`` (drawn for ``keys``, one key each) in which ``judge(images, keys) -> bool [N]`` still
    finds the key's concept."""
    if len(images) != len(keys):
        raise ValueError(f"{len(images)} images for {len(keys)} keys")
    hits = torch.as_tensor(judge(images, list(keys))).reshape(-1)
    return float(hits.double().mean())


def class_judge(predict: Callable[[Tensor], Tensor]) -> Callable[[Tensor, list[Any]], Tensor]:
    """A judge for class keys from a classifier ``predict(images) -> labels [N]``."""

    def judge(images: Tensor, keys: list[Any]) -> Tensor:
        return predict(images).cpu().reshape(-1) == torch.as_tensor([int(k) for k in keys])

    return judge


def nearest_component_judge(mixture) -> Callable[[Tensor, list[Any]], Tensor]:
    """A judge for a :class:`~simdiff.toy.GaussianMixture`: a sample shows class ``k`` when its nearest component
    mean belongs to class ``k``."""

    def judge(images: Tensor, keys: list[Any]) -> Tensor:
        x = images.reshape(len(images), -1).to(mixture.means.dtype)
        nearest = torch.cdist(x, mixture.means).argmin(1)
        return mixture.classes[nearest].cpu() == torch.as_tensor([int(k) for k in keys])

    return judge


def _text_judge(thresholds) -> Callable[[Tensor, list[Any]], Tensor]:
    from simdiff.eval.prompts import prompt_adherence

    def judge(images: Tensor, keys: list[Any]) -> Tensor:
        return torch.tensor([prompt_adherence(images[i:i + 1], [keys[i]], thresholds)["class_accuracy"] >= 1.0
                             for i in range(len(keys))])

    return judge


def pair_psnr(a: Tensor, b: Tensor) -> Tensor:
    """PSNR (dB) of each pair of ``a``, ``b`` ``[N, ...]`` in [-1, 1] (peak-to-peak 2), capped at :data:`PSNR_CAP`."""
    if a.shape != b.shape:
        raise ValueError(f"pairs need equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    psnr = 10 * torch.log10(4.0 / mse.clamp_min(1e-300))
    return psnr.clamp(max=PSNR_CAP)


def feature_fn(name: str | Callable[[Tensor], Tensor], *, device: str | torch.device = "cpu"
               ) -> Callable[[Tensor], Tensor]:
    """The feature map of the integrity distance: ``"mnist"`` (MNIST-classifier features), ``"inception"``,
    ``"pixel"`` (the values themselves), or a callable ``images -> [N, D]``."""
    if callable(name):
        return name
    if name == "mnist":
        from simdiff.eval.mnist import MNISTFeatures

        net = MNISTFeatures(device)
        return lambda x: net(x)
    if name == "inception":
        from simdiff.eval.features import InceptionFeatures

        inc = InceptionFeatures(device)
        return lambda x: inc(x)
    if name == "pixel":
        return lambda x: x.reshape(len(x), -1).double().cpu()
    raise ConfigError(f"unknown integrity features {name!r}; valid: mnist, inception, pixel")


#: grey data sets whose images the MNIST classifier's features describe (digits and clothes on a dark ground).
_MNIST_LIKE = ("mnist", "mnist_captions", "fashion_mnist", "fashion_captions")


def _auto_features(loaded) -> str:
    """MNIST-classifier features for grey MNIST-like images, Inception for RGB, the values themselves otherwise
    (e.g. the 8 x 8 ``gmm_images`` mixture, where the pixels are the mixture's coordinates)."""
    shape = tuple(loaded.image_shape)
    if len(shape) != 3:
        return "pixel"
    if shape[0] == 3:
        return "inception"
    return "mnist" if loaded.config.data.name in _MNIST_LIKE else "pixel"


def integrity_score(original: Tensor, unlearned: Tensor, *, features: str | Callable[[Tensor], Tensor] = "pixel",
                    num_boot: int = 1000, level: float = 0.95, seed: int = 0,
                    device: str | torch.device = "cpu") -> dict[str, float]:
    """Integrity of paired samples ``original[i]`` / ``unlearned[i]`` (same key, same seed); see the module docstring.

    Returns:
        ``integrity`` (mean of ``s_i`` in [0, 1]), ``integrity_lo`` / ``integrity_hi`` (percentile bootstrap
        interval at ``level``), ``distance`` (mean ``d_i``), ``distance_ref`` (``d_ref``), ``psnr`` (mean pair PSNR,
        dB, capped) and ``psnr_median``.
    """
    if original.shape != unlearned.shape or len(original) < 2:
        raise ValueError(f"integrity needs two equal batches of >= 2 pairs, got {tuple(original.shape)} and "
                         f"{tuple(unlearned.shape)}")
    f = feature_fn(features, device=device)
    fa, fb = f(original).double().cpu(), f(unlearned).double().cpu()
    d = (fa - fb).norm(dim=1)
    ref = float((fa - fa.roll(1, 0)).norm(dim=1).median())
    s = (1 - d / ref).clamp(0, 1) if ref > 0 else (d == 0).double()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(s), (num_boot, len(s)), generator=g)
    boots = s[idx].mean(1)
    a = (1 - level) / 2
    psnr = pair_psnr(original, unlearned)
    return {"integrity": float(s.mean()), "integrity_lo": float(torch.quantile(boots, a)),
            "integrity_hi": float(torch.quantile(boots, 1 - a)), "distance": float(d.mean()), "distance_ref": ref,
            "psnr": float(psnr.mean()), "psnr_median": float(psnr.median())}


def sample_keys(loaded, conditioner, keys: Sequence[Any], *, num: int, sample_cfg, device="cpu",
                model=None) -> tuple[Tensor, list[Any]]:
    """``num`` samples of ``keys`` (cycled) from ``loaded`` (or ``model`` with ``loaded``'s schedule and shape)
    through ``sample_cfg`` with ``eta = 0``; returns the images and the key of each."""
    from simdiff.generate import generate
    from simdiff.unlearn.sets import encode_keys

    ks = [keys[i % len(keys)] for i in range(num)]
    cond = encode_keys(conditioner, ks)
    scfg = dataclasses.replace(sample_cfg, num=num, eta=0.0)
    x = generate(loaded.model if model is None else model, loaded.schedule, loaded.image_shape, scfg, cond=cond,
                 conditioner=conditioner, device=device, process=loaded.process)
    return x, ks


def _default_judge(loaded, text: bool):
    if text:
        from simdiff.data.captions import caption_thresholds

        return _text_judge(caption_thresholds(loaded.config.data))
    data = loaded.config.data.name
    if data == "gmm_images":
        from simdiff.data.datasets import gmm_image_mixture

        c, h, _ = loaded.image_shape
        return nearest_component_judge(gmm_image_mixture(h, c))
    if tuple(loaded.image_shape) == (1, 28, 28) and data in ("mnist", "mnist_captions"):
        from simdiff.eval.mnist import MNISTFeatures

        return class_judge(MNISTFeatures().predict)
    if tuple(loaded.image_shape) == (1, 28, 28) and data == "fashion_mnist":
        from simdiff.eval.fashion import FashionFeatures

        return class_judge(FashionFeatures().predict)
    return None


def evaluate_unlearning(original, unlearned, forget_keys: Sequence[Any], retain_keys: Sequence[Any], *,
                        num: int = 200, sample_cfg=None, features: str | Callable | None = None, judge=None,
                        fid: bool = True, num_boot: int = 1000, device: str | torch.device = "cpu",
                        seed: int = 0) -> dict[str, float]:
    """Forgetting, retention quality and integrity of ``unlearned`` against ``original`` (both
    :class:`~simdiff.runs.LoadedModel`, same conditioner).

    Args:
        forget_keys, retain_keys: prompts or class labels. num: samples per set and model.
        sample_cfg: the deterministic sampler (default the original's sample config); ``eta`` is forced to 0 and
            ``seed`` set, so pair ``i`` starts from the same noise in both models.
        features: integrity / FD feature space (default: MNIST classifier for grey MNIST-like data, Inception for
            RGB, the pixel values otherwise).
        judge: ``judge(images, keys) -> bool [N]``; default from the data (see the module docstring), none -> the
            forgetting entries are omitted.
        fid: also the Fréchet distance / KID of retain samples against the original's.

    Returns:
        ``forget_rate_before``, ``forget_rate`` (after), ``retain_rate_before``, ``retain_rate`` (the judge on
        retain keys), ``integrity`` with ``integrity_lo`` / ``integrity_hi``, ``psnr``, ``psnr_median``, and with
        ``fid``: ``retain_fd``, ``retain_kid``; text models add ``retain_<attribute>_accuracy``.
    """
    from simdiff.unlearn.run import model_conditioner

    conditioner, text = model_conditioner(original, device=device)
    scfg = dataclasses.replace(sample_cfg or original.config.sample, seed=seed, eta=0.0)
    feats = features or _auto_features(original)
    if judge is None:
        judge = _default_judge(original, text)
    out: dict[str, float] = {}
    xf_o, kf = sample_keys(original, conditioner, forget_keys, num=num, sample_cfg=scfg, device=device)
    xf_u, _ = sample_keys(original, conditioner, forget_keys, num=num, sample_cfg=scfg, device=device,
                          model=unlearned.model)
    xr_o, kr = sample_keys(original, conditioner, retain_keys, num=num, sample_cfg=scfg, device=device)
    xr_u, _ = sample_keys(original, conditioner, retain_keys, num=num, sample_cfg=scfg, device=device,
                          model=unlearned.model)
    if judge is not None:
        out["forget_rate_before"] = forgetting_rate(xf_o, kf, judge)
        out["forget_rate"] = forgetting_rate(xf_u, kf, judge)
        out["retain_rate_before"] = forgetting_rate(xr_o, kr, judge)
        out["retain_rate"] = forgetting_rate(xr_u, kr, judge)
    out.update(integrity_score(xr_o, xr_u, features=feats, num_boot=num_boot, seed=seed, device=device))
    out["forget_integrity"] = integrity_score(xf_o, xf_u, features=feats, num_boot=10, seed=seed,
                                              device=device)["integrity"]
    if fid:
        from simdiff.eval.fid import frechet_distance_features, kid

        f = feature_fn(feats, device=device)
        fo, fu = f(xr_o), f(xr_u)
        out["retain_fd"] = float(frechet_distance_features(fu, fo))
        out["retain_kid"] = float(kid(fu, fo, subsets=10, subset_size=min(len(fu), 1000),
                                      generator=torch.Generator().manual_seed(seed))[0])
    if text:
        from simdiff.data.captions import caption_thresholds
        from simdiff.eval.prompts import prompt_adherence

        adh = prompt_adherence(xr_u, [str(k) for k in kr], caption_thresholds(original.config.data))
        out.update({f"retain_{k}": v for k, v in adh.items() if k.endswith("_accuracy") and not math.isnan(v)})
    return out


def evaluate_unlearning_run(run, *, teacher: str | None = None, num: int = 200, sample_cfg=None,
                            features: str | None = None, fid: bool = True, num_boot: int = 1000,
                            device: str | torch.device = "cpu", seed: int = 0) -> dict[str, float]:
    """:func:`evaluate_unlearning` of an unlearned run against its original, both read from the run's record
    (``teacher`` overrides the recorded original's path). A run that is not an unlearned one is refused (one line).
    """
    from simdiff.runs import load_model

    unlearned = load_model(run, device=device)
    record = unlearned.meta.get("unlearn")
    if not record:
        raise ConfigError(f"{run}: not an unlearned run (its checkpoint records no 'unlearn' entry); "
                          "make one with simdiff unlearn")
    original = load_model(teacher or record["teacher"], device=device)
    scores = evaluate_unlearning(original, unlearned, record["forget"]["keys"], record["retain"]["keys"], num=num,
                                 sample_cfg=sample_cfg, features=features, fid=fid, num_boot=num_boot, device=device,
                                 seed=seed)
    return {"method": record.get("method"), **scores}
