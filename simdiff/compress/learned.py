"""A learned MSE codec: the scale hyperprior of Ballé, Minnen, Singh, Hwang & Johnston 2018 ("Variational image
compression with a scale hyperprior", fig. 4 architecture), small enough to train on a CPU.

    y = g_a(x)           4 strided 5x5 convs (stride 2) with GDN     [B, M, H/16, W/16]
    z = h_a(|y|)         3x3 conv, two strided 5x5 convs, ReLU       [B, N, H/64, W/64]
    sigma = h_s(z_hat)   two transposed 5x5 convs, 3x3 conv, ReLU; softplus output (the paper uses ReLU)
    x_hat = g_s(y_hat)   4 transposed 5x5 convs with inverse GDN

Training uses additive uniform noise for both quantisations (the paper's proxy) and the loss
``bpp + lambda * 255^2 * MSE`` on images in [0, 1]; one model per ``lambda`` (:data:`LAMBDAS`, the six values
CompressAI uses for its quality levels 1-6). Coding rounds ``y`` and ``z`` and range-codes them
(:mod:`simdiff.compress.entropy`). Inputs are padded (edge replication) to a multiple of 64 and cropped back.
GDN (Ballé, Laparra & Simoncelli 2016) here: ``y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2)`` with
``beta, gamma`` kept positive by absolute values (a simpler reparameterisation than the paper's).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simdiff.configuration import ConfigError, from_dict

from .entropy import FactorizedDensity, decode_latents, encode_latents, gaussian_likelihood, quantize
from .format import Header, pack, read_model_file, unpack, write_model_file

__all__ = ["LAMBDAS", "HyperpriorConfig", "GDN", "HyperpriorCodec", "rd_loss"]

LAMBDAS = (0.0018, 0.0035, 0.0067, 0.0130, 0.0250, 0.0483)


@dataclass(frozen=True)
class HyperpriorConfig:
    """Widths: ``N`` (transforms and hyper-latent), ``M`` (latent ``y``), image ``channels``; ``lmbda`` and ``rate``
    record which rate point the model was trained for."""

    N: int = 64
    M: int = 96
    channels: int = 3
    lmbda: float = 0.0067
    rate: int = 2

    def __post_init__(self) -> None:
        if self.N < 1 or self.M < 1 or self.channels not in (1, 3):
            raise ConfigError(f"bad hyperprior widths N={self.N} M={self.M} channels={self.channels}")


class GDN(nn.Module):
    """Generalised divisive normalisation (``inverse=True``: its approximate inverse, multiplication)."""

    def __init__(self, channels: int, *, inverse: bool = False):
        super().__init__()
        self.inverse = inverse
        self.beta = nn.Parameter(torch.ones(channels))
        self.gamma = nn.Parameter(0.1 * torch.eye(channels))

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        gamma = self.gamma.abs().view(c, c, 1, 1)
        norm = torch.sqrt(F.conv2d(x * x, gamma, self.beta.abs() + 1e-6))
        return x * norm if self.inverse else x / norm


def _conv(cin: int, cout: int, k: int = 5, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


def _deconv(cin: int, cout: int, k: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, k, stride=stride, padding=k // 2, output_padding=stride - 1)


class HyperpriorCodec(nn.Module):
    """``forward(x)`` for training; ``compress(image) -> bytes`` / ``decompress(bytes) -> image`` for coding.

    Images for :meth:`forward` are float ``[B, C, H, W]`` in [0, 1]; for :meth:`compress` uint8 ``[H, W, C]``.
    """

    MULTIPLE = 64

    def __init__(self, cfg: HyperpriorConfig | None = None, *, model_id: str = "hp"):
        super().__init__()
        self.cfg = cfg = cfg or HyperpriorConfig()
        self.model_id = model_id
        n, m, c = cfg.N, cfg.M, cfg.channels
        self.g_a = nn.Sequential(_conv(c, n), GDN(n), _conv(n, n), GDN(n), _conv(n, n), GDN(n), _conv(n, m))
        self.g_s = nn.Sequential(_deconv(m, n), GDN(n, inverse=True), _deconv(n, n), GDN(n, inverse=True),
                                 _deconv(n, n), GDN(n, inverse=True), _deconv(n, c))
        self.h_a = nn.Sequential(_conv(m, n, 3, 1), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))
        self.h_s = nn.Sequential(_deconv(n, n), nn.ReLU(), _deconv(n, n), nn.ReLU(), _conv(n, m, 3, 1))
        self.density = FactorizedDensity(n)

    # ------------------------------------------------------------------------------------------- training

    def scales(self, z_hat: Tensor) -> Tensor:
        """Hyper-synthesis: ``z_hat [B, N, h', w']`` -> positive scales of ``y`` ``[B, M, 4h', 4w']``."""
        return F.softplus(self.h_s(z_hat))

    def forward(self, x: Tensor, *, noise: bool = True, generator: torch.Generator | None = None) -> dict:
        """``x`` ``[B, C, H, W]`` in [0, 1] (H, W multiples of 64) -> ``{"x_hat", "bits_y" [B], "bits_z" [B]}``."""
        y = self.g_a(x)
        z = self.h_a(y.abs())
        z_hat = quantize(z, noise=noise, generator=generator)
        y_hat = quantize(y, noise=noise, generator=generator)
        bits_z = -torch.log2(self.density.likelihood(z_hat)).flatten(1).sum(1)
        bits_y = -torch.log2(gaussian_likelihood(y_hat, self.scales(z_hat))).flatten(1).sum(1)
        return {"x_hat": self.g_s(y_hat), "bits_y": bits_y, "bits_z": bits_z, "y_hat": y_hat, "z_hat": z_hat}

    # ------------------------------------------------------------------------------------------- identity

    def model_hash(self) -> bytes:
        """First 4 bytes of SHA-256 over the config and every tensor of the state dict (names, shapes, values)."""
        h = hashlib.sha256(json.dumps(asdict(self.cfg), sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
        return h.digest()[:4]

    def save(self, path, *, half: bool = False) -> None:
        """Write weights + config to a ``.safetensors`` file (``half``: as float16, loaded back as float32; the
        model hash is that of the loaded weights)."""
        meta = {"config": json.dumps(asdict(self.cfg)), "model_id": self.model_id, "kind": "hyperprior"}
        write_model_file(path, self.state_dict(), meta, half=half)

    @classmethod
    def load(cls, path) -> HyperpriorCodec:
        """Read a model written by :meth:`save` (ConfigError if it is not one)."""
        tensors, meta = read_model_file(path, kind="hyperprior", what="hyperprior codec model", noun="model")
        model = cls(from_dict(HyperpriorConfig, json.loads(meta["config"]), where="codec"),
                    model_id=meta.get("model_id", "hp"))
        try:
            model.load_state_dict(tensors)
        except RuntimeError as e:
            raise ConfigError(f"{path}: weights do not fit the config ({str(e).splitlines()[0]})") from None
        return model.eval()

    # ------------------------------------------------------------------------------------------- coding

    def _pad(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        m = self.MULTIPLE
        return F.pad(x, (0, (-w) % m, 0, (-h) % m), mode="replicate")

    @torch.no_grad()
    def analyse(self, image: np.ndarray) -> dict:
        """uint8 ``[H, W, C]`` -> rounded latents and the model's own rate estimate (bits, continuous scales)."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != self.cfg.channels:
            raise ValueError(f"image must be uint8 [H, W, {self.cfg.channels}], got {image.dtype} {image.shape}")
        x = self._pad(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0)
        y = self.g_a(x)
        z_hat = torch.round(self.h_a(y.abs()))
        y_hat = torch.round(y)
        scale = self.scales(z_hat)
        bits = -torch.log2(self.density.likelihood(z_hat)).sum() - torch.log2(gaussian_likelihood(y_hat, scale)).sum()
        return {"y_hat": y_hat, "z_hat": z_hat, "scale": scale, "estimated_bits": float(bits)}

    @torch.no_grad()
    def compress(self, image: np.ndarray, rate: int | None = None) -> bytes:
        """uint8 ``[H, W, C]`` -> ``.sdc`` bytes (``rate`` defaults to the model's own rate index)."""
        a = self.analyse(image)
        payload = encode_latents(a["y_hat"], a["scale"], a["z_hat"], self.density)
        header = Header("learned", image.shape[0], image.shape[1], self.cfg.channels, self.model_id,
                        self.model_hash(), self.cfg.rate if rate is None else rate)
        return pack(header, payload)

    @torch.no_grad()
    def decompress(self, data: bytes, *, where: str = "input") -> np.ndarray:
        """``.sdc`` bytes -> uint8 ``[H, W, C]``; refuses a file made by another model (one line)."""
        header, payload = unpack(data, where=where)
        return self.decode_payload(header, payload, where=where)

    @torch.no_grad()
    def decode_payload(self, header: Header, payload: bytes, *, where: str = "input") -> np.ndarray:
        """Decode a checked header + payload (see :meth:`decompress`)."""
        if header.codec != "learned":
            raise ConfigError(f"{where}: holds a {header.codec} stream, not the learned codec's")
        mine = self.model_hash()
        if (header.model_id, header.model_hash) != (self.model_id, mine):
            raise ConfigError(f"{where}: made by model {header.model_id!r} ({header.model_hash.hex()}), this decoder "
                              f"is {self.model_id!r} ({mine.hex()}); decode with the model that encoded it")
        if header.channels != self.cfg.channels:
            raise ConfigError(f"{where}: {header.channels} channels, the model codes {self.cfg.channels}")
        m = self.MULTIPLE
        if header.height * header.width > 1 << 28:
            raise ConfigError(f"{where}: image of {header.height}x{header.width} pixels is too large to decode")
        hp, wp = -(-header.height // m) * m, -(-header.width // m) * m
        z_shape = (1, self.cfg.N, hp // m, wp // m)
        try:
            y_hat, _ = decode_latents(payload, z_shape=z_shape, density=self.density, scale_fn=self.scales)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        x_hat = self.g_s(y_hat)[..., : header.height, : header.width]
        return (x_hat[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy().copy()


def rd_loss(out: dict, x: Tensor, lmbda: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, bpp, mse)`` with ``loss = bpp + lmbda * 255^2 * mse`` (mean over the batch; ``x`` in [0, 1])."""
    pixels = x.shape[-2] * x.shape[-1]
    bpp = ((out["bits_y"] + out["bits_z"]) / pixels).mean()
    mse = (out["x_hat"] - x).pow(2).mean()
    return bpp + lmbda * 255.0**2 * mse, bpp, mse
