"""Conditioning that comes from outside the trained weights, and the one "unconditional" substitution.

A *conditioner* turns a data batch (a dict with e.g. ``"labels"``, later ``"captions"`` or ``"images"``) into the
denoiser's conditioning keywords, says what "unconditional" is for classifier-free guidance, and names itself for
the run record:

* :class:`ClassLabels` — class labels ``[B]``; the null label is ``num_classes`` (the extra embedding row a network
  trained with label dropout learns, Ho & Salimans 2022).
* :class:`NoCondition` — an unconditional model (no keywords, no null conditioning).
* :class:`FrozenEncoder` — base for conditioners backed by a frozen network (a text or image encoder). The network
  is held by the conditioner, in eval mode with gradients off, and is **not** a submodule of the trained model, so
  its weights never reach the optimizer, the EMA or a checkpoint; embeddings are cached per unique key (e.g. per
  caption string), so a key is encoded once.

:func:`null_conditioning` is the single place that builds the unconditional conditioning from a call's
conditioning; classifier-free guidance (:mod:`simdiff.guidance`) and guided distillation use it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["Conditioner", "ClassLabels", "NoCondition", "FrozenEncoder", "null_conditioning"]


def null_conditioning(cond: dict[str, Any], null_cond: dict[str, Any], *, batch: int) -> dict[str, Any]:
    """The call's conditioning with the keys of ``null_cond`` replaced by their unconditional values.

    For each ``key, null`` in ``null_cond``:

    * ``null is None``: the keyword is passed as ``None`` — the denoiser's own unconditional path (e.g.
      ``GaussianMixture.denoise(labels=None)`` is the exact unconditional denoiser);
    * a call whose ``cond[key]`` is ``None`` is already unconditional for that key and keeps ``None``;
    * otherwise ``cond[key]`` must be a ``[batch, ...]`` tensor and ``null`` (a number or tensor, e.g.
      ``num_classes`` for labels or a ``[1, L, C]`` empty-prompt embedding for a context) is broadcast to its shape,
      dtype and device.

    Keys not in ``null_cond`` are passed through unchanged (the same objects).

    Args:
        cond: the call's conditioning keywords.
        null_cond: keyword -> unconditional value.
        batch: the batch size ``B`` of the call.

    Returns:
        A new dict with the same keys as ``cond``.

    Raises:
        ValueError: a key of ``null_cond`` missing from ``cond``; a conditioning that is not a ``[B, ...]`` tensor;
            a null value that does not broadcast to it.
    """
    missing = sorted(set(null_cond) - set(cond))
    if missing:
        raise ValueError(f"null_cond has {missing} but the call's conditioning has {sorted(cond)}")
    out = dict(cond)
    for key, null in null_cond.items():
        ref = cond[key]
        if null is None or ref is None:
            out[key] = None
            continue
        if not torch.is_tensor(ref) or ref.dim() == 0 or ref.shape[0] != batch:
            got = tuple(ref.shape) if torch.is_tensor(ref) else type(ref).__name__
            raise ValueError(f"conditioning {key!r} must be a [B={batch}, ...] tensor to be replaced, got {got}")
        value = torch.as_tensor(null, dtype=ref.dtype, device=ref.device)
        try:
            out[key] = value.broadcast_to(ref.shape)
        except RuntimeError:
            raise ValueError(f"null_cond[{key!r}] of shape {tuple(value.shape)} does not broadcast to the "
                             f"conditioning shape {tuple(ref.shape)}") from None
    return out


@runtime_checkable
class Conditioner(Protocol):
    """Maps a batch to the denoiser's conditioning keywords and knows the unconditional ones.

    Attributes:
        null_cond: keyword -> unconditional value, in the form :func:`null_conditioning` and
            ``simdiff.guidance.classifier_free_guidance`` take (empty: the model has no unconditional mode).
    """

    null_cond: dict[str, Any]

    def __call__(self, batch: dict[str, Any], *, device: torch.device | str | None = None) -> dict[str, Any]:
        """``batch`` (``"labels"``, ``"captions"``, ...) -> conditioning keywords on ``device``."""
        ...

    def null(self, n: int, device: torch.device | str | None = None) -> dict[str, Any]:
        """Unconditional conditioning keywords for ``n`` examples."""
        ...

    def identity(self) -> dict[str, Any]:
        """``{"name": ..., "version": ..., ...}`` recorded in a run (for frozen encoders: model name and version)."""
        ...


class NoCondition:
    """An unconditional model: no conditioning keywords and no null conditioning."""

    null_cond: dict[str, Any] = {}

    def __call__(self, batch: dict[str, Any], *, device: torch.device | str | None = None) -> dict[str, Any]:
        return {}

    def null(self, n: int, device: torch.device | str | None = None) -> dict[str, Any]:
        return {}

    def identity(self) -> dict[str, Any]:
        return {"name": "none", "version": 1}

    def __repr__(self) -> str:
        return "NoCondition()"


class ClassLabels:
    """Class labels ``batch["labels"] [B]`` -> ``{"labels": [B] long}``; the null label is ``num_classes``.

    Args:
        num_classes: number of real classes (>= 1); labels are in ``[0, num_classes)``, ``num_classes`` = null.
    """

    def __init__(self, num_classes: int) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"ClassLabels needs num_classes >= 1, got {num_classes!r}")
        self.num_classes = num_classes

    @property
    def null_cond(self) -> dict[str, Any]:
        return {"labels": self.num_classes}

    def __call__(self, batch: dict[str, Any], *, device: torch.device | str | None = None) -> dict[str, Any]:
        if "labels" not in batch:
            raise ValueError(f"ClassLabels: the batch has no 'labels' (keys: {sorted(batch)})")
        labels = torch.as_tensor(batch["labels"])
        if labels.dim() != 1:
            raise ValueError(f"ClassLabels: labels must be [B], got shape {tuple(labels.shape)}")
        return {"labels": labels.to(device=device, dtype=torch.long)}

    def null(self, n: int, device: torch.device | str | None = None) -> dict[str, Any]:
        return {"labels": torch.full((n,), self.num_classes, dtype=torch.long, device=device)}

    def identity(self) -> dict[str, Any]:
        return {"name": "class_labels", "version": 1, "num_classes": self.num_classes}

    def __repr__(self) -> str:
        return f"ClassLabels({self.num_classes})"


class FrozenEncoder:
    """Base for conditioners backed by a frozen network, kept outside the trained model, with a per-key cache.

    Subclasses implement :meth:`encode` (a list of unique keys, e.g. caption strings, -> ``[n, ...]`` embeddings,
    tokenisation included). ``__call__`` reads ``batch[batch_key]`` (a sequence of hashable keys), encodes only the
    keys not yet cached, and returns ``{cond_key: [B, ...]}``. The unconditional value is the embedding of
    ``null_key`` (e.g. the empty caption).

    The module is put in eval mode with ``requires_grad=False`` and stored on this object, which is not an
    ``nn.Module``: assigning a ``FrozenEncoder`` to an attribute of a network does not register its weights, so
    they are never in the network's ``parameters()``, ``state_dict()``, an optimizer built from them, the EMA or a
    checkpoint. Embeddings are computed under ``torch.no_grad()`` and outside inference mode even when called from
    inside it (ordinary tensors, usable as inputs of a network being trained).

    Args:
        module: the frozen network.
        name, version: recorded by :meth:`identity` (e.g. the model's name and the providing package's version).
        batch_key: the batch entry holding the keys. cond_key: the denoiser keyword of the embeddings.
        null_key: the key whose embedding means "unconditional".
        max_cache: keep at most this many embeddings (oldest evicted first); ``None``: no limit.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        name: str,
        version: str,
        batch_key: str,
        cond_key: str,
        null_key: Hashable = "",
        max_cache: int | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"FrozenEncoder needs an nn.Module, got {type(module).__name__}")
        if max_cache is not None and max_cache < 1:
            raise ValueError(f"max_cache must be >= 1 or None, got {max_cache}")
        self._module = module.eval().requires_grad_(False)
        self.name, self.version = str(name), str(version)
        self.batch_key, self.cond_key, self.null_key = batch_key, cond_key, null_key
        self.max_cache = max_cache
        self._cache: dict[Hashable, Tensor] = {}

    @property
    def module(self) -> nn.Module:
        """The frozen network (read-only access; it is not part of any trained model)."""
        return self._module

    def encode(self, keys: list[Hashable]) -> Tensor:
        """Unique ``keys`` -> ``[len(keys), ...]`` embeddings (one row per key, in order). Subclasses implement."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> FrozenEncoder:
        """Move the frozen network (the cache is kept, rows are moved on lookup)."""
        self._module.to(device)
        return self

    def embeddings(self, keys: Sequence[Hashable]) -> Tensor:
        """``[len(keys), ...]`` embeddings of ``keys``; each key not in the cache is encoded once."""
        new = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if new:
            with torch.inference_mode(False), torch.no_grad():  # cached rows must be usable in training later
                rows = self.encode(new)
            if not torch.is_tensor(rows) or rows.dim() == 0 or rows.shape[0] != len(new):
                got = tuple(rows.shape) if torch.is_tensor(rows) else type(rows).__name__
                raise ValueError(f"{self.name}: encode returned {got} for {len(new)} keys (need [{len(new)}, ...])")
            for key, row in zip(new, rows):
                self._cache[key] = row.detach()
        out = torch.stack([self._cache[k] for k in keys])
        if self.max_cache is not None:
            for old in list(self._cache)[: max(len(self._cache) - self.max_cache, 0)]:
                del self._cache[old]
        return out

    def __call__(self, batch: dict[str, Any], *, device: torch.device | str | None = None) -> dict[str, Any]:
        if self.batch_key not in batch:
            raise ValueError(f"{self.name}: the batch has no {self.batch_key!r} (keys: {sorted(batch)})")
        return {self.cond_key: self.embeddings(list(batch[self.batch_key])).to(device)}

    @property
    def null_cond(self) -> dict[str, Any]:
        return {self.cond_key: self.embeddings([self.null_key])}

    def null(self, n: int, device: torch.device | str | None = None) -> dict[str, Any]:
        row = self.embeddings([self.null_key])
        return {self.cond_key: row.expand(n, *row.shape[1:]).to(device)}

    def identity(self) -> dict[str, Any]:
        n = sum(p.numel() for p in self._module.parameters())
        return {"name": self.name, "version": self.version, "class": type(self).__name__, "parameters": n}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version!r}, cached={len(self._cache)})"
