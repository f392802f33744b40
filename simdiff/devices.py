"""Device names from configs and flags, checked before any work starts.

``resolve_device("auto")`` is the first CUDA device when CUDA is available, else the CPU; "cpu", "cuda", "cuda:N" and
"mps" are accepted when the machine has them. Anything else, or an accelerator this machine lacks, raises a one-line
:class:`~simdiff.configuration.ConfigError` naming the setting, so the CLI exits 2 instead of failing deep inside.
"""

from __future__ import annotations

import torch

from simdiff.configuration import ConfigError

__all__ = ["resolve_device"]

_KINDS = ("cpu", "cuda", "mps")


def resolve_device(name: str | torch.device, *, what: str = "device", local_rank: int = 0) -> torch.device:
    """The :class:`torch.device` for ``name`` ("auto", "cpu", "cuda", "cuda:N", "mps").

    Args:
        name: the device string (or a device, returned after the same availability checks).
        what: the setting's name for the error message (e.g. "--device", "train.device").
        local_rank: the CUDA index "auto" and a bare "cuda" resolve to (torchrun's LOCAL_RANK).
    """
    text = str(name).strip()
    fix = "use --device cpu" if what.startswith("--") else f"set {what}=cpu"
    if text == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in _KINDS:
        raise ConfigError(f"{what}: unknown device {text!r}; use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what}={text!r} but CUDA is not available on this machine; {fix}")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{what}={text!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"{what}={text!r} but MPS is not available on this machine; {fix}")
    return dev
