"""The models shipped inside the package, and the short names the command line accepts for them.

``pretrained`` is the class-conditional MNIST model; ``pretrained-student`` a 4-step student distilled from it
(multistep consistency distillation; it samples only with the sampler and step count it was distilled for);
``pretrained-fashion`` the class-conditional Fashion-MNIST model; ``pretrained-text`` the text-to-image model on
captioned MNIST digits (it needs ``pip install simdiff[text]`` to sample). Any other value is taken as a path (a
run directory, a checkpoint or an exported ``.safetensors`` file).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PRETRAINED_DIR", "PRETRAINED", "SHIPPED", "resolve_source"]

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
#: the shipped class-conditional MNIST model (float16 EMA weights with their config).
PRETRAINED = PRETRAINED_DIR / "mnist_uvit.safetensors"
#: short name -> shipped file.
SHIPPED = {
    "pretrained": PRETRAINED,
    "pretrained-student": PRETRAINED_DIR / "mnist_student4.safetensors",
    "pretrained-fashion": PRETRAINED_DIR / "fashion_uvit.safetensors",
    "pretrained-text": PRETRAINED_DIR / "mnist_text.safetensors",
}


def resolve_source(value: str | Path) -> Path:
    """``value`` as a path, with the names of :data:`SHIPPED` replaced by their files (``~`` expanded)."""
    if isinstance(value, str) and value in SHIPPED:
        return SHIPPED[value]
    return Path(value).expanduser()
