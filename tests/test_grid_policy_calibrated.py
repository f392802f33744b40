"""The "calibrated" step grid (simdiff.samplers.calibrate): what the pilot measures, convergence, the cache."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from simdiff.process import to_output
from simdiff.samplers import calibrate as C
from simdiff.samplers import get_sampler, solve_reference
from simdiff.samplers.policy import auto_end
from simdiff.samplers.tune_cli import FILE, load_tuned_grid, save_tuned_grid, tuned_grid_for
from simdiff.schedules import LinearBetaSchedule, ShiftedCosineSchedule
from simdiff.toy import GaussianMixture

F64 = torch.float64


def _mixture(scale: float = 1.0) -> GaussianMixture:
    gm = GaussianMixture.random(8, 6, std=0.2, seed=3)
    return GaussianMixture(gm.means * scale, gm.variances * scale**2, torch.exp(gm.log_weights))


def _pilot(n: int = 16, dim: int = 8) -> torch.Tensor:
    return torch.randn(n, dim, dtype=F64, generator=torch.Generator().manual_seed(0))


def test_calibration_on_an_exact_mixture_is_the_mixture_chosen_logistic():
    cal = C.calibrate(_mixture().denoise, LinearBetaSchedule(), _pilot())
    # the "auto" grid's constants (2, 2.5) were chosen on such mixtures; the fitted rule lands next to them
    assert 1.0 < cal.mu < 3.0 and 1.8 < cal.scale < 3.2


def test_calibration_moves_with_the_data_scale_as_the_log_snr_shift():
    # data c x: p(x | z) is that of x at log-SNR lambda + 2 ln c, so the structure moves up by -2 ln c
    sch, c = ShiftedCosineSchedule(image_size=64, noise_size=32), 0.1
    a = C.calibrate(_mixture().denoise, sch, _pilot())
    b = C.calibrate(_mixture(c).denoise, sch, _pilot())
    step = (sch.logsnr_max - sch.logsnr_min) / C.PILOT_STEPS
    assert abs((b.mu - a.mu) - (-2 * math.log(c))) < 1.5 * step
    assert b.scale == pytest.approx(a.scale, rel=0.15)


def test_calibrated_grid_error_is_monotone_in_calls_and_converges_at_the_sampler_order():
    gm, sch = _mixture(), LinearBetaSchedule()
    cal = C.calibrate(gm.denoise, sch, _pilot())
    z = torch.randn(64, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    # the grid's limit as calls grow: x_hat at logsnr_max (the end rule reaches it at ~14 calls here)
    ref = solve_reference(gm.denoise, z, logsnr_start=float(sch.logsnr_min), logsnr_end=float(sch.logsnr_max),
                          rtol=1e-11, atol=1e-11)
    unipc = get_sampler("unipc")
    calls = [4, 5, 6, 8, 10, 15, 20, 24, 32, 48, 64]
    errs = [float((unipc(gm.denoise, z, C.calibrated_grid(sch, n, cal)) - ref).pow(2).mean().sqrt()) for n in calls]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    tail = [(math.log(n), math.log(e)) for n, e in zip(calls, errs) if n >= 20]
    mx = sum(x for x, _ in tail) / len(tail)
    my = sum(y for _, y in tail) / len(tail)
    slope = sum((x - mx) * (y - my) for x, y in tail) / sum((x - mx) ** 2 for x, _ in tail)
    assert -5.0 < slope < -2.7, slope  # UniPC order 3 (measured ~ -3.6: its corrector adds about one order)


def test_calibrated_grid_layout_and_end_rule():
    sch = ShiftedCosineSchedule(image_size=64, noise_size=32)
    low, high = C.GridCalibration(-3.0, 4.5), C.GridCalibration(2.0, 2.5)
    for steps in (1, 2, 5, 10, 40):
        g = C.calibrated_grid(sch, steps, low)
        assert g.shape == (steps + 1,) and g[0] == sch.logsnr_min and g[-1] == math.inf
        assert bool((torch.diff(g[:-1]) > 0).all())
    # the end: the "auto" grid's rule (1 + 2 steps) / 3, moved by END_SHIFT per unit of centre below 2
    for cal in (low, high):
        assert float(C.calibrated_grid(sch, 8, cal)[-2]) == pytest.approx(
            auto_end(sch, 8) + C.END_SHIFT * (cal.mu - 2.0))
    assert float(C.calibrated_grid(sch, 200, low)[-2]) == pytest.approx(sch.logsnr_max)
    with pytest.raises(ValueError, match="scale"):
        C.GridCalibration(0.0, 0.0)
    with pytest.raises(ValueError, match="zero everywhere"):
        C.fit_calibration(torch.arange(5, dtype=F64), torch.zeros(5, dtype=F64))


class _Net(torch.nn.Module):
    """An exact mixture denoiser with one weight (a gain on x_hat) and a call counter."""

    def __init__(self, gm: GaussianMixture) -> None:
        super().__init__()
        self.gm = gm
        self.gain = torch.nn.Parameter(torch.ones((), dtype=F64), requires_grad=False)
        self.calls = 0

    def forward(self, z, logsnr, **_):
        self.calls += 1
        return to_output("x", self.gm.posterior_mean(z, logsnr) * self.gain, z=z, logsnr=logsnr)


def _loaded(net: _Net):
    return SimpleNamespace(model=net, schedule=LinearBetaSchedule(), image_shape=(8,), num_classes=0, process=None)


@pytest.mark.parametrize("as_file", [False, True])
def test_calibration_cache_round_trips_and_is_invalidated_by_new_weights(tmp_path, as_file):
    C._MEMO.clear()
    if as_file:
        source = tmp_path / "model.safetensors"
        source.write_bytes(b"weights")
        path = tmp_path / "model.safetensors.grids.json"
    else:
        source, path = tmp_path, tmp_path / FILE
    assert C.grids_file(source) == path
    net = _Net(_mixture())
    loaded = _loaded(net)
    first = C.calibration_for_run(source, loaded)
    assert net.calls == C.PILOT_STEPS and path.exists()
    entry = json.loads(path.read_text())[C.calibration_key(0.0)]
    assert entry["mu"] == first.mu and entry["fingerprint"] == C.weights_fingerprint(net)
    C._MEMO.clear()  # a new process: read back from the file, no pilot
    again = C.calibration_for_run(source, loaded)
    assert again == first and net.calls == C.PILOT_STEPS
    grid = C.calibrated_grid_for(source, loaded, 6)
    assert torch.equal(grid, C.calibrated_grid(loaded.schedule, 6, first)) and net.calls == C.PILOT_STEPS
    with torch.no_grad():  # new weights: measured again and the entry replaced
        net.gain.fill_(0.5)
    C._MEMO.clear()
    C.calibration_for_run(source, loaded)
    assert net.calls == 2 * C.PILOT_STEPS
    assert json.loads(path.read_text())[C.calibration_key(0.0)]["fingerprint"] == C.weights_fingerprint(net)
    C._MEMO.clear()


def test_calibration_shares_the_tuned_grids_file(tmp_path):
    C._MEMO.clear()
    grid = torch.tensor([-10.0, 0.0, 3.0, math.inf], dtype=F64)
    save_tuned_grid(tmp_path, "unipc/3/0", grid)
    C.calibration_for_run(tmp_path, _loaded(_Net(_mixture())))
    assert torch.equal(load_tuned_grid(tmp_path, "unipc/3/0"), grid)  # both entries kept
    from simdiff.configuration import ConfigError

    with pytest.raises(ConfigError) as e:  # the tuned-grid listing names grids only
        tuned_grid_for(tmp_path, "unipc", 5, 0.0)
    assert "unipc/3/0" in str(e.value) and "calibration" not in str(e.value).split("(has:")[1].split(")")[0]
    C._MEMO.clear()


def test_calibration_refuses_guidance_on_an_unconditional_model(tmp_path):
    from simdiff.configuration import ConfigError

    C._MEMO.clear()
    with pytest.raises(ConfigError, match="class-conditional"):
        C.calibration_for_run(tmp_path, _loaded(_Net(_mixture())), guidance=2.0)


def test_model_calibration_is_measured_once_per_process():
    C._MEMO.clear()
    net = _Net(_mixture())
    sch = LinearBetaSchedule()
    a = C.model_calibration(net, sch, (8,))
    b = C.model_calibration(net, sch, (8,))
    assert a == b and net.calls == C.PILOT_STEPS
    assert a == C.calibrate(net, sch, torch.randn((16, 8), generator=torch.Generator().manual_seed(0)))  # seed 0
    C._MEMO.clear()


def test_pilot_calibration_uses_the_conditioning_and_memoises_by_key():
    C._MEMO.clear()
    gm = GaussianMixture.random(8, 6, std=0.2, num_classes=3, seed=3)
    seen = []

    def denoise(z, logsnr, labels=None, **_):
        seen.append(labels)
        return gm.denoise(z, logsnr, labels)

    sch = LinearBetaSchedule()
    labels = torch.tensor([0, 1, 2, 0])
    a = C.pilot_calibration(denoise, sch, (8,), cond={"labels": labels}, memo_key=("m", 0), dtype=F64)
    assert len(seen) == C.PILOT_STEPS and all(torch.equal(s, labels) for s in seen)
    assert C.pilot_calibration(denoise, sch, (8,), cond={"labels": labels}, memo_key=("m", 0), dtype=F64) == a
    assert len(seen) == C.PILOT_STEPS  # memoised
    assert a == C.calibrate(lambda z, lam, **k: gm.denoise(z, lam, k["labels"]), sch,
                            torch.randn((4, 8), generator=torch.Generator().manual_seed(0), dtype=F64),
                            cond={"labels": labels})
    C._MEMO.clear()
