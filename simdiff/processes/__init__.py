"""Noising processes: the general diagonal Gaussian family, its isotropic member, and the discrete sibling's seam.

* :class:`GaussianProcess` (``base.py``): per-element ``(log alpha, log sigma)`` in an orthonormal basis
  (``bases.py``: identity, DCT-II); posterior, DDPM / DDIM steps, x/eps/v views and sampler coefficients are
  written once over those coefficients. :mod:`simdiff.process` keeps the pure isotropic VP functions.
* :class:`IsotropicGaussian` (``isotropic.py``): the default, bit-identical to the process-free code paths.
* :class:`DiscreteProcess`: the protocol a discrete process (e.g. masked diffusion) implements so that the loss,
  trainer and ``generate`` can dispatch to it. No discrete process is implemented here.

``build_process({"name": ...}, schedule)`` builds a registered process from a config dict.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from simdiff.configuration import ConfigError, get_registered
from simdiff.processes.base import GaussianProcess
from simdiff.processes.bases import DCTBasis, IdentityBasis
from simdiff.processes.isotropic import IsotropicGaussian

__all__ = [
    "PROCESSES",
    "DEFAULT_PROCESS",
    "GaussianProcess",
    "IsotropicGaussian",
    "IdentityBasis",
    "DCTBasis",
    "DiscreteProcess",
    "build_process",
]

#: name -> process class taking ``(schedule, **params)``.
PROCESSES: dict[str, type[GaussianProcess]] = {"isotropic": IsotropicGaussian}

DEFAULT_PROCESS: dict[str, Any] = {"name": "isotropic"}


def build_process(spec: dict[str, Any] | None, schedule: Any) -> GaussianProcess:
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
    """The discrete sibling of :class:`GaussianProcess` (e.g. masked diffusion; not implemented in simdiff yet).

    Data are integer tokens ``[B, ...]``; the loss and the samplers dispatch on this protocol instead of the
    Gaussian methods, reusing the trainer, batches, checkpoints, EMA and configs.
    """

    name: str

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
