"""Training configuration (frozen dataclasses) and the pure schedule functions the trainer uses.

Everything here is a pure function of the step (and the config), so a resumed run recomputes the same
learning rate and EMA decay without saving them.

* Learning rate: linear warm-up over ``warmup_steps`` then ``decay`` in {none, cosine, linear, rsqrt}.
* EMA: a half-life counted in *images*, as in EDM2 (Karras et al. 2024, "Analyzing and Improving the Training
  Dynamics of Diffusion Models", Sec. 3 / App. C): ``beta = 0.5 ** (batch_size / half_life_images)``, so the
  weight of an image seen ``h`` images ago is halved every ``half_life_images``. Optional EDM (Karras et al. 2022,
  ``training_loop.py``) ramp-up: ``half_life = min(half_life, images_seen * ema_rampup_ratio)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from simdiff.configuration import ConfigError

__all__ = ["OptimConfig", "TrainConfig", "lr_at", "ema_decay", "validate_train_config", "REMOVED_KEYS",
           "upgrade_train_dict", "refuse_init_from"]

Decay = Literal["none", "cosine", "linear", "rsqrt"]
Strategy = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class OptimConfig:
    """AdamW hyper-parameters and the learning-rate schedule.

    ``grad_clip``: max global L2 norm of the gradient (0 disables clipping; the norm is still logged).
    ``min_lr_ratio``: floor of the cosine / linear decay as a fraction of ``lr`` (unused by rsqrt and none).
    """

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 100
    decay: Decay = "none"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """What the trainer needs; nothing here knows about diffusion.

    ``batch_size`` is the *global* batch (summed over ranks and accumulation micro-batches).
    ``ema_half_life_images``: EMA half-life in images (0 disables the EMA). ``ema_rampup_ratio``: if set, the
    half-life is ``min(ema_half_life_images, images_seen * ema_rampup_ratio)`` (EDM ramp-up).
    ``checkpoint_every`` / ``log_every`` / ``sample_every``: in optimizer steps; 0 = never (a final checkpoint is
    always written). ``max_nonfinite``: abort after this many *consecutive* skipped (non-finite) updates.
    ``bf16``: autocast the forward in bfloat16 (CPU or CUDA). ``compile``: ``torch.compile`` the model forward
    (CUDA only; refused on CPU). ``device``: "auto" (cuda:LOCAL_RANK if available, else cpu), "cpu", "cuda", ...
    ``tf32``: on CUDA, let float32 matmuls and convolutions use TF32 tensor cores
    (``torch.backends.cuda.matmul.allow_tf32`` / ``torch.backends.cudnn.allow_tf32``, process-wide; about 10 bits of
    mantissa in the products, float32 accumulation). ``channels_last``: on CUDA, store the 4-D weights of models that
    contain ``nn.Conv2d`` layers (the U-Net) and the image batches in channels-last memory format (same values,
    faster convolution kernels). Both are ignored on CPU, where results stay bit-identical to the defaults.
    ``strategy``: multi-process strategy under torchrun: "ddp" (replicated model) or "fsdp" (FSDP2: parameters,
    gradients, optimizer state and EMA sharded over ranks); ignored in a single process. Checkpoints are the
    same full format either way, so a run may resume under the other strategy.
    ``init_from``: weights to start a *fresh* run from instead of the seeded random initialisation (fine-tuning or
    continuing a model whose optimizer state is gone): a run directory, checkpoint, exported ``.safetensors`` file
    or shipped model name (``pretrained``, ``pretrained-fashion``, ...). The network must be the same shape; the
    EMA starts from the same weights and the optimizer, step count and learning-rate schedule start afresh. A run
    directory that already holds checkpoints resumes from them and ignores it.
    """

    steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema_half_life_images: float = 50_000.0
    ema_rampup_ratio: float | None = None
    checkpoint_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    sample_every: int = 0
    bf16: bool = False
    compile: bool = False
    max_nonfinite: int = 20
    device: str = "auto"
    progress: bool = True
    strategy: Strategy = "ddp"
    tf32: bool = True
    channels_last: bool = True
    init_from: str | None = None


#: Keys TrainConfig once had -> (the only value saved configs hold, why the key went). A saved config that carries
#: the old value loads (the key is dropped, see :func:`upgrade_train_dict`); any other value is refused.
REMOVED_KEYS: dict[str, tuple[object, str]] = {
    "num_workers": (0, "the in-memory BatchIterator needs no worker processes"),
}
TrainConfig.__removed_keys__ = REMOVED_KEYS  # type: ignore[attr-defined]


def upgrade_train_dict(data: dict, *, where: str = "train") -> dict:
    """A copy of a saved ``train`` config dict without removed keys that hold their old value.

    Raises:
        ConfigError: a removed key set to anything else (one line naming the key and why it went).
    """
    out = dict(data)
    for key, (old, why) in REMOVED_KEYS.items():
        if key in out:
            value = out.pop(key)
            if value != old:
                raise ConfigError(f"'{where}.{key}' was removed ({why}); delete the key (got {value!r})")
    return out


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _train_problems(cfg: TrainConfig) -> Iterator[tuple[bool, str, str, object]]:
    """``(ok, key, requirement, value)`` for every option of ``cfg``."""
    o = cfg.optim
    for key in ("steps", "warmup_steps", "checkpoint_every", "log_every", "sample_every"):
        value = getattr(o if key == "warmup_steps" else cfg, key)
        name = f"optim.{key}" if key == "warmup_steps" else key
        yield _is_int(value) and value >= 0, name, "an integer >= 0", value
    for key in ("batch_size", "grad_accum", "keep_last", "max_nonfinite"):
        value = getattr(cfg, key)
        yield _is_int(value) and value >= 1, key, "an integer >= 1", value
    yield _is_int(cfg.seed), "seed", "an integer", cfg.seed
    yield _is_number(o.lr) and o.lr > 0, "optim.lr", "a finite number > 0", o.lr
    yield _is_number(o.eps) and o.eps > 0, "optim.eps", "a finite number > 0", o.eps
    for key in ("weight_decay", "grad_clip"):
        value = getattr(o, key)
        yield _is_number(value) and value >= 0, f"optim.{key}", "a finite number >= 0", value
    yield (_is_number(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "a number in [0, 1]",
           o.min_lr_ratio)
    betas_ok = isinstance(o.betas, (tuple, list)) and len(o.betas) == 2 and all(
        _is_number(b) and 0 <= b < 1 for b in o.betas)
    yield betas_ok, "optim.betas", "two numbers in [0, 1)", o.betas
    yield (_is_number(cfg.ema_half_life_images) and cfg.ema_half_life_images >= 0, "ema_half_life_images",
           "a finite number >= 0 (0 disables the EMA)", cfg.ema_half_life_images)
    r = cfg.ema_rampup_ratio
    yield r is None or (_is_number(r) and r > 0), "ema_rampup_ratio", "null or a finite number > 0", r
    for key in ("bf16", "compile", "progress", "tf32", "channels_last"):
        value = getattr(cfg, key)
        yield isinstance(value, bool), key, "true or false", value
    yield (cfg.init_from is None or (isinstance(cfg.init_from, str) and bool(cfg.init_from.strip())), "init_from",
           "null or a path / shipped model name", cfg.init_from)
    yield isinstance(cfg.device, str) and bool(cfg.device.strip()), "device", "a device name such as auto, cpu, " \
        "cuda, cuda:N", cfg.device


def refuse_init_from(cfg: TrainConfig, what: str) -> None:
    """One-line ConfigError when ``train.init_from`` is set for a kind of training that does not read it (``what``
    names it), so the option is never silently ignored."""
    if cfg.init_from is not None:
        raise ConfigError(f"train.init_from is not supported by {what}; remove it")


def validate_train_config(cfg: TrainConfig, world_size: int = 1, *, where: str = "train") -> None:
    """Raise :class:`ConfigError` (one line naming the key, e.g. ``train.optim.lr``) if ``cfg`` cannot run with
    ``world_size`` processes. Every numeric option is checked (type, finiteness, range); ``where`` is the prefix
    of the key names in the message."""
    prefix = f"{where}." if where else ""
    for ok, key, need, value in _train_problems(cfg):
        if not ok:
            raise ConfigError(f"{prefix}{key} must be {need}, got {value!r}")
    if cfg.optim.decay not in ("none", "cosine", "linear", "rsqrt"):
        raise ConfigError(f"unknown {prefix}optim.decay {cfg.optim.decay!r}; valid: cosine, linear, none, rsqrt")
    if cfg.strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"unknown {prefix}strategy {cfg.strategy!r}; valid: ddp, fsdp")
    if cfg.batch_size % (world_size * cfg.grad_accum):
        raise ConfigError(f"{prefix}batch_size {cfg.batch_size} is not divisible by world_size {world_size} x "
                          f"{prefix}grad_accum {cfg.grad_accum}")


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate for the update with 0-based index ``step``.

    warm-up: ``lr * min(1, (step + 1) / warmup_steps)``; then with ``p = (step - warmup) / (total - warmup)``
    clamped to [0, 1] and ``m = min_lr_ratio``: cosine ``m + (1 - m)(1 + cos(pi p)) / 2``; linear
    ``m + (1 - m)(1 - p)``; rsqrt ``sqrt(max(warmup, 1) / max(step + 1, warmup, 1))`` (no floor); none ``1``.
    """
    warm = min(1.0, (step + 1) / optim.warmup_steps) if optim.warmup_steps > 0 else 1.0
    m = optim.min_lr_ratio
    span = max(total_steps - optim.warmup_steps, 1)
    p = min(max((step - optim.warmup_steps) / span, 0.0), 1.0)
    if optim.decay == "none":
        factor = 1.0
    elif optim.decay == "cosine":
        factor = m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))
    elif optim.decay == "linear":
        factor = m + (1.0 - m) * (1.0 - p)
    elif optim.decay == "rsqrt":
        ref = max(optim.warmup_steps, 1)
        factor = math.sqrt(ref / max(step + 1, ref))
    else:
        raise ConfigError(f"unknown optim.decay {optim.decay!r}; valid: cosine, linear, none, rsqrt")
    return optim.lr * warm * factor


def ema_decay(
    batch_size: int, half_life_images: float, *, images_seen: float | None = None, rampup_ratio: float | None = None
) -> float:
    """Per-step EMA decay ``0.5 ** (batch_size / half_life)`` (EDM2 half-life in images); 0 if half-life is 0.

    With ``rampup_ratio`` the half-life is ``min(half_life_images, images_seen * rampup_ratio)`` (EDM ramp-up),
    so the EMA tracks the weights closely early in training.
    """
    half_life = float(half_life_images)
    if rampup_ratio is not None and images_seen is not None:
        half_life = min(half_life, images_seen * rampup_ratio)
    if half_life <= 0:
        return 0.0
    return 0.5 ** (batch_size / half_life)
