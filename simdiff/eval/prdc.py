"""Improved precision and recall with k-NN manifolds (Kynkäänniemi et al. 2019, "Improved Precision and Recall
Metric for Assessing Generative Models", Sec. 2, eqs. 1-2).

The manifold of a feature set ``Phi`` is the union of balls ``B(phi, r_k(phi))`` where ``r_k(phi)`` is the distance
from ``phi`` to its k-th nearest neighbour in ``Phi`` (itself excluded). Then

* precision = fraction of fake features inside the manifold of the real ones,
* recall    = fraction of real features inside the manifold of the fake ones.

Distances are Euclidean, in float64, computed with ``torch.cdist`` over row blocks (no Python loops over points).
A point lying exactly on a ball's boundary counts as inside (``<=``), so identical sets give precision = recall = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from simdiff.eval.fid import _check_feats

__all__ = ["precision_recall", "knn_radii", "in_manifold"]


def _row_blocks(n: int, cols: int, budget: int = 2**24) -> range:
    """Row-block starts so a ``[block, cols]`` float64 distance matrix stays within ``budget`` elements."""
    return range(0, n, max(1, budget // max(cols, 1)))


def knn_radii(feats: Tensor, *, k: int) -> Tensor:
    """Distance ``[N]`` from each row of ``feats`` ``[N, D]`` to its k-th nearest other row."""
    n = feats.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N-1] = [1, {n - 1}], got k={k}")
    step = _row_blocks(n, n).step
    out = []
    for s in range(0, n, step):
        d = torch.cdist(feats[s : s + step], feats)
        # The (k+1)-th smallest includes the point itself at distance ~0.
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def in_manifold(queries: Tensor, support: Tensor, radii: Tensor) -> Tensor:
    """Bool ``[Q]``: whether each query lies in some ball ``B(support_i, radii_i)``."""
    step = _row_blocks(queries.shape[0], support.shape[0]).step
    out = []
    for s in range(0, queries.shape[0], step):
        d = torch.cdist(queries[s : s + step], support)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real_feats, fake_feats, *, k: int = 3) -> dict[str, float]:
    """Improved precision / recall of ``fake_feats`` ``[M, D]`` against ``real_feats`` ``[N, D]`` (k-NN radii).

    Returns:
        ``{"precision": float, "recall": float}``, both in [0, 1].
    """
    real = _check_feats(real_feats, "real_feats")
    fake = _check_feats(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real_feats {tuple(real.shape)} vs fake_feats {tuple(fake.shape)}")
    r_real = knn_radii(real, k=k)
    r_fake = knn_radii(fake, k=k)
    precision = in_manifold(fake, real, r_real).double().mean()
    recall = in_manifold(real, fake, r_fake).double().mean()
    return {"precision": float(precision), "recall": float(recall)}
