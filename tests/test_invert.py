"""Inversion math in float64: DDIM / multistep inversion converges to the exact PF-ODE inversion at the sampler's
order on the exact Gaussian-mixture denoiser, EDICT and edit-friendly DDPM reconstruct to round-off on any model
(the exact denoiser, an untrained network, a non-isotropic process), and the landing fixed point."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from simdiff.invert import (
    DDPMInversion,
    EdictState,
    ddim_invert,
    ddpm_invert,
    ddpm_sample,
    edict_invert,
    edict_sample,
    invert_trajectory,
    land_invert,
    ode_invert,
    ode_reconstruct,
    reconstruct,
)
from simdiff.nets import build_model
from simdiff.processes import BlurringDiffusion
from simdiff.samplers import make_grid
from simdiff.schedules import CosineSchedule
from simdiff.toy import GaussianMixture

D64 = torch.float64
SCHEDULE = CosineSchedule(logsnr_min=-6.0, logsnr_max=8.0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def mixture():
    gm = GaussianMixture.random(4, 6, std=0.3, seed=0, num_classes=2)
    x, y = gm.sample(8, generator=_gen(1))
    return gm, x, y


def _slope(steps, errors) -> float:
    return -float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


@pytest.mark.parametrize("order", [1, 2, 3])
def test_ddim_inversion_converges_at_the_sampler_order(mixture, order):
    """Latent error against the exact PF-ODE inversion on the same grid ends, and the round trip
    reconstruct(invert(x)) - x, both fall like steps^-order (fitted slopes over 10..80 steps: latent 0.96 / 1.88 /
    2.90, round trip 0.83 / 3.18 / 3.21; the round trip of the second-order pair gains an order from cancellation
    between the two directions)."""
    gm, x, _ = mixture
    steps = [10, 20, 40, 80]
    lat, rec = [], []
    for n in steps:
        grid = make_grid(SCHEDULE, n, kind="uniform_logsnr")
        z = ddim_invert(gm, x, grid, order=order, land_iters=30)
        lat.append(float((z - ode_invert(gm, x, grid)).abs().max()))
        rec.append(float((reconstruct(gm, z, grid, order=order) - x).abs().max()))
    assert _slope(steps, lat) > order - 0.25, (order, lat)
    assert _slope(steps, rec) > order - 0.25, (order, rec)
    assert rec[-1] < [0.15, 2e-3, 2e-3][order - 1]


def test_lookahead_inversion_inverts_the_ddim_step_for_a_state_free_eps():
    """Lookahead evaluates eps at the target level, so when eps does not depend on the state the inversion is the
    exact inverse of DDIM sampling; the standard (own-level) inversion is not."""
    from simdiff.process import to_output

    pattern = torch.randn(1, 5, generator=_gen(11), dtype=D64)

    def den(z, lam, **_):
        return to_output("eps", torch.sin(lam)[:, None] * pattern.expand_as(z), z=z, logsnr=lam)

    x = torch.randn(3, 5, generator=_gen(12), dtype=D64)
    grid = make_grid(SCHEDULE, 7)
    z = ddim_invert(den, x, grid, lookahead=True)
    torch.testing.assert_close(reconstruct(den, z, grid), x, rtol=0, atol=1e-12)
    assert float((reconstruct(den, ddim_invert(den, x, grid), grid) - x).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="first order"):
        ddim_invert(den, x, grid, lookahead=True, order=2)


def test_exact_ode_inversion_round_trip(mixture):
    gm, x, y = mixture
    grid = make_grid(SCHEDULE, 5)
    z, nfe = ode_invert(gm, x, grid, cond={"labels": y}, return_nfe=True)
    back = ode_reconstruct(gm, z, grid, cond={"labels": y})
    assert float((back - x).abs().max()) < 1e-8 and nfe > 50
    assert float(z.std()) > 0.5  # a latent at logsnr -6 is mostly noise, not the image


def test_landing_fixed_point_solves_the_last_step(mixture):
    """After enough iterations the x-prediction of the landed latent is the image; one iteration is the usual
    first DDIM inversion step alpha x + sigma eps_hat(alpha x)."""
    gm, x, _ = mixture
    lam = torch.tensor(6.0, dtype=D64)
    z = land_invert(gm, x, lam, iters=25)
    assert float((gm(z, lam.expand(8)).x - x).abs().max()) < 1e-10
    a, s = math.sqrt(torch.sigmoid(lam)), math.sqrt(torch.sigmoid(-lam))
    one = land_invert(gm, x, lam, iters=1)
    torch.testing.assert_close(one, a * x + s * gm(a * x, lam.expand(8)).eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(land_invert(gm, x, lam, iters=0), a * x, rtol=0, atol=1e-15)


def test_trajectory_ends_and_partial_grids(mixture):
    gm, x, _ = mixture
    grid = make_grid(SCHEDULE, 6)
    states = invert_trajectory(gm, x, grid, land_iters=20)
    assert len(states) == 6 and torch.equal(states[0], ddim_invert(gm, x, grid, land_iters=20))
    # a grid ending at a finite level starts from a latent at that level: resuming from the middle agrees
    tail = ddim_invert(gm, states[3], grid[:4])
    torch.testing.assert_close(tail, states[0], rtol=0, atol=1e-12)


def test_edict_is_exact_on_the_mixture(mixture):
    gm, x, y = mixture
    grid = make_grid(SCHEDULE, 12)
    state = edict_invert(gm, x, grid, cond={"labels": y})
    out = edict_sample(gm, state, grid, cond={"labels": y})
    assert isinstance(out, EdictState)
    assert float((out.x - x).abs().max()) < 1e-12 and float((out.y - x).abs().max()) < 1e-12
    assert float((state.x - state.y).abs().max()) > 1e-3  # the two sequences really differ in between


@pytest.fixture(scope="module")
def random_net():
    torch.manual_seed(0)
    net = build_model("uvit", "v", {"channels": [8], "dim": 16, "depth": 1, "num_heads": 2, "num_res_blocks": 1},
                      image_channels=1, image_size=8, num_classes=3)
    return net.to(D64).eval().requires_grad_(False)


def test_edict_is_exact_on_an_untrained_network_with_guidance(random_net):
    """Exact by construction, whatever the network: float64 round-off after 8 guided steps from logsnr -15, while
    plain DDIM inversion of the same network is far off."""
    x = torch.rand(3, 1, 8, 8, generator=_gen(2), dtype=D64) * 2 - 1
    cond = {"labels": torch.tensor([0, 1, 2])}
    grid = make_grid(CosineSchedule(), 8)
    with torch.inference_mode():
        state = edict_invert(random_net, x, grid, cond=cond, guidance=1.5)
        out = edict_sample(random_net, state, grid, cond=cond, guidance=1.5)
        ddim = reconstruct(random_net, ddim_invert(random_net, x, grid, cond=cond), grid, cond=cond)
    assert float((out.x - x).abs().max()) < 1e-8, float((out.x - x).abs().max())
    assert float((ddim - x).abs().max()) > 1e-2


def test_edit_friendly_ddpm_is_exact(mixture, random_net):
    gm, x, y = mixture
    grid = make_grid(SCHEDULE, 10)
    inv = ddpm_invert(gm, x, grid, cond={"labels": y}, generator=_gen(3))
    assert isinstance(inv, DDPMInversion) and len(inv.noises) == 10
    assert float((ddpm_sample(gm, inv, grid, cond={"labels": y}) - x).abs().max()) < 1e-12
    edited = ddpm_sample(gm, inv, grid, cond={"labels": 1 - y})
    assert float((edited - x).abs().max()) > 0.1  # another class really changes the images
    # with skip (a shorter grid) and guidance on an untrained network
    xi = torch.rand(2, 1, 8, 8, generator=_gen(4), dtype=D64) * 2 - 1
    cond = {"labels": torch.tensor([2, 0])}
    short = make_grid(CosineSchedule(), 10)[4:]
    with torch.inference_mode():
        inv = ddpm_invert(random_net, xi, short, cond=cond, guidance=2.0, generator=_gen(5))
        back = ddpm_sample(random_net, inv, short, cond=cond, guidance=2.0)
    assert float((back - xi).abs().max()) < 1e-12


def test_inversions_on_a_non_isotropic_process():
    """Blurring diffusion (DCT basis, per-frequency coefficients): EDICT and DDPM stay exact, DDIM inversion
    converges to the exact PF-ODE inversion. EDICT's round-off grows with 1 / alpha per coordinate, which blurring
    makes large for the finest frequency at the noisy end (about 1e-8 here)."""
    proc = BlurringDiffusion(SCHEDULE, image_size=4, sigma_B_max=3.0)
    g = _gen(6)
    gm = GaussianMixture(torch.randn(6, 16, generator=g, dtype=D64) * 0.5,
                         0.05 * (0.5 + torch.rand(6, generator=g, dtype=D64)))
    den = gm.denoise_for(proc)
    x = gm.sample(4, generator=_gen(7))[0].reshape(4, 1, 4, 4)
    grid = make_grid(SCHEDULE, 10)
    state = edict_invert(den, x, grid, process=proc)
    assert float((edict_sample(den, state, grid, process=proc).x - x).abs().max()) < 1e-6
    inv = ddpm_invert(den, x, grid, process=proc, generator=_gen(8))
    assert float((ddpm_sample(den, inv, grid, process=proc) - x).abs().max()) < 1e-11
    errs = []
    for n in (10, 40):
        grid = make_grid(SCHEDULE, n, kind="uniform_logsnr")
        z = ddim_invert(den, x, grid, process=proc, order=2, land_iters=30)
        errs.append(float((z - ode_invert(den, x, grid, process=proc)).abs().max()))
    assert errs[1] < errs[0] / 8, errs


@pytest.mark.parametrize("grid, match", [
    (torch.tensor([0.0]), ">= 2 levels"),
    (torch.tensor([1.0, 0.0, math.inf]), "strictly increasing"),
    (torch.tensor([0.0, math.nan, math.inf]), "finite"),
])
def test_bad_grids_are_refused_with_one_line(mixture, grid, match):
    gm, x, _ = mixture
    with pytest.raises(ValueError, match=match) as e:
        ddim_invert(gm, x, grid)
    assert "\n" not in str(e.value)


def test_bad_options_are_refused(mixture):
    gm, x, _ = mixture
    grid = make_grid(SCHEDULE, 4)
    with pytest.raises(ValueError, match="order"):
        ddim_invert(gm, x, grid, order=4)
    with pytest.raises(ValueError, match="mixing"):
        edict_invert(gm, x, grid, mixing=0.0)
    with pytest.raises(ValueError, match="end at \\+inf"):
        ddpm_invert(gm, x, grid[:-1])
    with pytest.raises(ValueError, match="null_cond"):
        ddim_invert(gm, x, grid, guidance=1.0)


def test_edict_and_ddpm_are_exact_on_a_diffusers_model_through_interop():
    diffusers = pytest.importorskip("diffusers")
    from simdiff.interop import DiffusersDenoiser
    from simdiff.schedules import LinearBetaSchedule

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).to(D64).eval()
    schedule = LinearBetaSchedule()
    den = DiffusersDenoiser(unet, schedule, "epsilon")
    x = torch.rand(2, 1, 8, 8, generator=_gen(13), dtype=D64) * 2 - 1
    grid = make_grid(schedule, 6)
    with torch.inference_mode():
        state = edict_invert(den, x, grid)
        assert float((edict_sample(den, state, grid).x - x).abs().max()) < 1e-9
        inv = ddpm_invert(den, x, grid, generator=_gen(14))
        assert float((ddpm_sample(den, inv, grid) - x).abs().max()) < 1e-12


def test_nulltext_optimises_a_floating_point_null_context():
    """A text-style model (conditioning = context tokens, null = an empty-prompt context): null-text inversion
    optimises the null context itself and brings the guided reconstruction below plain DDIM inversion's."""
    from simdiff.invert import NullEmbedding, nulltext_invert, nulltext_sample
    from simdiff.process import alpha_sigma, expand, to_output

    gm = GaussianMixture.random(4, 6, std=0.3, seed=3)
    proj = torch.randn(3, 4, generator=_gen(15), dtype=D64)

    def den(z, lam, context=None, **_):
        a, _ = alpha_sigma(expand(lam, z))
        shift = context.mean(1) @ proj  # [B, 4]: the context moves the prediction
        return to_output("x", gm.posterior_mean(z, lam) + (1 - a**2) * shift, z=z, logsnr=lam)

    x, _ = gm.sample(4, generator=_gen(16))
    ctx = torch.randn(4, 2, 3, generator=_gen(17), dtype=D64)
    null = {"context": torch.zeros(1, 2, 3, dtype=D64)}
    emb = NullEmbedding(den, null, cond={"context": ctx}, batch=4)
    assert emb.key == "context" and emb.init().shape == (4, 2, 3)
    grid = make_grid(SCHEDULE, 6)
    cond = {"context": ctx}
    plain = reconstruct(den, ddim_invert(den, x, grid, cond=cond), grid, cond=cond, guidance=3.0, null_cond=null)
    inv = nulltext_invert(den, x, grid, cond=cond, guidance=3.0, null_cond=null, inner_steps=20, lr=0.1)
    rec = nulltext_sample(den, inv.latent, grid, cond=cond, inversion=inv, guidance=3.0)
    assert float((rec - x).pow(2).mean()) < 0.5 * float((plain - x).pow(2).mean())
