"""2-D Kolmogorov flow: a pseudo-spectral Navier-Stokes solver and a seeded, cached forecasting data set.

Equations. Incompressible Navier-Stokes on the periodic square ``[0, 2 pi)^2`` in vorticity form,

    d omega / dt + u . grad(omega) = nu lap(omega) - mu omega + curl(f),     omega = dv/dx - du/dy,

with the velocity from the stream function, ``lap(psi) = -omega``, ``u = dpsi/dy``, ``v = -dpsi/dx`` (divergence
free by construction), viscosity ``nu = 1 / Re`` (unit length and velocity scales), linear drag ``mu`` and the
Kolmogorov forcing ``f = A sin(k_f y) x_hat``, whose curl is ``-A k_f cos(k_f y)``. Arrays are ``[..., y, x]``
(rows are y). This is the setup of Kochkov et al. 2021, "Machine learning-accelerated computational fluid
dynamics" (PNAS), for learned forecasting: ``k_f = 4``, ``A = 1``, ``mu = 0.1``, ``Re = 1000`` (values checked
against the Kolmogorov physics configuration of their jax-cfd code: forcing scale 1, wavenumber 4, linear
coefficient -0.1, viscosity 0.001, density 1; its spectral forcing is the same curl ``-4 cos(4 y)``). Rolling diffusion
(Ruhe, Heek, Salimans, Hoogeboom, ICML 2024) forecasts Kolmogorov flow; we did **not** verify its exact data
settings (grid, Reynolds number, frame spacing, normalisation), so everything below that is not in the two lines
above is our choice: the solver grid, the time step, the burn-in, the frame spacing, the initial condition and
the normalisation scale.

Discretisation. Fourier pseudo-spectral on an ``N x N`` grid (``torch.fft.rfft2``, float64). The advection term is
computed in conservative form ``div(u omega)`` (exactly zero at ``k = 0``, so the mean vorticity is conserved) and
dealiased with Orszag's 2/3 rule: modes with ``|k_x|`` or ``|k_y| > (N - 1) // 3`` are zeroed, so quadratic
products cannot alias onto kept modes. Time stepping: the low-storage IMEX Runge-Kutta / Crank-Nicolson scheme of
Spalart, Moser & Rogers 1991 (J. Comput. Phys. 96; coefficients as commonly quoted, not re-checked against the
paper's text, but consistent: ``alpha_i + beta_i = gamma_i + zeta_i``, ``sum(gamma + zeta) = 1``): three substeps

    (1 - beta_i h L) w_{i+1} = (1 + alpha_i h L) w_i + gamma_i h N(w_i) + zeta_i h N(w_{i-1}),

``gamma = (8/15, 5/12, 3/4)``, ``zeta = (0, -17/60, -5/12)``, ``alpha = beta = (4/15, 1/15, 1/6)``, with the linear
operator ``L = -nu |k|^2 - mu`` treated by Crank-Nicolson (unconditionally stable) and the advection plus forcing
``N`` explicitly (a three-stage third-order RK, stable on the imaginary axis up to ``|lambda h| = sqrt(3)``; with
advection eigenvalues up to ``(|u| + |v|) k_max``, ``k_max = N / 3 = 2 pi / (3 dx)``, that is CFL number
``max(|u| + |v|) h / dx <= 3 sqrt(3) / (2 pi) ~ 0.83``). The time step is fixed: ``dt = cfl * dx / max_velocity``
with ``max_velocity`` a bound on ``|u| + |v|`` (7 by default; we measured up to 7.7 in the start-up transient and
about 5 to 7 later at Re = 1000), and the run raises if the measured CFL number ever exceeds 0.8.

Data. Trajectories start from a random band-limited vorticity field, run ``burn_in`` time units (discarded) on the
``solver_size`` grid, then store every ``frame_every``-th step, spectrally truncated to ``size x size``. Defaults
(our choice): 64 x 64 output solved on 128 x 128, because Re = 1000 is under-resolved on 64 x 64 (time-averaged
shell energy at k = 20 was 2.6e-4 solved on 64 x 64 against 9e-5 on 128 x 128: energy piles up at the cutoff);
``dt = 0.0035``, a frame every 64 steps (0.224 time units; measured frame-to-frame vorticity correlation 0.81, 0.37
after 4 frames, 0.13 after 8), burn-in 20 time units (kinetic energy and vorticity variance level off after
about 10). Measured stationary vorticity std about 4.8 (hence :data:`VORTICITY_SCALE`). Cost: the 128 x 128 solve
takes 1.5 to 1.9 ms per trajectory and step on one CPU thread (batches of 1 to 16), and 24 frames at the defaults
are 6700 steps, most of them burn-in: 4 trajectories took 51 s. For many training windows, generate few long
trajectories and cut them with :func:`simdiff.data.sequences.sliding_windows`.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

from simdiff.data.sequences import cached_array, progress_bar, sequence_generator

__all__ = ["KolmogorovFlow", "kolmogorov_trajectories", "energy_spectrum", "spectral_resize", "VORTICITY_SCALE"]

#: Divide vorticity by this to get roughly unit scale: the stationary vorticity std measured with the default
#: parameters of :func:`kolmogorov_trajectories` (Re = 1000, k_f = 4, drag 0.1, 64 x 64 output). Our choice.
VORTICITY_SCALE = 4.7

_CFL_LIMIT = 0.8  # below the RK3 limit 3 sqrt(3) / (2 pi) ~ 0.83 for 2/3-dealiased advection
_RK_GAMMA = (8 / 15, 5 / 12, 3 / 4)
_RK_ZETA = (0.0, -17 / 60, -5 / 12)
_RK_ALPHA = (4 / 15, 1 / 15, 1 / 6)  # = beta (Crank-Nicolson on each substep)


class KolmogorovFlow:
    """Pseudo-spectral solver of the forced 2-D vorticity equation (see the module docstring).

    Args:
        size: grid points per side ``N`` (even, >= 8).
        viscosity: ``nu`` (``1 / Re``).
        drag: linear drag ``mu``.
        forcing_wavenumber: ``k_f``.
        forcing_amplitude: ``A`` (0 switches the forcing off).
        dt: time step.

    States are spectral: complex128 ``w_hat [B, N, N // 2 + 1]`` (``rfft2`` of the grid vorticity ``[B, N, N]``).
    """

    def __init__(self, size: int, *, viscosity: float, drag: float = 0.1, forcing_wavenumber: int = 4,
                 forcing_amplitude: float = 1.0, dt: float):
        if size < 8 or size % 2:
            raise ValueError(f"size must be an even integer >= 8, got {size}")
        if viscosity <= 0 or drag < 0 or dt <= 0:
            raise ValueError(f"need viscosity > 0, drag >= 0, dt > 0; got {viscosity}, {drag}, {dt}")
        if not 0 < forcing_wavenumber <= (size - 1) // 3:
            raise ValueError(f"forcing_wavenumber must be in 1..{(size - 1) // 3} for size {size}")
        self.size, self.nu, self.mu, self.dt = size, float(viscosity), float(drag), float(dt)
        n = size
        ky = torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64).view(n, 1)
        kx = torch.fft.rfftfreq(n, 1.0 / n, dtype=torch.float64).view(1, -1)
        self.kx, self.ky = kx.expand(n, -1).clone(), ky.expand(-1, kx.shape[1]).clone()
        self.k2 = self.kx**2 + self.ky**2
        self.inv_k2 = torch.where(self.k2 > 0, 1.0 / self.k2.clamp(min=1), torch.zeros_like(self.k2))
        cut = (n - 1) // 3
        self.mask = (self.kx.abs() <= cut) & (self.ky.abs() <= cut)
        self.linear = -self.nu * self.k2 - self.mu  # L
        y = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
        curl_f = (-forcing_amplitude * forcing_wavenumber * torch.cos(forcing_wavenumber * y)).view(n, 1).expand(n, n)
        self.forcing_hat = torch.fft.rfft2(curl_f) * self.mask

    @property
    def dx(self) -> float:
        return 2 * math.pi / self.size

    def to_grid(self, w_hat: Tensor) -> Tensor:
        """Spectral ``[..., N, N//2+1]`` -> grid ``[..., N, N]`` (float64)."""
        return torch.fft.irfft2(w_hat, s=(self.size, self.size))

    def from_grid(self, w: Tensor) -> Tensor:
        """Grid vorticity ``[..., N, N]`` -> spectral state, dealiased."""
        return torch.fft.rfft2(w.to(torch.float64)) * self.mask

    def velocity_hat(self, w_hat: Tensor) -> tuple[Tensor, Tensor]:
        """``(u_hat, v_hat)`` from ``psi_hat = w_hat / |k|^2`` (``u = dpsi/dy``, ``v = -dpsi/dx``; mean flow 0)."""
        psi = w_hat * self.inv_k2
        return 1j * self.ky * psi, -1j * self.kx * psi

    def velocity(self, w_hat: Tensor) -> tuple[Tensor, Tensor]:
        """Grid velocity ``(u, v)``, each ``[..., N, N]``."""
        u_hat, v_hat = self.velocity_hat(w_hat)
        return self.to_grid(u_hat), self.to_grid(v_hat)

    def explicit_term(self, w_hat: Tensor) -> Tensor:
        """``N(w) = -div(u w) + curl(f)`` in spectral space, 2/3-dealiased."""
        u, v = self.velocity(w_hat)
        w = self.to_grid(w_hat)
        flux_x, flux_y = torch.fft.rfft2(u * w), torch.fft.rfft2(v * w)
        return (-1j * (self.kx * flux_x + self.ky * flux_y)) * self.mask + self.forcing_hat

    def step(self, w_hat: Tensor) -> Tensor:
        """One IMEX RK3 / Crank-Nicolson step of length ``dt``."""
        h, prev = self.dt, None
        for gamma, zeta, ab in zip(_RK_GAMMA, _RK_ZETA, _RK_ALPHA):
            n_cur = self.explicit_term(w_hat)
            rhs = w_hat * (1 + ab * h * self.linear) + (gamma * h) * n_cur
            if prev is not None:
                rhs = rhs + (zeta * h) * prev
            w_hat, prev = rhs / (1 - ab * h * self.linear), n_cur
        return w_hat

    def cfl(self, w_hat: Tensor) -> float:
        """``max(|u| + |v|) dt / dx`` over the batch."""
        u, v = self.velocity(w_hat)
        return float((u.abs() + v.abs()).max()) * self.dt / self.dx

    def random_state(self, generator: torch.Generator, *, peak_wavenumber: float = 4.0, rms: float = 2.0) -> Tensor:
        """A random band-limited initial vorticity ``w_hat [N, N//2+1]`` (zero mean, grid std ``rms``).

        Gaussian white noise filtered by ``|k|^2 exp(-(|k| / k_0)^2)`` (``k_0`` = ``peak_wavenumber``); our choice.
        """
        noise = torch.randn(self.size, self.size, generator=generator, dtype=torch.float64)
        w_hat = torch.fft.rfft2(noise) * self.k2 * torch.exp(-self.k2 / peak_wavenumber**2) * self.mask
        w = self.to_grid(w_hat)
        return self.from_grid(w * (rms / w.std()))


def energy_spectrum(w: Tensor) -> Tensor:
    """Shell-summed kinetic energy ``E(k) = 1/2 sum_{round|k| = k} |u_hat|^2`` of grid vorticity ``[..., N, N]``.

    ``u_hat`` is normalised so that ``sum_k E(k)`` is the mean of ``(u^2 + v^2) / 2`` over the grid. Returns
    ``[..., N // 2 + 1]`` for ``k = 0 .. N // 2`` (float64; modes beyond ``N / 2`` are left out).
    """
    n = w.shape[-1]
    w_hat = torch.fft.fft2(w.to(torch.float64)) / (n * n)
    k = torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64)
    k2 = k.view(-1, 1) ** 2 + k.view(1, -1) ** 2
    e = 0.5 * w_hat.abs() ** 2 * torch.where(k2 > 0, 1.0 / k2.clamp(min=1), torch.zeros_like(k2))  # |u_hat|^2/2
    shell = torch.sqrt(k2).round().long().clamp(max=n // 2 + 1)
    out = torch.zeros(*w.shape[:-2], n // 2 + 2, dtype=torch.float64)
    out.index_add_(-1, shell.flatten(), e.flatten(-2))
    return out[..., : n // 2 + 1]


def spectral_resize(w: Tensor, size: int) -> Tensor:
    """Band-limit grid fields ``[..., N, N]`` to ``size x size`` by Fourier truncation (``size <= N``, even).

    The result holds the field's Fourier modes with ``|k_x|, |k_y| < size / 2`` sampled on the coarse grid
    (Nyquist modes dropped); ``size == N`` returns ``w`` unchanged.
    """
    n = w.shape[-1]
    if size == n:
        return w
    if size > n or size % 2:
        raise ValueError(f"spectral_resize needs an even size <= {n}, got {size}")
    w_hat = torch.fft.rfft2(w)
    h = size // 2
    coarse = torch.zeros(*w.shape[:-2], size, h + 1, dtype=w_hat.dtype)
    coarse[..., :h, :h] = w_hat[..., :h, :h]
    coarse[..., -h + 1 :, :h] = w_hat[..., -h + 1 :, :h]
    return torch.fft.irfft2(coarse, s=(size, size)) * (size / n) ** 2


def kolmogorov_trajectories(
    num: int,
    frames: int,
    *,
    size: int = 64,
    reynolds: float = 1000.0,
    solver_size: int | None = None,
    drag: float = 0.1,
    forcing_wavenumber: int = 4,
    dt: float | None = None,
    max_velocity: float = 7.0,
    cfl: float = 0.5,
    frame_every: int = 64,
    burn_in: float = 20.0,
    seed: int = 0,
    normalize: bool = False,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
    progress: bool = True,
) -> Tensor:
    """Vorticity trajectories of 2-D Kolmogorov flow, float32 ``[num, frames, 1, size, size]``.

    Each trajectory starts from :meth:`KolmogorovFlow.random_state` (its own seeded generator), runs ``burn_in``
    time units (discarded), then keeps one frame every ``frame_every`` solver steps, the first one at the end of
    the burn-in. Trajectories are solved together as one batch in float64 and stored as float32.

    Args:
        num, frames: number of trajectories and frames per trajectory.
        size: output grid side (Fourier-truncated from the solver grid).
        reynolds: ``Re``; the viscosity is ``1 / Re``.
        solver_size: solver grid side (default ``2 * size``: Re = 1000 is under-resolved on 64 x 64).
        drag, forcing_wavenumber: ``mu`` and ``k_f`` (amplitude 1).
        dt: solver time step; default ``cfl * (2 pi / solver_size) / max_velocity``.
        frame_every: solver steps between stored frames (frame spacing ``frame_every * dt`` time units).
        burn_in: time units discarded before the first frame.
        seed: same seed and parameters give the identical array (bit for bit on one machine and torch build;
            checked with 1 and 2 threads). Another FFT library may differ in the last bit, which the chaotic flow
            amplifies over the burn-in, so share the cache file rather than regenerating for exact comparisons.
        normalize: divide by :data:`VORTICITY_SCALE` (rough unit scale; applied after the cache, which holds the
            raw vorticity).
        cache_dir, cache: the .npz cache (see :mod:`simdiff.data.sequences`); ``cache=False`` neither reads nor
            writes it.
        progress: a tqdm bar over solver steps and one printed line with shape, size and time.

    Raises:
        ValueError: bad parameters, or a run whose CFL number exceeds 0.8 (one line; lower ``dt``).
    """
    if num < 1 or frames < 1 or frame_every < 1 or burn_in < 0 or reynolds <= 0:
        raise ValueError(f"need num, frames, frame_every >= 1, burn_in >= 0, reynolds > 0; got "
                         f"{num}, {frames}, {frame_every}, {burn_in}, {reynolds}")
    n = solver_size if solver_size is not None else 2 * size
    step = dt if dt is not None else cfl * (2 * math.pi / n) / max_velocity
    flow = KolmogorovFlow(n, viscosity=1.0 / reynolds, drag=drag, forcing_wavenumber=forcing_wavenumber, dt=step)
    if size > n or size % 2:
        raise ValueError(f"size must be even and <= solver_size ({n}), got {size}")
    burn_steps = int(math.ceil(burn_in / step))
    params = {"num": num, "frames": frames, "size": size, "reynolds": float(reynolds), "solver_size": n,
              "drag": float(drag), "forcing_wavenumber": forcing_wavenumber, "dt": step,
              "frame_every": frame_every, "burn_steps": burn_steps, "seed": seed}

    def compute() -> np.ndarray:
        w_hat = torch.stack([flow.random_state(sequence_generator(seed, i)) for i in range(num)])
        out = np.empty((num, frames, 1, size, size), dtype=np.float32)
        total = burn_steps + (frames - 1) * frame_every
        check_every = max(1, min(frame_every, 50))
        with progress_bar(total, f"kolmogorov {num}x{frames} @ {n}^2", "step", progress) as advance:
            for s in range(total + 1):
                if s >= burn_steps and (s - burn_steps) % frame_every == 0:
                    w = spectral_resize(flow.to_grid(w_hat), size)
                    out[:, (s - burn_steps) // frame_every, 0] = w.to(torch.float32).numpy()
                if s == total:
                    break
                if s % check_every == 0:
                    c = flow.cfl(w_hat)
                    if not c <= _CFL_LIMIT:  # also catches NaN
                        raise ValueError(f"Kolmogorov run unstable: CFL number {c:.3g} > {_CFL_LIMIT} at step {s}; "
                                         f"lower dt (now {step:.4g}) or raise max_velocity")
                w_hat = flow.step(w_hat)
                advance(1)
        return out

    data = cached_array("kolmogorov", params, compute, shape=(num, frames, 1, size, size), dtype=np.float32,
                        cache_dir=cache_dir, cache=cache, verbose=progress)
    x = torch.from_numpy(data)
    return x / VORTICITY_SCALE if normalize else x
