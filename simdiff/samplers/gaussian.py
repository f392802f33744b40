"""The Gaussian start: carry the starting noise through the high-noise part of the PF-ODE without the network.

At low signal-to-noise the optimal denoiser of any data distribution is, to first order, that of a Gaussian with the
data's mean and covariance; for Gaussian data ``N(mu, S)`` it is exact in closed form,

    E[x | z] = mu + alpha S (alpha^2 S + sigma^2 I)^-1 (z - alpha mu),   z = alpha x + sigma eps,

and the probability-flow ODE it drives is linear. Wang & Vastola ("The Hidden Linear Structure in Score-Based Models
and its Application", 2023) observed that trained score models follow this Gaussian field closely at high noise
and used its analytic solution to skip the first sampling steps. Here that idea is the start of every default
(calibrated-grid) sampling run of a model whose data moments are known:

1. :class:`DataMoments`: per class (and for the whole data set, the row guidance uses as "unconditional") the
   mean, the top ``rank`` eigenvectors and eigenvalues of the covariance, and the mean of the remaining
   eigenvalues (an isotropic residual). Computed once from the training images (:meth:`DataMoments.from_images`);
   a run directory keeps them in ``data_moments.safetensors`` and an exported file embeds them.
2. :class:`GaussianDenoiser`: the closed-form posterior mean above for those moments, a denoiser with the
   network's signature (``labels`` choose the class; the null label, or none, the whole data set), so classifier-free
   guidance and its interval wrap it exactly as they wrap the network.
3. :func:`gaussian_start`: the starting noise at the schedule's first level is carried to the grid's first level
   ``lambda_s`` by UniPC on :data:`FLOW_STEPS` uniform log-SNR steps of that (guided) Gaussian denoiser: no network
   call. The network's calls then all lie above ``lambda_s``, on the calibrated grid from ``lambda_s``.

Where to start (:func:`start_level`): ``lambda_s = mu_cal - start_offset(steps)`` with ``mu_cal`` the calibrated
grid's centre (:mod:`simdiff.samplers.calibrate`, where the model's sample content is decided) and
``start_offset = 5`` up to 15 network calls, ``5 + 0.4 (steps - 15)`` beyond; clipped to the schedule's range (a
start at or below the first level means no Gaussian start). The rule was chosen on the "train" mixtures of
``benchmarks/samplers.py`` with moments estimated from 50,000 samples (offsets 5, 6, 7, 8, 10 compared at 5-20
calls: 5 had the lowest geometric-mean RMSE ratio at 5, 8 and 15 calls, 6 at 10 (0.47 vs 0.50), 7 at 20 (0.32 vs
0.48, where 5 was worse than no Gaussian start)) and is reported on the held-out ones. The error it adds is the
data's non-Gaussianity below ``lambda_s`` plus the error of the estimated moments: a bias that does not shrink with
more calls, so the start moves down as the budget grows. On the shipped MNIST model (RMSE to the PF-ODE solution)
offsets of 3-5 all beat no Gaussian start at 4-10 calls; rank 16-64 gave the same RMSE as the full 784 x 784
covariances.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from simdiff.process import DenoiserOutput, to_output

__all__ = ["DataMoments", "GaussianDenoiser", "gaussian_start", "start_level", "start_offset", "START_OFFSET",
           "START_SLOPE", "FLOW_STEPS",
           "MOMENTS_FILE", "MOMENTS_PREFIX", "DEFAULT_RANK"]

#: ``lambda_s = calibration centre - START_OFFSET`` up to 15 steps, ``START_SLOPE`` lower per step beyond.
START_OFFSET = 5.0
START_SLOPE = 0.4
#: UniPC steps of the Gaussian flow from the schedule's first level to ``lambda_s``.
FLOW_STEPS = 32
#: eigenpairs kept per class.
DEFAULT_RANK = 32
#: the file a run directory keeps its data moments in.
MOMENTS_FILE = "data_moments.safetensors"
#: the key prefix of the moments embedded in an exported ``.safetensors`` file.
MOMENTS_PREFIX = "data_moments."
_MAX_EXAMPLES = 50_000
_EXACT_DIM = 2048


def _group_moments(x: Tensor, rank: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean, top-``rank`` eigenvectors ``[d, r]`` / eigenvalues ``[r]`` and residual eigenvalue of ``x [n, d]``."""
    if x.shape[0] > _MAX_EXAMPLES:
        x = x[torch.randperm(x.shape[0], generator=generator)[:_MAX_EXAMPLES]]
    x = x.to(torch.float64)
    n, d = x.shape
    mean = x.mean(0)
    xc = x - mean
    total = float(xc.pow(2).sum()) / max(n - 1, 1)
    r = min(rank, d, max(n - 1, 1))
    # the right singular vectors of the centred data are the covariance's eigenvectors
    if d <= _EXACT_DIM:
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        vecs = vh[:r].T
    else:  # randomised (Halko et al. 2011), seeded through the global generator state
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
            _, s, vecs = torch.svd_lowrank(xc, q=min(r + 10, n, d), niter=4)
        vecs = vecs[:, :r]
    vals = s[:r] ** 2 / max(n - 1, 1)
    resid = max(total - float(vals.sum()), 0.0) / max(d - r, 1)
    return mean, vecs.contiguous(), vals, torch.tensor(resid, dtype=torch.float64)


