"""Shared sampler plumbing: grid validation, the denoiser call, the final step to data, exponential-integrator
moments.

Every sampler takes a 1-D grid of levels ``logsnrs [N + 1]`` (float64 preferred; the log-SNR for the isotropic
process, the process's level otherwise), strictly monotone; a final ``+inf`` means "the last step lands on data"
and is realised as the x-prediction at the last finite point (the exact DDIM / exponential-integrator limit).
Coefficients are computed up front from the float64 grid on the CPU with torch ops (so they stay differentiable for
:mod:`simdiff.samplers.tuned`) and moved to the state's device and dtype once; the sampling loops then run without
host-device synchronisation.

Processes: every sampler takes ``process=`` (a :class:`simdiff.processes.GaussianProcess`; ``None`` is the
isotropic VP process). The sampler state lives in the process's basis coordinates (``u = encode(z)``); per-step
coefficients come from the process shaped ``[M, *coef_shape]`` and broadcast against the state. Samplers without a
per-coordinate form call :func:`require_isotropic`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from simdiff.process import DenoiserOutput
from simdiff.processes import GaussianProcess, IsotropicGaussian

Callback = Callable[[dict], None]


@dataclass
class Grid:
    """A validated grid: ``lam`` = the finite log-SNRs (float64, CPU, graph kept), ``final_inf`` = ends at +inf."""

    lam: Tensor
    final_inf: bool
    increasing: bool

    @property
    def steps(self) -> int:
        """Number of finite -> finite steps ``M`` (the total is ``M + final_inf``)."""
        return self.lam.shape[0] - 1


def prepare_grid(logsnrs: Tensor, *, name: str, allow_decreasing: bool) -> Grid:
    """Validate ``logsnrs`` (one host sync, up front) and split off a final ``+inf``.

    Raises:
        ValueError: not 1-D / fewer than 2 points / NaN or -inf / +inf before the end / not strictly monotone /
            decreasing where ``allow_decreasing`` is False.
    """
    if not torch.is_tensor(logsnrs):
        logsnrs = torch.as_tensor(logsnrs, dtype=torch.float64)
    if logsnrs.dim() != 1 or logsnrs.shape[0] < 2:
        raise ValueError(f"{name}: logsnrs must be a 1-D tensor with >= 2 points, got shape {tuple(logsnrs.shape)}")
    lam = logsnrs.detach().to(device="cpu", dtype=torch.float64)
    if bool(torch.isnan(lam).any()) or bool((lam == -math.inf).any()):
        raise ValueError(f"{name}: logsnrs contains NaN or -inf: {lam.tolist()}")
    final_inf = bool(lam[-1] == math.inf)
    if bool(torch.isinf(lam[:-1]).any()):
        raise ValueError(f"{name}: +inf is only allowed as the last logsnr (final step to data)")
    diffs = torch.diff(lam[:-1] if final_inf else lam)
    increasing = bool((diffs > 0).all()) if diffs.numel() else True
    if final_inf and not increasing:
        raise ValueError(f"{name}: a grid ending at +inf must be strictly increasing")
    if not increasing and not bool((diffs < 0).all()):
        raise ValueError(f"{name}: logsnrs must be strictly monotone, got {lam.tolist()}")
    if not increasing and not allow_decreasing:
        raise ValueError(f"{name}: needs an increasing logsnr grid (noise -> data); inversion is not supported")
    full = logsnrs.to(device="cpu", dtype=torch.float64)
    return Grid(lam=full[:-1] if final_inf else full, final_inf=final_inf, increasing=increasing)


_ISOTROPIC = IsotropicGaussian()


def resolve_process(process: GaussianProcess | None) -> GaussianProcess:
    """``process``, or the isotropic VP process for ``None``."""
    return _ISOTROPIC if process is None else process


def require_isotropic(process: GaussianProcess | None, name: str) -> None:
    """Refuse a non-isotropic ``process`` with one line (samplers that have only the isotropic VP form)."""
    if process is not None and not process.isotropic:
        raise ValueError(
            f"{name}: sampler has no per-coordinate form and needs the isotropic process; got process "
            f"{process.name!r} (use ddim, ddpm or dpmpp_2m)"
        )


class Net:
    """The denoiser seen from a sampler: state in basis coordinates in, encoded x-prediction out.

    ``net(u, i)`` calls ``denoise(decode(u), lam_i[B], **cond)`` at grid point ``i`` and returns its
    :class:`DenoiserOutput` (data space); ``net.x(u, i)`` is the x-prediction encoded into the basis and cast to the
    state's dtype. The denoiser receives the level (for a :class:`simdiff.nets.DiffusionModel` built with the same
    process, what its backbone sees is ``process.net_cond(level)``); for the isotropic process encode and decode
    return their argument, so the call is exactly ``denoise(z, logsnr[B], **cond)``.

    Host level: a denoiser with a true attribute ``wants_host_level`` (e.g. guidance deciding its interval) also
    gets ``host_level=``, the Python float of the float64 CPU grid value at ``i``, read from a host copy of the grid
    kept here (no device -> host copy, no synchronisation).
    """

    def __init__(
        self,
        denoise: Callable[..., DenoiserOutput],
        z: Tensor,
        grid: Grid,
        cond: dict | None,
        process: GaussianProcess | None = None,
    ) -> None:
        if z.dim() < 1 or z.shape[0] < 1:
            raise ValueError(f"z must be [B, ...] with B >= 1, got shape {tuple(z.shape)}")
        self.denoise, self.cond, self.batch = denoise, dict(cond or {}), z.shape[0]
        self.shape, self.dtype = z.shape, z.dtype
        self.process = resolve_process(process)
        self.lam = grid.lam.to(device=z.device, dtype=torch.promote_types(z.dtype, torch.float32))
        self.host_lam = grid.lam.detach()
        self.host_level = bool(getattr(denoise, "wants_host_level", False))

    def encode(self, z: Tensor) -> Tensor:
        return self.process.encode(z)

    def decode(self, u: Tensor) -> Tensor:
        return self.process.decode(u)

    def __call__(self, u: Tensor, i: int) -> DenoiserOutput:
        cond = self.cond if not self.host_level else {**self.cond, "host_level": float(self.host_lam[i])}
        out = self.denoise(self.decode(u), self.lam[i].expand(self.batch), **cond)
        if out.x.shape != self.shape:
            raise ValueError(f"denoiser returned shape {tuple(out.x.shape)} for z of shape {tuple(self.shape)}")
        return out

    def x(self, u: Tensor, i: int) -> Tensor:
        """The data prediction at grid point ``i``, in basis coordinates and the state's dtype."""
        return self.encode(self(u, i).x.to(self.dtype))

    def emit(self, callback: Callback | None, i: int, u: Tensor, x: Tensor, level: Tensor) -> None:
        """Report step ``i`` as ``dict(i, z, x, logsnr)`` with ``z`` and ``x`` in data space."""
        if callback is not None:
            callback({"i": i, "z": self.decode(u), "x": self.decode(x), "logsnr": level})


