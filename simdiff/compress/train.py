"""Training the learned base codec on photo patches (rate-distortion loss with the noise proxy).

Adam on ``bpp + lambda * 255^2 * MSE`` (Ballé et al. 2018) over random crops of the training patches with random
flips; the factorized density's parameters train with the same optimiser (the paper trains them jointly).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from .learned import HyperpriorCodec, HyperpriorConfig, rd_loss

#: the JPEG qualities the JPEG diffusion decoder is trained on; its label is the index in this tuple
JPEG_QUALITIES = (5, 10, 20, 35, 50, 75)

__all__ = ["JPEG_QUALITIES", "train_codec", "evaluate_codec", "codec_bases", "jpeg_bases", "train_decoder"]


def _batches(patches: np.ndarray, batch: int, crop: int, generator: torch.Generator, device: str = "cpu"):
    data = torch.from_numpy(patches).permute(0, 3, 1, 2).to(device)  # uint8 [N, C, H, W], kept on the device
    n, _, h, w = data.shape
    while True:
        idx = torch.randint(n, (batch,), generator=generator)
        r = int(torch.randint(h - crop + 1, (1,), generator=generator))
        c = int(torch.randint(w - crop + 1, (1,), generator=generator))
        x = data[idx.to(device), :, r : r + crop, c : c + crop].float() / 255.0
        flip = (torch.rand(batch, generator=generator) < 0.5).to(device)
        yield torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def train_codec(
    patches: np.ndarray,
    cfg: HyperpriorConfig,
    *,
    steps: int = 2000,
    batch: int = 8,
    crop: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    model_id: str = "hp",
    log: Callable[[str], None] | None = None,
    log_every: int = 200,
    device: str = "cpu",
    init: HyperpriorCodec | None = None,
) -> HyperpriorCodec:
    """Train a :class:`HyperpriorCodec` for ``cfg.lmbda`` on uint8 patches ``[N, H, W, C]``; returns it on the CPU in
    eval mode. The learning rate drops to a tenth for the last 10% of the steps.

    ``init``: a trained codec of the same widths to start from (fine-tuning one model per rate from a model trained
    at another rate, the usual way to get a ladder of rates for less compute than training each from scratch).
    """
    torch.manual_seed(seed)
    model = HyperpriorCodec(cfg, model_id=model_id)
    if init is not None:
        if (init.cfg.N, init.cfg.M, init.cfg.channels) != (cfg.N, cfg.M, cfg.channels):
            raise ValueError(f"init codec widths {init.cfg} do not match {cfg}")
        model.load_state_dict(init.state_dict())
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(0.9 * steps)], 0.1)
    gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device).manual_seed(seed)  # the quantisation noise is drawn on the device
    batches = _batches(patches, batch, crop, gen, device)
    start = time.time()
    model.train()
    for step in range(1, steps + 1):
        x = next(batches)
        loss, bpp, mse = rd_loss(model(x, generator=noise_gen), x, cfg.lmbda)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log is not None and (step % log_every == 0 or step == steps):
            psnr = 10 * np.log10(1.0 / max(mse.item(), 1e-12))
            log(f"step {step}/{steps} loss {loss.item():.4f} bpp {bpp.item():.4f} psnr {psnr:.2f} dB "
                f"({time.time() - start:.0f} s)")
    return model.cpu().eval()


def evaluate_codec(model: HyperpriorCodec, images: list[np.ndarray]) -> dict:
    """Mean file bpp (whole ``.sdc`` bytes), payload-vs-estimate bit ratio and PSNR over uint8 ``[H, W, C]`` images."""
    bpp, ratio, psnr = [], [], []
    for im in images:
        data = model.compress(im)
        est = model.analyse(im)["estimated_bits"]
        out = model.decompress(data)
        h, w = im.shape[:2]
        bpp.append(len(data) * 8 / (h * w))
        ratio.append(len(data) * 8 / est)
        err = np.mean((out.astype(np.float64) - im.astype(np.float64)) ** 2)
        psnr.append(10 * np.log10(255.0**2 / max(err, 1e-12)))
    return {"bpp": float(np.mean(bpp)), "file_bits_over_estimate": float(np.mean(ratio)), "psnr": float(np.mean(psnr))}


@torch.no_grad()
def codec_bases(model: HyperpriorCodec, patches: np.ndarray, *, device: str = "cpu", chunk: int = 64) -> np.ndarray:
    """The learned codec's reconstructions (rounded latents, as decoding gives) of uint8 patches ``[N, H, W, C]``
    with sides multiple of 16, as uint8 like the patches."""
    model = model.to(device).eval()
    out = []
    for i in range(0, len(patches), chunk):
        x = torch.from_numpy(patches[i : i + chunk]).permute(0, 3, 1, 2).float().to(device) / 255.0
        x_hat = model.g_s(torch.round(model.g_a(x))).clamp(0, 1)
        out.append((x_hat * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    model.cpu()
    return np.concatenate(out)


def jpeg_bases(patches: np.ndarray, qualities: tuple[int, ...]) -> np.ndarray:
    """JPEG reconstructions ``[len(qualities), N, H, W, C]`` uint8 of each patch at each quality (Pillow)."""
    from .standard import decode_native, encode_native

    return np.stack([np.stack([decode_native(encode_native(p, "jpeg", q)) for p in patches]) for q in qualities])


def train_decoder(
    patches: np.ndarray,
    bases: np.ndarray,
    cfg,
    *,
    max_seconds: float = 60.0,
    max_steps: int | None = None,
    batch: int = 32,
    lr: float = 5e-4,
    seed: int = 0,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
    log_every: int = 200,
):
    """Train a :class:`~simdiff.compress.diffusion.BaseConditionedDenoiser` on ``(patch, base)`` pairs.

    Args:
        patches: uint8 ``[N, H, W, C]`` originals.
        bases: uint8 ``[K, N, H, W, C]`` base-layer reconstructions of them at ``K`` rates; the rate index is the
            label when ``cfg.num_rates > 0``.
        cfg: :class:`~simdiff.compress.diffusion.DecoderConfig` (``cfg.patch`` is the crop side).
        max_seconds / max_steps: stop at whichever comes first; the learning rate drops to a tenth for the last 10%.

    Returns ``(model on the CPU in eval mode, steps run)``.
    """
    from .diffusion import BaseConditionedDenoiser, decoder_loss

    torch.manual_seed(seed)
    model = BaseConditionedDenoiser(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(patches).permute(0, 3, 1, 2)
    b_all = torch.from_numpy(bases).permute(0, 1, 4, 2, 3)
    k_n, n, _, h, w = b_all.shape
    crop = cfg.patch
    start, step = time.time(), 0
    model.train()
    while True:
        elapsed = time.time() - start
        if elapsed > max_seconds or (max_steps is not None and step >= max_steps):
            break
        late = elapsed > 0.9 * max_seconds or (max_steps is not None and step >= 0.9 * max_steps)
        for g in opt.param_groups:
            g["lr"] = lr * (0.1 if late else 1.0)
        idx = torch.randint(n, (batch,), generator=gen)
        k = torch.randint(k_n, (batch,), generator=gen)
        r = int(torch.randint(h - crop + 1, (1,), generator=gen))
        c = int(torch.randint(w - crop + 1, (1,), generator=gen))
        x = x_all[idx, :, r : r + crop, c : c + crop]
        base = b_all[k, idx, :, r : r + crop, c : c + crop]
        flip = (torch.rand(batch, generator=gen) < 0.5).view(-1, 1, 1, 1)
        x, base = torch.where(flip, x.flip(-1), x), torch.where(flip, base.flip(-1), base)
        x = x.to(device).float() / 127.5 - 1
        base = base.to(device).float() / 127.5 - 1
        labels = k.to(device) if cfg.num_rates else None
        loss = decoder_loss(model, x, base, labels=labels, generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if log is not None and step % log_every == 0:
            log(f"decoder step {step} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    return model.cpu().eval(), step