@dataclass
class DataMoments:
    """Gaussian moments of a data set, per group: groups ``0 .. num_classes - 1`` are the classes and the last group
    the whole data set (an unconditional model has that one group only).

    Attributes:
        mean: ``[G, d]``; basis: ``[G, d, r]`` orthonormal columns; eigvals: ``[G, r]``; resid: ``[G]`` (the mean of
        the other ``d - r`` eigenvalues); shape: one example's shape; num_classes: 0 for an unconditional model.
    """

    mean: Tensor
    basis: Tensor
    eigvals: Tensor
    resid: Tensor
    shape: tuple[int, ...]
    num_classes: int = 0

    def __post_init__(self) -> None:
        g, d = self.mean.shape
        if (self.basis.shape[:2] != (g, d) or self.eigvals.shape != (g, self.basis.shape[2])
                or self.resid.shape != (g,) or math.prod(self.shape) != d or g != self.num_classes + 1):
            raise ValueError(f"DataMoments: inconsistent shapes mean {tuple(self.mean.shape)}, basis "
                             f"{tuple(self.basis.shape)}, eigvals {tuple(self.eigvals.shape)}, resid "
                             f"{tuple(self.resid.shape)}, example shape {self.shape}, {self.num_classes} classes")
        for name in ("mean", "basis", "eigvals", "resid"):
            if not bool(torch.isfinite(getattr(self, name)).all()):
                raise ValueError(f"DataMoments: {name} holds NaN/inf")

    @classmethod
    def from_images(cls, images: Tensor, labels: Tensor | None = None, num_classes: int = 0, *,
                    rank: int = DEFAULT_RANK, seed: int = 0) -> DataMoments:
        """Moments of ``images [N, ...]`` (per class when ``num_classes > 0``; ``labels [N]`` then required; a class
        with fewer than 2 examples gets the whole set's moments).

        At most 50,000 examples per group are used (a seeded random subset); float64 SVD of the centred data
        (randomised above 2048 dimensions).
        """
        if num_classes > 0 and (labels is None or labels.shape != images.shape[:1]):
            raise ValueError("DataMoments.from_images: per-class moments need labels of shape [N]")
        if rank < 1:
            raise ValueError(f"DataMoments.from_images: rank must be >= 1, got {rank}")
        gen = torch.Generator().manual_seed(seed)
        flat = images.reshape(images.shape[0], -1)
        if flat.shape[0] < 2:
            raise ValueError("DataMoments.from_images: need at least 2 examples")
        whole = _group_moments(flat, rank, gen)
        parts = [_group_moments(g, rank, gen) if g.shape[0] >= 2 else whole
                 for g in (flat[labels == c] for c in range(num_classes))] + [whole]
        r = min(p[2].shape[0] for p in parts)
        return cls(mean=torch.stack([p[0] for p in parts]), basis=torch.stack([p[1][:, :r] for p in parts]),
                   eigvals=torch.stack([p[2][:r] for p in parts]), resid=torch.stack([p[3] for p in parts]),
                   shape=tuple(int(s) for s in images.shape[1:]), num_classes=int(num_classes))

    # ------------------------------------------------------------------------------------------- storage
    def tensors(self, prefix: str = "", dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Tensors for a safetensors file, floating point in ``dtype`` (shape and class count as int64)."""
        return {f"{prefix}mean": self.mean.to(dtype).contiguous(), f"{prefix}basis": self.basis.to(dtype).contiguous(),
                f"{prefix}eigvals": self.eigvals.to(dtype).contiguous(), f"{prefix}resid": self.resid.to(dtype),
                f"{prefix}shape": torch.tensor(self.shape, dtype=torch.int64),
                f"{prefix}num_classes": torch.tensor([self.num_classes], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str = "") -> DataMoments | None:
        """The moments stored by :meth:`tensors` under ``prefix``; ``None`` when there are none.

        Raises:
            ValueError: some but not all of the entries, or inconsistent shapes.
        """
        names = ("mean", "basis", "eigvals", "resid", "shape", "num_classes")
        found = [f"{prefix}{n}" in tensors for n in names]
        if not any(found):
            return None
        if not all(found):
            raise ValueError(f"data moments: missing {[prefix + n for n, f in zip(names, found) if not f]}")
        t = {n: tensors[f"{prefix}{n}"] for n in names}
        return cls(mean=t["mean"].double(), basis=t["basis"].double(), eigvals=t["eigvals"].double(),
                   resid=t["resid"].double(), shape=tuple(int(v) for v in t["shape"].tolist()),
                   num_classes=int(t["num_classes"].reshape(-1)[0]))

    def save(self, path: str | Path) -> Path:
        """Write to ``path`` (a ``.safetensors`` file) atomically."""
        from safetensors.torch import save as st_save

        from simdiff.train.rundir import atomic_write_bytes

        path = Path(path)
        atomic_write_bytes(path, st_save(self.tensors(), metadata={"format": "simdiff-data-moments"}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> DataMoments | None:
        """Read a file written by :meth:`save`; ``None`` if it does not exist."""
        from simdiff.train.checkpoint import read_safetensors

        path = Path(path)
        if not path.is_file():
            return None
        tensors, _ = read_safetensors(path)
        return cls.from_tensors(tensors)


class GaussianDenoiser:
    """The exact posterior-mean denoiser of Gaussian data with the given moments (module doc), per example:
    ``labels`` in ``[0, num_classes)`` use that class's moments; the null label ``num_classes`` (or no labels) the
    whole data set's. Computed in ``z``'s dtype (at least float32). Other conditioning keywords are ignored."""

    def __init__(self, moments: DataMoments) -> None:
        self.moments = moments
        self._on: dict[Any, tuple[Tensor, ...]] = {}

    def _tensors(self, device: torch.device) -> tuple[Tensor, ...]:
        if device not in self._on:
            m = self.moments
            self._on[device] = tuple(t.to(device=device, dtype=torch.float64)
                                     for t in (m.mean, m.basis, m.eigvals, m.resid))
        return self._on[device]

    def groups(self, labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """The moment group of each example: its class, or the whole set for the null label / no labels."""
        null = self.moments.num_classes
        if labels is None or null == 0:
            return torch.full((batch,), null, dtype=torch.long, device=device)
        g = torch.as_tensor(labels, device=device).reshape(-1).long().expand(batch)
        return torch.where((g >= 0) & (g < null), g, torch.full_like(g, null))

    def __call__(self, z: Tensor, logsnr: Tensor, labels: Tensor | None = None, **_: Any) -> DenoiserOutput:
        dtype = torch.promote_types(z.dtype, torch.float32)
        mean, basis, eigvals, resid = (t.to(dtype) for t in self._tensors(z.device))
        b = z.shape[0]
        g = self.groups(labels, b, z.device)
        zf = z.reshape(b, -1).to(dtype)
        lam = torch.as_tensor(logsnr, device=z.device, dtype=dtype).reshape(-1).expand(b)[:, None]
        a2 = torch.sigmoid(lam)
        a, s2 = a2.sqrt(), torch.sigmoid(-lam)
        y = zf - a * mean[g]
        # every group's basis at once ([B, G, r] coefficients, then the example's own group): no gather of a
        # [B, d, r] basis and no host synchronisation
        onehot = torch.nn.functional.one_hot(g, mean.shape[0]).to(dtype)  # [B, G]
        coef = torch.einsum("bd,gdr->bgr", y, basis) * onehot[:, :, None]
        gain = a * eigvals[g] / (a2 * eigvals[g] + s2)
        rgain = a * resid[g][:, None] / (a2 * resid[g][:, None] + s2)
        x = mean[g] + rgain * y + torch.einsum("bgr,gdr->bd", coef * (gain - rgain)[:, None, :], basis)
        return to_output("x", x.reshape(z.shape).to(z.dtype), z=z, logsnr=logsnr)


def start_offset(steps: int) -> float:
    """``START_OFFSET + START_SLOPE max(0, steps - 15)``: how far below the calibration centre the grid starts."""
    return START_OFFSET + START_SLOPE * max(0, int(steps) - 15)


def start_level(schedule, calibration_mu: float, grid_end: float, steps: int) -> float | None:
    """``lambda_s = calibration_mu - start_offset(steps)`` when it lies above the schedule's first level and below
    ``grid_end`` (the grid's last finite level); else ``None`` (start at the schedule's first level)."""
    lo = float(schedule.logsnr_min)
    lam = calibration_mu - start_offset(steps)
    return lam if lo < lam < grid_end - 1e-6 else None


def gaussian_start(denoise, z: Tensor, lam_from: float, lam_to: float, *, cond: dict | None = None,
                   steps: int = FLOW_STEPS) -> Tensor:
    """Carry ``z`` (distributed as the diffused data at log-SNR ``lam_from``) to ``lam_to`` along the PF-ODE of
    ``denoise`` (a :class:`GaussianDenoiser`, possibly wrapped in guidance) with UniPC on ``steps`` uniform
    log-SNR steps; ``z`` is returned unchanged when ``lam_to <= lam_from``."""
    if not lam_to > lam_from:
        return z
    from simdiff.samplers.unipc import sample_unipc

    grid = torch.linspace(float(lam_from), float(lam_to), steps + 1, dtype=torch.float64)
    return sample_unipc(denoise, z, grid, cond=cond)