def land(net: Net, u: Tensor, grid: Grid, callback: Callback | None, *, x: Tensor | None = None) -> Tensor:
    """Finish a run and return the sample in data space.

    On a grid ending at ``+inf`` the last step returns ``x_hat`` at the last finite point (``x`` when the caller
    already has it, else one more network call) and emits the callback for step ``grid.steps`` with level +inf.
    """
    if grid.final_inf:
        u = net.x(u, grid.steps) if x is None else x
        net.emit(callback, grid.steps, u, u, torch.full_like(net.lam[0], float("inf")))
    return net.decode(u)


def to_state(t: Tensor, z: Tensor) -> Tensor:
    """Move a coefficient tensor to the state's device and dtype (keeps the autograd graph)."""
    return t.to(device=z.device, dtype=z.dtype)


def emit(callback: Callback | None, i: int, z: Tensor, x: Tensor, logsnr: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "z": z, "x": x, "logsnr": logsnr})


def phi_moments(h: Tensor, order: int) -> Tensor:
    """Normalised exponential-integrator moments ``m_k(h) = h^-k int_0^h e^(u - h) u^k du``, k < ``order``.

    ``h`` is a step in ``lambda = logsnr / 2`` (any sign, nonzero). ``m_0 = 1 - e^-h``; larger k by the recursion
    ``m_k = 1 - k m_(k-1) / h`` for ``|h| >= 0.5`` and by the series ``h sum_n (-h)^n k! / (k + n + 1)!`` below that
    (no cancellation). These are the phi-functions of DPM-Solver++ (Lu et al. 2022, eq. 9) times ``h k!``.

    Returns:
        ``[..., order]`` float64.
    """
    small = h.abs() < 0.5
    hs = torch.where(small, h, torch.ones_like(h))  # safe values in each branch so gradients stay finite
    hl = torch.where(small, torch.ones_like(h), h)
    rec = [-torch.expm1(-hl)]
    for k in range(1, order):
        rec.append(1 - k * rec[-1] / hl)
    ser = []
    for k in range(order):
        terms = [(-hs) ** n * (math.factorial(k) / math.factorial(k + n + 1)) for n in range(14)]
        ser.append(hs * torch.stack(terms).sum(0))
    return torch.where(small[..., None], torch.stack(ser, -1), torch.stack(rec, -1))


def adams_weights(nodes: Tensor, moments: Tensor) -> Tensor:
    """Weights ``w`` with ``sum_j w_j xi_j^k = m_k`` for k < len(nodes): exact integration of the interpolant.

    ``nodes``: ``[K]`` normalised positions ``(lambda_j - lambda_i) / h`` of the stored x-predictions (0 first);
    ``moments``: ``[K]`` from :func:`phi_moments`. The exponential Adams-Bashforth rule: the update
    ``z_s = (sigma_s / sigma_t) z_t + alpha_s sum_j w_j x_j`` is exact when x(lambda) is a polynomial of degree < K.
    """
    k = nodes.shape[0]
    vander = nodes[None, :] ** torch.arange(k, dtype=nodes.dtype)[:, None]  # [k (power), K (node)]
    return torch.linalg.solve(vander, moments)
