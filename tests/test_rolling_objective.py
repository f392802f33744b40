"""The rolling-diffusion training objective: standard diffusion when every frame is at one level, per-frame weights
and the rolling / init phase mixture against a hand computation, and per-frame levels through DiffusionModel."""

from __future__ import annotations

import pytest
import torch

from simdiff.configuration import ConfigError
from simdiff.losses import LossConfig, diffusion_loss
from simdiff.process import to_output
from simdiff.processes import RollingDiffusion, build_process
from simdiff.schedules import get_schedule
from simdiff.weighting import get_weighting

D64 = torch.float64
SCHED = get_schedule("cosine")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _video_denoiser(z, logsnr, **_):  # a smooth denoiser of per-frame levels [B, W]
    return to_output("eps", torch.tanh(z + logsnr[..., None, None, None] / 8), z=z, logsnr=logsnr)


def test_uniform_window_loss_is_the_standard_loss():
    """Phase "uniform", no context: the loss equals simdiff.losses.diffusion_loss on the window seen as one image
    (frames folded into channels), same t and noise, to 1e-12."""
    proc = RollingDiffusion(SCHED, window=3, phase="uniform")
    obj = proc.objective(LossConfig())
    b, w, c, h = 5, 3, 2, 4
    x = torch.randn(b, w, c, h, h, generator=_gen(0), dtype=D64)
    eps = torch.randn(x.shape, generator=_gen(1), dtype=D64)
    t = torch.rand(b, generator=_gen(2), dtype=D64)
    ours = obj.loss(_video_denoiser, x, t=t, init=torch.zeros(b, dtype=torch.bool), eps=eps)

    def image_denoiser(z, logsnr, **_):
        return to_output("eps", torch.tanh(z + logsnr[:, None, None, None] / 8), z=z, logsnr=logsnr)

    ref = diffusion_loss(image_denoiser, x.reshape(b, w * c, h, h), schedule=SCHED, weighting=get_weighting("sigmoid"),
                         t=t, eps=eps.reshape(b, w * c, h, h), jacobian=True)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_per_frame_weights_and_phase_mixture_by_hand():
    """W = 4, c = 1: example 0 in the rolling phase at t = 0.3, example 1 in the init phase at t = 0.7. With a
    denoiser predicting x_hat = 0 the loss is sum_{k >= 1} w(lam_k) J(t_k) mean(x_k^2) / 3."""
    proc = RollingDiffusion(SCHED, window=4, context=1)
    obj = proc.objective(LossConfig(weighting="sigmoid", jacobian=True))
    t = torch.tensor([0.3, 0.7], dtype=D64)
    init = torch.tensor([False, True])
    tk = obj.frame_times(t, init)
    expect = torch.tensor([[0, 0.3 / 3, 1.3 / 3, 2.3 / 3], [0, 0.7, 1.0, 1.0]], dtype=D64)
    torch.testing.assert_close(tk, expect, rtol=0, atol=1e-15)
    x = torch.randn(2, 4, 1, 3, 3, generator=_gen(3), dtype=D64)
    eps = torch.randn(x.shape, generator=_gen(4), dtype=D64)

    def zero(z, logsnr, **_):
        return to_output("x", torch.zeros_like(z), z=z, logsnr=logsnr)

    loss = obj.loss(zero, x, t=t, init=init, eps=eps)
    sig = get_weighting("sigmoid")
    hand = torch.zeros(2, dtype=D64)
    for i in range(2):
        for k in range(1, 4):  # frame 0 is context: no loss
            tt = expect[i, k : k + 1]
            wk = sig(SCHED.logsnr(tt)) * -SCHED.dlogsnr_dt(tt)
            hand[i] += float(wk) * float(x[i, k].pow(2).mean()) / 3
    torch.testing.assert_close(loss, hand, rtol=1e-12, atol=0)
    assert float(obj.frame_weights(tk)[:, 0].abs().max()) == 0.0


def test_phase_mixture_fraction():
    """A fraction init_fraction of windows is drawn in the init phase (binomial 3-sigma band); "uniform" never."""
    x = torch.zeros(20000, 3, 1, 1, 1)
    for frac in (0.1, 0.5):
        obj = RollingDiffusion(SCHED, window=3, init_fraction=frac).objective(LossConfig())
        _, init, _ = obj.draw(x, _gen(5))
        sd = (frac * (1 - frac) / len(x)) ** 0.5
        assert abs(float(init.float().mean()) - frac) < 3 * sd
    obj = RollingDiffusion(SCHED, window=3, phase="uniform", init_fraction=0.5).objective(LossConfig())
    assert not bool(obj.draw(x, _gen(6))[1].any())


def test_per_frame_levels_through_diffusion_model():
    """A DiffusionModel built with the rolling process reads a [B, W] level as per-frame log-SNRs: its backbone gets
    them unchanged and the views are the isotropic per-frame ones."""
    from simdiff.nets import DiffusionModel

    seen = []

    class Backbone(torch.nn.Module):
        def forward(self, z, logsnr, **_):
            seen.append(logsnr)
            return torch.tanh(z)

    proc = build_process({"name": "rolling", "window": 3, "context": 1}, SCHED)
    model = DiffusionModel(Backbone(), "v", process=proc)
    z = torch.randn(2, 3, 1, 2, 2, generator=_gen(7), dtype=D64)
    lam = torch.tensor([[9.0, 1.0, -3.0], [5.0, 0.5, -8.0]], dtype=D64)
    out = model(z, lam)
    assert torch.equal(seen[-1], lam)
    ref = to_output("v", torch.tanh(z), z=z, logsnr=lam)
    torch.testing.assert_close(out.x, ref.x, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.eps, ref.eps, rtol=0, atol=1e-12)
    # a global level [B] still means the rolling state: the backbone gets frame_logsnr(level)
    g = torch.full((2,), 2.0, dtype=D64)
    model(z, g)
    torch.testing.assert_close(seen[-1], proc.frame_logsnr(g))


def test_bad_settings_are_one_line():
    with pytest.raises(ConfigError, match="init_fraction"):
        RollingDiffusion(SCHED, window=3, init_fraction=1.5)
    proc = RollingDiffusion(SCHED, window=3)
    with pytest.raises(ConfigError, match="multiscale"):
        proc.objective(LossConfig(multiscale_base=4))
    with pytest.raises(ConfigError, match="W=3"):
        proc.network_kwargs((4, 1, 8, 8), 0)
    with pytest.raises(ValueError, match=r"x must be \[B, 3"):
        proc.objective(LossConfig())(_video_denoiser, {"x": torch.zeros(2, 4, 1, 2, 2)})
