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

__all__ = ["train_codec", "evaluate_codec"]


def _batches(patches: np.ndarray, batch: int, crop: int, generator: torch.Generator):
    data = torch.from_numpy(patches).permute(0, 3, 1, 2)  # uint8 [N, C, H, W]
    n, _, h, w = data.shape
    while True:
        idx = torch.randint(n, (batch,), generator=generator)
        r = int(torch.randint(h - crop + 1, (1,), generator=generator))
        c = int(torch.randint(w - crop + 1, (1,), generator=generator))
        x = data[idx, :, r : r + crop, c : c + crop].float() / 255.0
        flip = torch.rand(batch, generator=generator) < 0.5
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
) -> HyperpriorCodec:
    """Train a :class:`HyperpriorCodec` for ``cfg.lmbda`` on uint8 patches ``[N, H, W, C]``; returns it in eval mode.

    The learning rate drops to a tenth for the last 10% of the steps.
    """
    torch.manual_seed(seed)
    model = HyperpriorCodec(cfg, model_id=model_id)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(0.9 * steps)], 0.1)
    gen = torch.Generator().manual_seed(seed)
    batches = _batches(patches, batch, crop, gen)
    start = time.time()
    model.train()
    for step in range(1, steps + 1):
        x = next(batches)
        loss, bpp, mse = rd_loss(model(x, generator=gen), x, cfg.lmbda)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log is not None and (step % log_every == 0 or step == steps):
            psnr = 10 * np.log10(1.0 / max(mse.item(), 1e-12))
            log(f"step {step}/{steps} loss {loss.item():.4f} bpp {bpp.item():.4f} psnr {psnr:.2f} dB "
                f"({time.time() - start:.0f} s)")
    return model.eval()


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
