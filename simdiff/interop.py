"""Adapter: a diffusers ``UNet2DModel`` + DDPM-style scheduler as a simdiff denoiser ``(z, logsnr) -> DenoiserOutput``.

Why this is exact: a diffusers DDPM model is trained on ``x_t = sqrt(acp_i) x + sqrt(1 - acp_i) eps`` with
``acp_i = alphas_cumprod[i]``, which is simdiff's variance-preserving ``z`` at ``logsnr = log(acp_i / (1 - acp_i))``.
So only the time coordinate needs translating: ``logsnr -> i`` through
:meth:`simdiff.schedules.LinearBetaSchedule.timestep_from_logsnr` (exact on the integer grid).

Between grid points the index is fractional. ``UNet2DModel`` with ``time_embedding_type="positional"`` embeds the
timestep with sinusoids of a float, so a fractional index is a smooth extension of the trained model (it was only
ever trained on integers; samplers that use diffusers' own grids hit integers exactly). log-SNRs outside the
trained range ``[logsnr(N-1), logsnr(0)]`` are clamped to the end indices ``0`` / ``N-1`` for the network, while the
conversion of the prediction to x / eps / v uses the true ``logsnr`` (so ``logsnr = +inf`` still returns x = z).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from simdiff.configuration import ConfigError
from simdiff.process import DenoiserOutput, to_output
from simdiff.schedules import LinearBetaSchedule

__all__ = ["PREDICTION_TYPES", "DiffusersDenoiser", "linear_beta_from_diffusers", "load_diffusers"]

PREDICTION_TYPES: dict[str, str] = {"epsilon": "eps", "v_prediction": "v", "sample": "x"}
_SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


def linear_beta_from_diffusers(config: dict) -> LinearBetaSchedule:
    """The :class:`LinearBetaSchedule` of a diffusers DDPM/DDIM scheduler config (``scheduler.config`` or its JSON).

    Raises:
        ConfigError: for settings simdiff does not reproduce (``trained_betas``, ``rescale_betas_zero_snr``,
            beta schedules other than linear / scaled_linear / squaredcos_cap_v2).
    """
    cfg = {**_SCHEDULER_DEFAULTS, **dict(config)}
    if cfg.get("trained_betas") is not None:
        raise ConfigError("diffusers scheduler uses trained_betas, which simdiff does not support")
    if cfg.get("rescale_betas_zero_snr"):
        raise ConfigError("diffusers scheduler uses rescale_betas_zero_snr (logsnr = -inf at the end); not supported")
    return LinearBetaSchedule(
        beta_start=float(cfg["beta_start"]),
        beta_end=float(cfg["beta_end"]),
        num_train_timesteps=int(cfg["num_train_timesteps"]),
        beta_schedule=cfg["beta_schedule"],
    )


class DiffusersDenoiser(torch.nn.Module):
    """Wrap a diffusers ``UNet2DModel`` trained on a discrete DDPM schedule as ``denoise(z, logsnr, labels=)``.

    Args:
        unet: a ``diffusers.UNet2DModel`` with positional (sinusoidal) time embedding.
        schedule: the model's training schedule (see :func:`linear_beta_from_diffusers`).
        prediction_type: diffusers' name of what the UNet predicts: "epsilon", "v_prediction" or "sample".
    """

    def __init__(self, unet: torch.nn.Module, schedule: LinearBetaSchedule, prediction_type: str = "epsilon") -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
        if not isinstance(schedule, LinearBetaSchedule):
            raise ConfigError(f"DiffusersDenoiser needs a LinearBetaSchedule, got {type(schedule).__name__}")
        embed = getattr(getattr(unet, "config", None), "time_embedding_type", "positional")
        if embed != "positional":
            raise ConfigError(
                f"UNet time_embedding_type {embed!r} is not supported (fractional DDPM timesteps need 'positional')"
            )
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.kind = PREDICTION_TYPES[prediction_type]

    @property
    def num_classes(self) -> int | None:
        """Number of class embeddings of the UNet (``None`` if unconditional). diffusers has no null label."""
        return getattr(getattr(self.unet, "config", None), "num_class_embeds", None)

    def timesteps(self, logsnr: Tensor) -> Tensor:
        """``[B]`` float64 fractional DDPM indices in ``[0, N-1]`` (clamped) for ``logsnr``."""
        return self.schedule.timestep_from_logsnr(logsnr.to(torch.float64))

    def forward(self, z: Tensor, logsnr: Tensor, labels: Tensor | None = None, **_: object) -> DenoiserOutput:
        """Denoise ``z`` ``[B, C, H, W]`` at log-SNR ``logsnr`` (``[B]`` or scalar); other conditioning is ignored.

        Returns:
            :class:`DenoiserOutput` in ``z``'s dtype (the UNet runs in its own dtype).
        """
        if not torch.is_tensor(logsnr):
            logsnr = torch.tensor(float(logsnr), dtype=z.dtype, device=z.device)
        batch = z.shape[0]
        if logsnr.numel() not in (1, batch):
            raise ValueError(f"logsnr of shape {tuple(logsnr.shape)} does not match z of shape {tuple(z.shape)}")
        logsnr = logsnr.reshape(-1).expand(batch)
        if labels is not None and self.num_classes is None:
            raise ValueError("labels were given but the diffusers UNet has no class embedding")
        param = next(self.unet.parameters())
        t = self.timesteps(logsnr).to(device=param.device, dtype=torch.float32)
        pred = self.unet(z.to(param.dtype), t, class_labels=labels).sample.to(z.dtype)
        return to_output(self.kind, pred, z=z, logsnr=logsnr.to(device=z.device, dtype=z.dtype))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, or not JSON
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def load_diffusers(
    path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> DiffusersDenoiser:
    """Load a diffusers DDPM pipeline folder as a :class:`DiffusersDenoiser` (local files only, safetensors only).

    Accepted layouts: ``path/unet/{config.json, *.safetensors}`` + ``path/scheduler/scheduler_config.json`` (what
    ``unet.save_pretrained(path/'unet')`` and ``scheduler.save_pretrained(path/'scheduler')`` write), or the UNet
    files directly in ``path`` plus ``path/scheduler/``. The scheduler's beta settings and ``prediction_type`` are
    used; its class (DDPM, DDIM, ...) does not matter.

    Raises:
        ConfigError: one line naming the missing folder / file or the unsupported setting.
    """
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"diffusers model folder not found: {root}")
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (unet_dir / "config.json").is_file():
        expected = f"{root / 'unet' / 'config.json'} or {root / 'config.json'}"
        raise ConfigError(f"no UNet config in {root}: expected {expected}")
    unet_cfg = _read_json(unet_dir / "config.json")
    if unet_cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConfigError(f"{unet_dir / 'config.json'}: expected a UNet2DModel, got {unet_cfg['_class_name']!r}")
    if not any(unet_dir.glob("*.safetensors")):
        raise ConfigError(f"no .safetensors weights in {unet_dir} (pickled .bin weights are not loaded)")
    sched_file = root / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise ConfigError(f"no scheduler config in {root}: expected {sched_file}")
    sched_cfg = _read_json(sched_file)

    from diffusers import UNet2DModel  # imported lazily: diffusers is only needed for this adapter

    schedule = linear_beta_from_diffusers(sched_cfg)
    unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, local_files_only=True)
    unet = unet.to(device=device, dtype=dtype).eval()
    return DiffusersDenoiser(unet, schedule, sched_cfg.get("prediction_type", "epsilon"))
