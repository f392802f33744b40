"""Noising processes: the general diagonal Gaussian family, its isotropic member, and the discrete sibling's seam.

* :class:`GaussianProcess` (``base.py``): per-element ``(log alpha, log sigma)`` in an orthonormal basis
  (``bases.py``: identity, DCT-II); posterior, DDPM / DDIM steps, x/eps/v views and sampler coefficients are
  written once over those coefficients. :mod:`simdiff.process` keeps the pure isotropic VP functions.
* :class:`IsotropicGaussian` (``isotropic.py``): the default, bit-identical to the process-free code paths.
* :class:`BlurringDiffusion` (``blurring.py``, "blurring"): heat dissipation plus noise in the DCT basis
  (Hoogeboom & Salimans 2023).
* :class:`RollingDiffusion` (``rolling.py``, "rolling"): per-frame local times in a sliding window (Ruhe et al.
  2024); its sampler is :func:`simdiff.samplers.rolling.sample_rolling`.
* :class:`DiscreteProcess`: the protocol a discrete process implements so that the training objective, the
  network builder and ``generate`` dispatch to it; masked (absorbing-state) diffusion,
  :class:`simdiff.discrete.MaskedDiffusion` ("masked"), is the one registered.

``build_process({"name": ...}, schedule)`` builds a registered process of either family from a config dict
(``diffusion.process`` of an experiment); :func:`is_discrete` tells the families apart.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from simdiff.configuration import ConfigError, get_registered
from simdiff.discrete.masked import MaskedDiffusion
from simdiff.processes.base import GaussianProcess
from simdiff.processes.bases import DCTBasis, IdentityBasis
from simdiff.processes.blurring import BlurringDiffusion
from simdiff.processes.isotropic import IsotropicGaussian
from simdiff.processes.rolling import RollingDiffusion

__all__ = [
    "PROCESSES",
    "DEFAULT_PROCESS",
    "GaussianProcess",
    "IsotropicGaussian",
    "BlurringDiffusion",
    "RollingDiffusion",
    "IdentityBasis",
    "DCTBasis",
    "DiscreteProcess",
    "build_process",
    "is_discrete",
]

#: name -> process class taking ``(schedule, **params)``: Gaussian processes and discrete ones (one namespace).
PROCESSES: dict[str, type] = {"isotropic": IsotropicGaussian, "blurring": BlurringDiffusion,
                              "rolling": RollingDiffusion, "masked": MaskedDiffusion}

DEFAULT_PROCESS: dict[str, Any] = {"name": "isotropic"}


def build_process(spec: dict[str, Any] | None, schedule: Any) -> GaussianProcess | DiscreteProcess:
    """Build the process ``spec["name"]`` (default "isotropic") with ``schedule`` and the other keys as keyword
    parameters. Unknown names or parameters raise a one-line :class:`~simdiff.configuration.ConfigError`."""
    params = dict(spec or DEFAULT_PROCESS)
    name = params.pop("name", "isotropic")
    cls = get_registered(PROCESSES, name, "process")
    try:
        process = cls(schedule, **params)
    except TypeError as err:
        raise ConfigError(f"process {name!r}: bad parameters {sorted(params)} ({err})") from None
    process.spec = {"name": name, **params}  # what to_dict() returns, so configs round-trip
    return process


@runtime_checkable
class DiscreteProcess(Protocol):
    """The discrete sibling of :class:`GaussianProcess` (e.g. masked diffusion, :mod:`simdiff.discrete`).

    Data are integer tokens ``[B, ...]``; the process owns the map from a data batch to tokens and back. The
    training objective is :meth:`loss` (the trainer's ``loss_fn(model, batch, generator) -> [B]``), the network is
    built from :meth:`network_kwargs` instead of image arguments, and ``generate`` runs :meth:`prior` then
    :meth:`step` down a time grid; trainer, batches, checkpoints, EMA and configs are shared with the Gaussian
    family.
    """

    name: str

    def network_kwargs(self, data_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
        """Keyword arguments of the backbone constructor for data of ``data_shape`` (e.g. vocabulary size,
        sequence length), replacing the image arguments Gaussian processes pass."""
        ...

    def prior(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
              device: Any = "cpu") -> Tensor:
        """Tokens ``[*shape]`` drawn from the fully corrupted distribution (time 1)."""
        ...

    def to_data(self, tokens: Tensor) -> Tensor:
        """Tokens -> what ``generate`` returns (e.g. images in [-1, 1] for image tokens)."""
        ...

    def corrupt(self, x: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``x_t ~ q(x_t | x)`` at times ``t [B]`` (e.g. each token masked with probability ``1 - alpha_t``)."""
        ...

    def loss(self, model: Any, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """Per-example training loss ``[B]`` (e.g. the masked-token cross-entropy bound)."""
        ...

    def step(self, model: Any, x_t: Tensor, *, t: Tensor, s: Tensor, generator: torch.Generator | None = None,
             **cond: Any) -> Tensor:
        """One reverse step from time ``t`` to ``s < t``: a sample of ``x_s`` given ``x_t``."""
        ...


def is_discrete(process: Any) -> bool:
    """True for a process of the discrete family (:class:`DiscreteProcess`), False for a Gaussian one or ``None``."""
    return process is not None and not isinstance(process, GaussianProcess) and isinstance(process, DiscreteProcess)
