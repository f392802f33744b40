"""Kolmogorov-flow solver (float64, against closed forms) and its seeded, cached trajectory data set."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from simdiff.data import DataError
from simdiff.data.kolmogorov import (
    VORTICITY_SCALE,
    KolmogorovFlow,
    energy_spectrum,
    kolmogorov_trajectories,
    spectral_resize,
)
from simdiff.data.sequences import cache_path


def _grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    y, x = torch.meshgrid(x, x, indexing="ij")  # arrays are [y, x]
    return x, y


def _turbulent(n: int = 32, batch: int = 2, steps: int = 300, seed: int = 0) -> tuple[KolmogorovFlow, torch.Tensor]:
    flow = KolmogorovFlow(n, viscosity=1 / 200, drag=0.1, dt=0.02)
    w_hat = torch.stack([flow.random_state(torch.Generator().manual_seed(seed + i)) for i in range(batch)])
    for _ in range(steps):
        w_hat = flow.step(w_hat)
    return flow, w_hat


def test_mean_vorticity_conserved_and_velocity_divergence_free():
    flow, w_hat = _turbulent(steps=300)  # forced, nonlinear, 6 time units
    w = flow.to_grid(w_hat)
    assert float(w.std()) > 1.0  # a developed, non-trivial field
    assert float(w.mean((-1, -2)).abs().max()) < 1e-13 * float(w.abs().max())  # measured 2e-16
    u, v = flow.velocity(w_hat)
    u_hat, v_hat = torch.fft.rfft2(u), torch.fft.rfft2(v)
    div = 1j * (flow.kx * u_hat + flow.ky * v_hat)  # spectral divergence of the grid velocity
    scale = float((flow.k2.sqrt() * (u_hat.abs() + v_hat.abs())).max())
    assert float(div.abs().max()) < 1e-13 * scale  # measured 3e-16
    curl = torch.fft.irfft2(1j * (flow.kx * v_hat - flow.ky * u_hat), s=w.shape[-2:])  # dv/dx - du/dy
    assert float((curl - w).abs().max()) < 1e-12 * float(w.abs().max())


@pytest.mark.parametrize("drag", [0.0, 0.1])
def test_taylor_green_vortex_decays_at_the_analytic_rate(drag):
    """psi = sin(kx) sin(ky), omega = 2 k^2 psi: advection vanishes and omega(t) = omega(0) exp(-(2 nu k^2 + mu) t)."""
    n, k, nu, dt, steps = 32, 2, 0.05, 0.01, 200
    flow = KolmogorovFlow(n, viscosity=nu, drag=drag, forcing_amplitude=0.0, dt=dt)
    x, y = _grid(n)
    w0 = 2 * k**2 * torch.sin(k * x) * torch.sin(k * y)  # velocity amplitude 2: advection is exercised
    w_hat = flow.from_grid(w0)
    worst = 0.0
    for s in range(1, steps + 1):
        w_hat = flow.step(w_hat)
        if s % 50 == 0:
            exact = w0 * math.exp(-(2 * nu * k**2 + drag) * s * dt)
            worst = max(worst, float((flow.to_grid(w_hat) - exact).abs().max() / exact.abs().max()))
    assert worst < 1e-6  # measured 2.0e-7 (drag 0) and 4.0e-7 (drag 0.1) after 2 time units


def test_forced_shear_flow_approaches_the_laminar_kolmogorov_state():
    """From rest, a single forced mode: omega = -A k_f cos(k_f y) / (nu k_f^2 + mu) * (1 - exp(-(nu k_f^2 + mu) t))."""
    n, kf, nu, mu, amp, dt, steps = 32, 4, 0.02, 0.1, 1.5, 0.01, 300
    flow = KolmogorovFlow(n, viscosity=nu, drag=mu, forcing_wavenumber=kf, forcing_amplitude=amp, dt=dt)
    w_hat = torch.zeros(1, n, n // 2 + 1, dtype=torch.complex128)
    for _ in range(steps):
        w_hat = flow.step(w_hat)
    _, y = _grid(n)
    rate = nu * kf**2 + mu
    exact = -amp * kf * torch.cos(kf * y) / rate * (1 - math.exp(-rate * steps * dt))
    w = flow.to_grid(w_hat)[0]
    assert float((w - exact).abs().max() / exact.abs().max()) < 1e-6  # measured 1.4e-7
    u, v = flow.velocity(w_hat)  # u = A sin(k_f y) (...) along x, v = 0
    assert float(v.abs().max()) < 1e-12 and float((u[0] - u[0, :, :1]).abs().max()) < 1e-12
    assert float(torch.corrcoef(torch.stack([u[0, :, 0], torch.sin(kf * y[:, 0])]))[0, 1]) > 1 - 1e-12


def test_energy_spectrum_of_the_statistically_steady_state_is_stable():
    """32 x 32, Re 200 (chaotic), 4 trajectories: time-averaged spectra over t in [20, 40) and [40, 60) agree."""
    flow = KolmogorovFlow(32, viscosity=1 / 200, drag=0.1, dt=0.02)
    w_hat = torch.stack([flow.random_state(torch.Generator().manual_seed(i)) for i in range(4)])
    early, late_a, late_b, energy = [], [], [], []
    for s in range(3000):
        w_hat = flow.step(w_hat)
        if s % 5:
            continue
        spec = energy_spectrum(flow.to_grid(w_hat))  # [4, 17]
        energy.append(spec.sum(-1))
        (early if s < 250 else late_a if 1000 <= s < 2000 else late_b if s >= 2000 else []).append(spec)
    e = torch.stack(energy[200:])  # after burn-in
    assert float(e.std() / e.mean()) > 0.03  # the state fluctuates: not a laminar fixed point (measured 0.09)

    def rel_l1(a: list, b: list) -> float:
        sa, sb = torch.stack(a).mean((0, 1))[1:11], torch.stack(b).mean((0, 1))[1:11]  # kept shells k = 1..10
        return float((sa - sb).abs().sum() / (sa + sb).sum() * 2)

    stable, transient = rel_l1(late_a, late_b), rel_l1(early, late_b)
    assert stable < 0.15  # measured 0.095
    assert transient > 2 * stable  # the test can tell a spectrum that is still changing (measured 0.55)


def test_energy_spectrum_sums_to_the_mean_kinetic_energy_and_spectral_resize_is_exact():
    flow, w_hat = _turbulent(steps=50)
    u, v = flow.velocity(w_hat)
    spec = energy_spectrum(flow.to_grid(w_hat))
    assert spec.shape == (2, 17)
    assert torch.allclose(spec.sum(-1), 0.5 * (u**2 + v**2).mean((-1, -2)), rtol=1e-12, atol=0)
    x, y = _grid(32)
    field = torch.sin(3 * x - 2 * y) + 0.5 * torch.cos(7 * y) + 0.25 * torch.sin(x + 5 * y) + 1.0
    xs, ys = _grid(16)
    coarse = torch.sin(3 * xs - 2 * ys) + 0.5 * torch.cos(7 * ys) + 0.25 * torch.sin(xs + 5 * ys) + 1.0
    assert torch.allclose(spectral_resize(field, 16), coarse, atol=1e-13, rtol=0)
    dropped = spectral_resize(torch.cos(12 * x), 16)  # |k| = 12 >= 16 / 2: removed
    assert float(dropped.abs().max()) < 1e-14
    with pytest.raises(ValueError, match="even size <= 32"):
        spectral_resize(field, 15)


SMALL = dict(size=16, solver_size=32, reynolds=200.0, dt=0.02, frame_every=5, burn_in=1.0, progress=False)


def test_trajectories_deterministic_and_cached(tmp_path, monkeypatch, capsys):
    a = kolmogorov_trajectories(3, 4, seed=7, cache_dir=tmp_path, **SMALL)
    assert a.shape == (3, 4, 1, 16, 16) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert float(a[:, 1:].sub(a[:, :-1]).abs().max()) > 0  # frames differ
    assert float(a.mean((-1, -2)).abs().max()) < 1e-5 * float(a.abs().max())
    files = list(tmp_path.glob("kolmogorov__*.npz"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp*"))
    with np.load(files[0], allow_pickle=False) as z:
        assert np.array_equal(z["data"], a.numpy()) and '"seed": 7' in str(z["params"])
    fresh = kolmogorov_trajectories(3, 4, seed=7, cache=False, **SMALL)  # recomputed, no file read
    assert torch.equal(fresh, a)

    def boom(*args, **kwargs):
        raise AssertionError("recomputed instead of loading the cache")

    monkeypatch.setattr(KolmogorovFlow, "step", boom)
    b = kolmogorov_trajectories(3, 4, seed=7, cache_dir=tmp_path, **{**SMALL, "progress": True})
    assert torch.equal(a, b)
    assert "kolmogorov: loaded [3, 4, 1, 16, 16] float32" in capsys.readouterr().out
    assert torch.equal(kolmogorov_trajectories(3, 4, seed=7, cache_dir=tmp_path, normalize=True, **SMALL),
                       a / VORTICITY_SCALE)
    monkeypatch.undo()
    c = kolmogorov_trajectories(3, 4, seed=8, cache_dir=tmp_path, **SMALL)
    assert not torch.equal(a, c) and len(list(tmp_path.glob("*.npz"))) == 2


def test_trajectory_cache_errors_and_bad_parameters(tmp_path):
    path = cache_path("kolmogorov", {"x": 1}, tmp_path)
    assert path.parent == tmp_path and path.name.startswith("kolmogorov__")
    kolmogorov_trajectories(1, 2, seed=0, cache_dir=tmp_path, **SMALL)
    (f,) = tmp_path.glob("*.npz")
    f.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="corrupt sequence cache file .*delete it"):
        kolmogorov_trajectories(1, 2, seed=0, cache_dir=tmp_path, **SMALL)
    with pytest.raises(ValueError, match="CFL number .* > 0.8"):
        kolmogorov_trajectories(1, 2, seed=0, cache=False, **{**SMALL, "dt": 0.5})
    with pytest.raises(ValueError, match="size must be even and <= solver_size"):
        kolmogorov_trajectories(1, 2, cache=False, **{**SMALL, "size": 64})
    with pytest.raises(ValueError, match="forcing_wavenumber must be in 1..10"):
        KolmogorovFlow(32, viscosity=0.01, forcing_wavenumber=11, dt=0.01)
