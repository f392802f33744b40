"""Scores -> detection figures: ROC curve, AUROC, accuracy, and the keep/remove table of a filtering threshold.

Convention: a higher score means "more likely positive" (generated for DIRE, hallucinated for trajectory
variance). AUROC is the Mann-Whitney statistic ``P(s_pos > s_neg) + P(s_pos = s_neg) / 2`` (ties count one half),
computed from ranks with average ranks for ties, so it equals the area under the ROC curve with ties joined by
straight segments.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["auroc", "roc_curve", "accuracy", "filter_table", "best_threshold"]


def _split(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.as_tensor(scores).detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    y = torch.as_tensor(labels).detach().reshape(-1).to("cpu")
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if bool(torch.isnan(s).any()):
        raise ValueError("scores hold NaN")
    y = y.bool() if y.dtype == torch.bool else (y != 0)
    return s, y


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of ``scores [N]`` for binary ``labels [N]`` (1 / True = positive).

    Raises:
        ValueError: lengths differ, NaN scores, or one class absent.
    """
    s, y = _split(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc needs both classes, got {n_pos} positive and {n_neg} negative")
    order = torch.argsort(s)
    sorted_s = s[order]
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, s.shape[0] + 1, dtype=torch.float64)
    # average the ranks of tied scores
    uniq, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    avg = ends - (counts.to(torch.float64) - 1) / 2  # mean of the ranks start..end
    ranks[order] = avg[inverse]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def roc_curve(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ROC points for every distinct threshold: ``(false positive rate, true positive rate, thresholds)``.

    A point is "positive when score >= threshold"; the first point is (0, 0) at threshold +inf, the last (1, 1).
    """
    s, y = _split(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_curve needs both classes, got {n_pos} positive and {n_neg} negative")
    order = torch.argsort(s, descending=True)
    s, y = s[order], y[order].to(torch.float64)
    tp, fp = torch.cumsum(y, 0), torch.cumsum(1 - y, 0)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # the last entry of each run of equal scores
    zero = torch.zeros(1, dtype=torch.float64)
    fpr = torch.cat([zero, fp[last] / n_neg])
    tpr = torch.cat([zero, tp[last] / n_pos])
    thr = torch.cat([torch.tensor([float("inf")], dtype=torch.float64), s[last]])
    return fpr, tpr, thr


def accuracy(scores: Tensor, labels: Tensor, threshold: float) -> float:
    """Fraction classified correctly by "positive when score > threshold"."""
    s, y = _split(scores, labels)
    return float(((s > threshold) == y).to(torch.float64).mean())


def best_threshold(scores: Tensor, labels: Tensor) -> float:
    """The threshold (midpoint between adjacent distinct scores) with the highest accuracy of ``score > t``;
    fit it on training scores, then report :func:`accuracy` on held-out ones."""
    s, y = _split(scores, labels)
    u = torch.unique(s)
    cands = torch.cat([u[:1] - 1, (u[1:] + u[:-1]) / 2, u[-1:] + 1])
    acc = ((s[None, :] > cands[:, None]) == y[None, :]).to(torch.float64).mean(1)
    return float(cands[int(torch.argmax(acc))])


def filter_table(scores: Tensor, outside: Tensor, quantiles: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)
                 ) -> list[dict[str, float]]:
    """What filtering "drop samples with score above the q-quantile" does, for each ``q`` of ``quantiles``.

    Args:
        scores: ``[N]`` hallucination scores.
        outside: ``[N]`` bool, True for samples out of the data's support.

    Returns:
        rows ``{"quantile", "threshold", "kept", "out_removed", "in_kept", "out_rate_after"}``: fraction of all
        samples kept, of out-of-support samples removed, of in-support samples kept, and the out-of-support rate
        among the kept ones.
    """
    s, out = _split(scores, outside)
    rows = []
    for q in quantiles:
        thr = float(torch.quantile(s, q))
        keep = s <= thr
        n_out, n_in = int(out.sum()), int((~out).sum())
        rows.append({
            "quantile": q,
            "threshold": thr,
            "kept": float(keep.to(torch.float64).mean()),
            "out_removed": float((~keep & out).sum() / n_out) if n_out else float("nan"),
            "in_kept": float((keep & ~out).sum() / n_in) if n_in else float("nan"),
            "out_rate_after": float((keep & out).sum() / max(int(keep.sum()), 1)),
        })
    return rows
