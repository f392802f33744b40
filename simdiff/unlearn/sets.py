"""Forget and retain sets: what a concept is (prompts or class labels), their files, and the image pools.

A *concept set* is a list of conditioning keys -- prompts for a text model, class labels for a class-conditional
model -- with optional images and, for a forget set, anchors (what concept ablation maps the forget concept to).

File formats (``simdiff unlearn --forget FILE --retain FILE``):

* **plain text** (any suffix but ``.json``): one key per line; blank lines and lines starting with ``#`` are
  skipped. For a text model each line is a prompt; for a class-conditional model each line is a class index
  (``7``).
* **JSON**: an object with ``"prompts": [...]`` (text models) or ``"labels": [...]`` (class models), and optionally
  ``"images": "DIR"`` (a folder of images of this set, resized to the model's size; image ``i`` is paired with key
  ``i mod len(keys)``) and ``"anchors": [...]`` (one anchor key, or one per key; forget sets only).

Pools: the losses train on (image, conditioning) pairs. Where a set has no images, the *original* model generates
``pool_size`` of them (keys cycled, the run's deterministic sampler, a fixed seed): unlearning then needs no training
data, as in ESD (Gandikota et al. 2023) and concept ablation (Kumari et al. 2023), which both train on the original
model's own samples. The conditioning of every key is computed once, by the model's conditioner
(:class:`~simdiff.conditioners.ClassLabels` or the frozen text encoder), so training never runs the text encoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from simdiff.configuration import ConfigError

__all__ = ["ConceptSet", "read_concept_set", "encode_keys", "Pool", "PairedPools", "make_pool"]


@dataclass
class ConceptSet:
    """A forget or retain set.

    Attributes:
        keys: prompts (``str``) for a text model or class labels (``int``) for a class-conditional model.
        images: optional ``[N, C, H, W]`` images in [-1, 1] (image ``i`` goes with ``keys[i % len(keys)]``).
        anchors: forget sets: the anchor key of each key (concept ablation); empty: the unconditional input.
        source: where the set was read from (for messages and the run record).
    """

    keys: list[Any]
    images: Tensor | None = None
    anchors: list[Any] = field(default_factory=list)
    source: str = ""

    @property
    def is_text(self) -> bool:
        return bool(self.keys) and isinstance(self.keys[0], str)

    def to_record(self) -> dict[str, Any]:
        """A JSON-able description stored in the run's config (keys, anchors, how many images)."""
        return {"keys": list(self.keys), "anchors": list(self.anchors), "source": self.source,
                "images": 0 if self.images is None else int(self.images.shape[0])}

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> ConceptSet:
        return cls(keys=list(d["keys"]), anchors=list(d.get("anchors") or []), source=str(d.get("source", "")))

    def check(self, *, text: bool, num_classes: int, what: str) -> ConceptSet:
        """Refuse keys that do not fit the model (one line naming the set): prompts for a class model, labels out of
        ``[0, num_classes)``, an empty set, or an anchor list whose length is neither 1 nor ``len(keys)``."""
        if not self.keys:
            raise ConfigError(f"{what} set {self.source or ''} is empty".replace("  ", " "))
        for k in list(self.keys) + list(self.anchors):
            if text and not isinstance(k, str):
                raise ConfigError(f"{what} set: this is a text model, so entries must be prompts; got {k!r}")
            if not text and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_classes):
                raise ConfigError(f"{what} set: this is a class-conditional model with {num_classes} classes, so "
                                  f"entries must be class indices in [0, {num_classes}); got {k!r}")
        if self.anchors and len(self.anchors) not in (1, len(self.keys)):
            raise ConfigError(f"{what} set: give one anchor or one per entry ({len(self.keys)}), got "
                              f"{len(self.anchors)}")
        return self

    def anchor_of(self, i: int) -> Any:
        """The anchor of key ``i`` (None: the unconditional input)."""
        if not self.anchors:
            return None
        return self.anchors[0] if len(self.anchors) == 1 else self.anchors[i]


def _parse_key(value: Any, *, text: bool, where: str) -> Any:
    if text:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: a prompt must be a string, got {value!r}")
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ConfigError(f"{where}: a class-conditional model needs class indices, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: a class label must be an integer, got {value!r}")
    return value


