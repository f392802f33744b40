"""An exact masked-diffusion denoiser for a small joint distribution over token sequences (tests, benchmarks).

:class:`ExactJoint` holds ``p(x)`` over all ``V^L`` sequences (float64) and answers ``p(x^l | unmasked tokens of
x_t)`` for every position by enumeration; :func:`markov_chain_joint` builds the joint of a small Markov chain.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor

__all__ = ["ExactJoint", "markov_chain_joint"]


def markov_chain_joint(initial: Tensor, transition: Tensor, length: int) -> Tensor:
    """``p(x) = initial[x_0] prod transition[x_{l-1}, x_l]`` as a float64 tensor of shape ``[V] * length``."""
    p = initial.to(torch.float64)
    for _ in range(length - 1):
        last = p.dim() - 1
        p = p.unsqueeze(-1) * transition.to(torch.float64).reshape(*[1] * last, *transition.shape)
    return p


class ExactJoint:
    """``p(x)`` over sequences of ``length`` tokens in ``0..V-1``; ``self(x_t, t)`` is the exact denoiser's logits
    ``[B, L, V]`` (mask id ``V``). ``states [V^L, L]`` lists the sequences in the order of ``probs [V^L]``."""

    def __init__(self, joint: Tensor):
        self.vocab, self.length = joint.shape[0], joint.dim()
        self.probs = (joint / joint.sum()).reshape(-1).to(torch.float64)
        self.states = torch.tensor(list(itertools.product(range(self.vocab), repeat=self.length)), dtype=torch.long)
        onehot = torch.nn.functional.one_hot(self.states, self.vocab).to(torch.float64)
        self.onehot = onehot.reshape(len(self.states), -1)
        self.calls = 0

    def index(self, x: Tensor) -> Tensor:
        """Row of ``states`` of each complete sequence ``x [B, L]``."""
        idx = torch.zeros(x.shape[0], dtype=torch.long)
        for l in range(self.length):
            idx = idx * self.vocab + x[:, l].long()
        return idx

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples ``[n, L]``."""
        return self.states[torch.multinomial(self.probs, n, replacement=True, generator=generator)]

    def __call__(self, x_t: Tensor, t: Any = None, **cond: Any) -> Tensor:
        self.calls += 1
        x = x_t.reshape(x_t.shape[0], -1)
        masked = x == self.vocab
        compat = ((self.states[None] == x[:, None]) | masked[:, None]).all(-1)  # [B, N]
        marg = (compat * self.probs).matmul(self.onehot).reshape(x.shape[0], self.length, self.vocab)
        marg = marg / marg.sum(-1, keepdim=True)
        return marg.log().reshape(*x_t.shape, self.vocab)
