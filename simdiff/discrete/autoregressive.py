"""The autoregressive baseline: a causal :class:`~simdiff.discrete.transformer.TokenTransformer` (``causal: true``)
trained by next-token cross-entropy on the same tokens as the masked process.

:class:`AutoregressiveLM` has the trainer's ``loss(model, batch, generator) -> [B]`` (nats per token, the exact
negative log-likelihood, so it compares directly with the masked bound), :meth:`~AutoregressiveLM.nll` for
validation and perplexity of samples, and :meth:`~AutoregressiveLM.sample` (one call per token, no cache).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from simdiff.discrete.masked import tokens_from_data
from simdiff.discrete.sampling import categorical

__all__ = ["AutoregressiveLM"]


class AutoregressiveLM:
    """Left-to-right factorisation ``p(x) = prod_l p(x^l | x^{<l})`` over flattened tokens; the start id is
    ``levels`` (the backbone's extra input id)."""

    name = "autoregressive"

    def __init__(self, *, levels: int = 256):
        self.levels, self.start_id = levels, levels

    def network_kwargs(self, data_shape: tuple[int, ...], num_classes: int = 0) -> dict[str, Any]:
        return {"vocab_size": self.levels, "length": int(torch.Size(data_shape).numel())}

    def tokens(self, x: Tensor) -> Tensor:
        return tokens_from_data(x, self.levels)

    def _inputs(self, tokens: Tensor) -> Tensor:
        flat = tokens.reshape(tokens.shape[0], -1)
        start = torch.full_like(flat[:, :1], self.start_id)
        return torch.cat([start, flat[:, :-1]], 1)

    def nll(self, model: Any, tokens: Tensor) -> Tensor:
        """``-log p(x) / L`` per example ``[B]`` (nats per token) of tokens ``[B, ...]``."""
        flat = tokens.reshape(tokens.shape[0], -1)
        logits = model(self._inputs(flat)).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat.reshape(-1), reduction="none")
        return ce.reshape(flat.shape).mean(1)

    def loss(self, model: Any, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """The trainer's per-example loss ``[B]``: :meth:`nll` of the batch's tokens."""
        return self.nll(model, self.tokens(batch["x"]))

    def sample(self, model: Any, num: int, length: int, *, generator: torch.Generator | None = None,
               precision: str = "float64", device: Any = "cpu") -> Tensor:
        """``num`` sequences ``[num, length]`` drawn left to right (``length`` network calls)."""
        x = torch.zeros(num, length, dtype=torch.long, device=device)
        for i in range(length):
            logits = model(self._inputs(x)).to(torch.float64)[:, i]
            x[:, i] = categorical(logits.softmax(-1), generator=generator, precision=precision)
        return x