def read_concept_set(path: str | Path, *, text: bool, image_shape: tuple[int, int, int] | None = None) -> ConceptSet:
    """Read a forget / retain set file (see the module docstring for the formats).

    Args:
        path: the file. text: whether the model is text-conditioned (keys are prompts) or class-conditional.
        image_shape: ``(C, H, W)`` the optional images are resized to.

    Raises:
        ConfigError: a missing file, bad JSON, unknown JSON keys or entries of the wrong kind (one line).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such forget/retain set file")
    raw = path.read_text(encoding="utf-8")
    images = None
    anchors: list[Any] = []
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: expected a JSON object with 'prompts' or 'labels'")
        unknown = sorted(set(doc) - {"prompts", "labels", "images", "anchors"})
        if unknown:
            raise ConfigError(f"{path}: unknown keys {unknown}; valid: prompts, labels, images, anchors")
        key = "prompts" if text else "labels"
        if key not in doc:
            raise ConfigError(f"{path}: this {'text' if text else 'class-conditional'} model needs a {key!r} list")
        entries = doc[key]
        if not isinstance(entries, list):
            raise ConfigError(f"{path}: {key!r} must be a list")
        keys = [_parse_key(v, text=text, where=str(path)) for v in entries]
        anchors = [_parse_key(v, text=text, where=f"{path} anchors") for v in (doc.get("anchors") or [])]
        if doc.get("images"):
            folder = Path(doc["images"])
            folder = folder if folder.is_absolute() else path.parent / folder
            images = _load_images(folder, image_shape)
    else:
        lines = [ln.strip() for ln in raw.splitlines()]
        keys = [_parse_key(ln, text=text, where=str(path)) for ln in lines if ln and not ln.startswith("#")]
    return ConceptSet(keys=keys, images=images, anchors=anchors, source=str(path))


def _load_images(folder: Path, image_shape: tuple[int, int, int] | None) -> Tensor:
    from simdiff.data.folder import load_folder
    from simdiff.data.transforms import uint8_to_float

    if image_shape is None:
        raise ConfigError("images in a forget/retain set need the model's image shape")
    c, h, w = image_shape
    if h != w:
        raise ConfigError(f"images in a forget/retain set need a square model, this one is {h}x{w}")
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such image folder")
    fd = load_folder(folder, size=h, channels=c)
    return uint8_to_float(fd.images)  # numpy [N, H, W, C] -> [N, C, H, W]


def encode_keys(conditioner: Any, keys: list[Any], *, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Conditioning keywords ``{name: [len(keys), ...]}`` of ``keys`` through the model's conditioner; ``None``
    entries are the unconditional input (``conditioner.null``)."""
    rows = []
    for k in keys:
        if k is None:
            rows.append(conditioner.null(1, device="cpu"))
        elif isinstance(k, str):
            rows.append(conditioner({"captions": [k]}, device="cpu"))
        else:
            rows.append(conditioner({"labels": torch.tensor([int(k)])}, device="cpu"))
    return {name: torch.cat([r[name] for r in rows]).to(device) for name in rows[0]}


@dataclass
class Pool:
    """Training pairs of one set: ``x`` ``[N, ...]`` and conditioning ``cond`` ``{name: [N, ...]}``; ``anchor``
    holds the anchor conditioning of each pair (forget pools)."""

    x: Tensor
    cond: dict[str, Tensor]
    anchor: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        out = {f"{prefix}x": self.x}
        out.update({f"{prefix}c_{k}": v for k, v in self.cond.items()})
        out.update({f"{prefix}a_{k}": v for k, v in self.anchor.items()})
        return out

    @classmethod
    def from_tensors(cls, d: dict[str, Tensor], prefix: str) -> Pool:
        cond = {k[len(prefix) + 2:]: v for k, v in d.items() if k.startswith(f"{prefix}c_")}
        anchor = {k[len(prefix) + 2:]: v for k, v in d.items() if k.startswith(f"{prefix}a_")}
        return cls(d[f"{prefix}x"], cond, anchor)


def make_pool(concepts: ConceptSet, conditioner: Any, size: int, *, generate_fn=None, anchors: bool = False) -> Pool:
    """The pool of a set: its own images (paired with keys cyclically) or ``size`` images of the keys (cycled)
    from ``generate_fn(cond) -> [n, ...]`` (the original model's sampler). ``anchors``: also the anchor
    conditioning of every pair."""
    if concepts.images is not None:
        n = int(concepts.images.shape[0])
        x = concepts.images
    else:
        if size < 1:
            raise ConfigError(f"pool size must be >= 1, got {size}")
        n, x = size, None
    idx = [i % len(concepts.keys) for i in range(n)]
    cond = encode_keys(conditioner, [concepts.keys[i] for i in idx])
    if x is None:
        if generate_fn is None:
            raise ValueError("make_pool needs generate_fn for a set without images")
        x = generate_fn(cond)
    anchor = encode_keys(conditioner, [concepts.anchor_of(i) for i in idx]) if anchors else {}
    return Pool(x.float().cpu(), cond, anchor)


class PairedPools:
    """A data set for :class:`simdiff.train.BatchIterator`: example ``i`` is forget pair ``i mod N_f`` and retain
    pair ``i mod N_r`` (keys ``f_x``, ``f_c_<cond>``, ``f_a_<cond>``, ``r_x``, ``r_c_<cond>``); its length is
    ``max(N_f, N_r)``."""

    def __init__(self, forget: Pool, retain: Pool) -> None:
        self.forget, self.retain = forget, retain
        self._f, self._r = forget.tensors("f_"), retain.tensors("r_")

    def __len__(self) -> int:
        return max(len(self.forget), len(self.retain))

    def __getitem__(self, idx: Tensor) -> dict[str, Tensor]:
        idx = torch.as_tensor(idx).reshape(-1)
        fi, ri = idx % len(self.forget), idx % len(self.retain)
        out = {k: v[fi] for k, v in self._f.items()}
        out.update({k: v[ri] for k, v in self._r.items()})
        return out
