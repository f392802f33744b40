"""diffusers interop: a tiny random UNet2DModel + DDPMScheduler saved to disk, loaded as a simdiff denoiser."""

from __future__ import annotations

import math

import pytest
import torch

from simdiff.configuration import ConfigError
from simdiff.interop import DiffusersDenoiser, linear_beta_from_diffusers, load_diffusers
from simdiff.process import ddim_step
from simdiff.schedules import CosineSchedule, LinearBetaSchedule

diffusers = pytest.importorskip("diffusers")

BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _tiny_unet(**kw):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        **kw,
    ).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddpm")
    unet = _tiny_unet()
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, **BETAS)
    unet.save_pretrained(root / "unet")
    sched.save_pretrained(root / "scheduler")
    return root, unet, sched


def test_load_and_exact_at_integer_timesteps(saved):
    root, unet, sched = saved
    den = load_diffusers(root)
    assert isinstance(den, DiffusersDenoiser) and den.kind == "eps"
    assert den.schedule == LinearBetaSchedule(num_train_timesteps=1000, **BETAS)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 1, 8, 8, generator=g)
    steps = torch.tensor([0, 417, 999])
    logsnr = den.schedule.logsnr_from_timestep(steps)  # float64 logsnr of the integer grid points
    assert torch.equal(den.timesteps(logsnr), steps.double())
    with torch.no_grad():
        out = den(z, logsnr)
        ref = unet(z, steps).sample
    assert torch.equal(out.eps, ref)
    # x / v views are consistent with the diffusers forward process x_t = sqrt(acp) x + sqrt(1 - acp) eps
    acp = sched.alphas_cumprod[steps].view(-1, 1, 1, 1)
    torch.testing.assert_close(out.x, (z - (1 - acp).sqrt() * ref) / acp.sqrt(), rtol=1e-4, atol=1e-4)
    assert out.x.dtype == torch.float32


def test_fractional_and_out_of_range_logsnr(saved):
    root, unet, _ = saved
    den = load_diffusers(root)
    s = den.schedule
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    mid = s.logsnr_from_timestep(torch.tensor([10.5, 600.25], dtype=torch.float64))
    torch.testing.assert_close(den.timesteps(mid), torch.tensor([10.5, 600.25], dtype=torch.float64))
    with torch.no_grad():
        torch.testing.assert_close(den(z, mid).eps, unet(z, torch.tensor([10.5, 600.25])).sample)
        # clamped to the end indices for the net, true logsnr for the conversion (+inf: x = z exactly)
        ends = torch.tensor([math.inf, -30.0])
        assert den.timesteps(ends).tolist() == [0.0, 999.0]
        out = den(z, ends)
        torch.testing.assert_close(out.eps, unet(z, torch.tensor([0, 999])).sample)
        assert torch.equal(out.x[0], z[0])
        # a scalar logsnr is broadcast over the batch
        torch.testing.assert_close(den(z, torch.tensor(0.0)).eps, den(z, torch.zeros(2)).eps)


def test_ddim_matches_diffusers_ddim_scheduler(saved):
    root, unet, sched = saved
    den = load_diffusers(root)
    ddim = diffusers.DDIMScheduler.from_config(
        sched.config, set_alpha_to_one=True, clip_sample=False, timestep_spacing="leading", steps_offset=0
    )
    ddim.set_timesteps(5)
    steps = ddim.timesteps.tolist()
    assert steps == [800, 600, 400, 200, 0]
    logsnrs = den.schedule.logsnr_from_timestep(torch.tensor(steps)).tolist() + [math.inf]  # final: alpha = 1

    z0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    z_ref, z = z0.clone(), z0.double()
    with torch.no_grad():
        for i, step in enumerate(steps):
            eps = unet(z_ref, step).sample
            z_ref = ddim.step(eps, step, z_ref, eta=0.0).prev_sample
            lt = torch.full((2,), logsnrs[i], dtype=torch.float64)
            ls = torch.full((2,), logsnrs[i + 1], dtype=torch.float64)
            out = den(z, lt)
            z = ddim_step(z_t=z, x=out.x, logsnr_s=ls, logsnr_t=lt)
            torch.testing.assert_close(z.float(), z_ref, rtol=1e-5, atol=1e-5, msg=f"step {i} (t={step})")


def test_v_prediction_and_flat_layout_and_labels(tmp_path):
    unet = _tiny_unet(num_class_embeds=3)
    unet.save_pretrained(tmp_path)  # UNet files directly in the folder
    diffusers.DDPMScheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "scheduler")
    den = load_diffusers(tmp_path, dtype=torch.float64)
    assert den.kind == "v" and den.num_classes == 3 and next(den.parameters()).dtype == torch.float64
    z = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    lam = den.schedule.logsnr_from_timestep(torch.tensor([5, 900]))
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        out = den(z, lam, labels=labels)
        v = den.unet(z, torch.tensor([5, 900]), class_labels=labels).sample
    assert torch.equal(out.v, v)
    a, s = torch.sigmoid(lam).sqrt().view(-1, 1, 1, 1), torch.sigmoid(-lam).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(out.x, a * z - s * v)


def test_errors(tmp_path, saved):
    with pytest.raises(ConfigError, match="diffusers model folder not found: .*nope"):
        load_diffusers(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no UNet config in .*expected .*unet/config.json"):
        load_diffusers(tmp_path)
    root, unet, _ = saved
    only_unet = tmp_path / "only"
    unet.save_pretrained(only_unet / "unet")
    with pytest.raises(ConfigError, match="no scheduler config in .*scheduler_config.json"):
        load_diffusers(only_unet)
    with pytest.raises(ConfigError, match="unknown prediction_type 'eps'; valid: epsilon, v_prediction, sample"):
        DiffusersDenoiser(unet, LinearBetaSchedule(), "eps")
    with pytest.raises(ConfigError, match="LinearBetaSchedule"):
        DiffusersDenoiser(unet, CosineSchedule())
    with pytest.raises(ConfigError, match="rescale_betas_zero_snr"):
        linear_beta_from_diffusers({"rescale_betas_zero_snr": True})
    den = DiffusersDenoiser(unet, LinearBetaSchedule())
    with pytest.raises(ValueError, match="no class embedding"):
        den(torch.zeros(1, 1, 8, 8), torch.zeros(1), labels=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logsnr of shape \(3,\) does not match z of shape \(2, 1, 8, 8\)"):
        den(torch.zeros(2, 1, 8, 8), torch.zeros(3))
