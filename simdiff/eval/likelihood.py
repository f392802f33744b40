"""Bits per dimension of a loaded model on real test images (the ``bpd`` metric of ``simdiff eval``).

Unlike the sample metrics this scores the model on held-out data and needs no sampling: the first ``num`` images
of the data set's test split (the train split for sets without one), 8-bit values ``k / 127.5 - 1``. A
class-conditional model is scored unconditionally by default, through its null class (the label it was trained on
with label dropout), i.e. ``-log2 p(x) / D``; ``conditional=True`` gives ``-log2 p(x | y) / D`` with the true
labels. Estimators: :func:`simdiff.likelihood.elbo` ("elbo", the VDM bound with the discrete decoder, stratified
log-SNR draws and a proposal fitted on a pilot batch) or :func:`simdiff.likelihood.ode_likelihood` ("ode", the
probability-flow ODE with Hutchinson probes, uniform dequantisation).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from simdiff.configuration import ConfigError

__all__ = ["LIKELIHOOD_METRICS", "METHODS", "heldout_images", "likelihood_of_loaded", "bpd_metric"]

#: the metric name ``simdiff eval --metrics`` accepts for this scorer.
LIKELIHOOD_METRICS = ("bpd",)
METHODS = ("elbo", "ode")


def heldout_images(cfg: Any, num: int, *, split: str = "test") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``num`` images (``[N, C, H, W]`` in ``[-1, 1]``) and labels (``[N]`` or None) of the run's data set
    ``split``, falling back to "train" for data sets without that split."""
    from simdiff.data import build_dataset

    data_cfg = dataclasses.replace(cfg.data, split=split, limit=num, hflip=False)
    try:
        ds = build_dataset(data_cfg)
    except (ConfigError, ValueError):
        ds = build_dataset(dataclasses.replace(data_cfg, split="train"))
    return ds.images[:num], (ds.labels[:num] if ds.labels is not None else None)


def likelihood_of_loaded(loaded: Any, x: torch.Tensor, labels: torch.Tensor | None = None, *, method: str = "elbo",
                         conditional: bool = False, seed: int = 0, device: str | torch.device = "cpu",
                         **options: Any):
    """Run one estimator on ``x`` with a :class:`simdiff.runs.LoadedModel` (its schedule's log-SNR range).

    ``options`` go to the estimator (e.g. ``num_times``, ``probes``, ``steps``, ``solver``). For "elbo" a
    ``proposal`` of "fitted" (the default) fits :func:`~simdiff.likelihood.fit_proposal` on the first 16 images.
    Returns the :class:`~simdiff.likelihood.LikelihoodResult`.
    """
    from simdiff.likelihood import elbo, fit_proposal, ode_likelihood

    if method not in METHODS:
        raise ConfigError(f"unknown likelihood method {method!r}; valid: {', '.join(METHODS)}")
    if loaded.process is not None and not getattr(loaded.process, "isotropic", False):
        raise ConfigError(f"bpd supports models of the isotropic process only; this model uses "
                          f"{getattr(loaded.process, 'name', loaded.process)!r}")
    x = x.to(device)
    cond: dict[str, Any] = {}
    if loaded.num_classes > 0:
        if conditional:
            if labels is None:
                raise ConfigError("conditional bpd needs labelled data")
            cond["labels"] = labels.to(device)
        else:
            cond["labels"] = torch.full((x.shape[0],), loaded.num_classes, dtype=torch.long, device=device)
    g = torch.Generator().manual_seed(seed)
    sched = loaded.schedule
    if method == "ode":
        return ode_likelihood(loaded.model, x, schedule=sched, cond=cond, generator=g, **options)
    options = dict(options)
    proposal = options.pop("proposal", "fitted")
    pilot_calls = 0
    if proposal == "fitted":
        pilot = slice(0, min(16, x.shape[0]))
        bins, points = 24, 2
        proposal = fit_proposal(loaded.model, x[pilot], logsnr_min=sched.logsnr_min, logsnr_max=sched.logsnr_max,
                                bins=bins, points=points, cond={k: v[pilot] for k, v in cond.items()}, generator=g)
        pilot_calls = (pilot.stop - pilot.start) * bins * points
    result = elbo(loaded.model, x, schedule=sched, proposal=proposal, cond=cond, generator=g, **options)
    result.info["pilot_network_calls"] = pilot_calls
    return result


def bpd_metric(loaded: Any, *, num: int = 256, method: str = "elbo", conditional: bool = False, seed: int = 0,
               device: str | torch.device = "cpu", **options: Any) -> dict[str, float]:
    """``{"bpd", "bpd_se", "bpd_mc_se", "bpd_<term>"...}`` of ``loaded`` on ``num`` test images (floats).

    ``bpd_se`` is the standard error over the images, ``bpd_mc_se`` the estimator's own Monte-Carlo error.
    """
    if num < 2:
        raise ConfigError(f"bpd needs at least 2 test images (for a standard error), got num={num}")
    x, labels = heldout_images(loaded.config, num)
    result = likelihood_of_loaded(loaded, x, labels, method=method, conditional=conditional, seed=seed,
                                  device=device, **options)
    return {k: float(v) for k, v in result.summary().items() if k != "num"}
