"""Rollouts of frame-window models: rolling diffusion and the standard video-diffusion baseline, written as a PNG strip,
an animated GIF and an .npz.

Two ways to forecast ``frames`` frames after ``c`` clean context frames with a model of windows of ``W`` frames
(``R = W - c`` generated per window), both memory-bounded by one window whatever the length:

* ``"rolling"`` (Ruhe et al. 2024): :func:`simdiff.samplers.rolling.sample_rolling`, one frame emitted per sweep of
  ``steps`` network calls (after one start-up sweep), so each frame gets ``R x steps`` updates over its life.
* ``"uniform"`` (the standard baseline the paper compares with): all ``R`` frames of the window at one noise level,
  denoised together by ``steps`` DDIM / DDPM steps of the "uniform" phase; the last ``c`` frames of the result are
  the next window's context (autoregressive in chunks of ``R`` frames). Without context (``c = 0``) the chunks are
  independent. ``steps = R x`` the rolling steps gives both the same network calls per emitted frame.

The model is called with per-frame log-SNRs ``model(z [B, W, ...], logsnr [B, W])`` (a
:class:`~simdiff.nets.DiffusionModel` built with a :class:`~simdiff.processes.RollingDiffusion` process).

``simdiff sample`` dispatches here for such models (:func:`add_rollout_flags`, :func:`run_rollout`): the context is
read from the run's data set (test split) together with the ground truth that follows it, shown above each rollout.
``simdiff eval`` scores rollouts against that ground truth (:func:`run_rollout_eval`, :func:`forecast_scores`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from simdiff.configuration import ConfigError
from simdiff.devices import resolve_device
from simdiff.processes.rolling import RollingDiffusion

__all__ = ["rollout", "save_rollout", "frames_to_rgb", "preview_rollout", "forecast_scores", "add_rollout_flags",
           "run_rollout", "run_rollout_eval", "MODES"]

MODES = ("rolling", "uniform")
_SAMPLERS = ("ddim", "ddpm")
#: data sets shown with a blue-white-red map over a symmetric range (normalised vorticity), not grey [-1, 1].
_DIVERGING = {"kolmogorov": 2.5}


def _frame_shape(model: Any) -> tuple[int, ...]:
    shape = tuple(getattr(model, "image_shape", ()))
    if len(shape) != 4:
        raise ValueError(f"rollout needs a model of frame windows (image_shape (W, C, H, W')), got {shape}")
    return shape[1:]


def rollout(model: Any, process: RollingDiffusion, *, context: Tensor | None = None, num: int | None = None,
            frames: int, steps: int, mode: str = "rolling", sampler: str = "ddim", eta: float = 0.0,
            generator: torch.Generator | None = None, device: torch.device | str = "cpu",
            progress: bool = False) -> Tensor:
    """Forecast ``frames`` frames ``[B, frames, C, H, W]`` (float32, CPU) after ``context [B, c, C, H, W]``.

    Args:
        model: ``model(z [B, W, ...], logsnr [B, W]) -> DenoiserOutput``, with ``image_shape = (W, C, H, W')``.
        process: the rolling process (window ``W``, context ``c``; its phase is not used, ``mode`` decides).
        context: the clean context frames (required when ``c > 0``); ``num`` rollouts when there is no context.
        frames: frames to emit (any number).
        steps: network calls per sweep ("rolling") or per chunk of ``R`` frames ("uniform").
        mode: "rolling" or "uniform" (module docstring).
        sampler: "ddim" (with ``eta``) or "ddpm".
        generator: the noise (on ``device``'s type, or CPU).

    The window is in the model's parameter dtype (for a plain function: the context's dtype, else float32); the
    returned frames are float32.
    """
    from simdiff.samplers import get_sampler
    from simdiff.samplers.rolling import sample_rolling, sweep_grid

    if mode not in MODES:
        raise ConfigError(f"rollout mode must be one of {', '.join(MODES)}, got {mode!r}")
    if sampler not in _SAMPLERS:
        raise ConfigError(f"rollout sampler must be one of {', '.join(_SAMPLERS)}, got {sampler!r}")
    if frames < 1 or steps < 1:
        raise ConfigError(f"rollout needs frames >= 1 and steps >= 1, got {frames} and {steps}")
    shape = _frame_shape(model)
    c, w = process.context, process.window
    if c > 0:
        if context is None or context.dim() != 5 or context.shape[1] != c or tuple(context.shape[2:]) != shape:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"rollout: context must be [B, {c}, {', '.join(map(str, shape))}], got {got}")
        num = context.shape[0]
    elif num is None:
        raise ValueError("rollout: give num (the number of rollouts) when the model has no context frames")
    params = list(model.parameters())[:1] if hasattr(model, "parameters") else []
    dtype = params[0].dtype if params else (context.dtype if context is not None else torch.float32)
    ctx = None if c == 0 else context.to(device=device, dtype=dtype)

    def noise(k: int) -> Tensor:
        gdev = generator.device if generator is not None else torch.device(device)
        return torch.randn((num, k, *shape), generator=generator, device=gdev, dtype=dtype).to(device)

    def window_of(rest: Tensor) -> Tensor:
        return rest if ctx is None else torch.cat([ctx, rest], 1)

    with torch.no_grad():
        if mode == "rolling":
            out = sample_rolling(model, window_of(noise(w - c)), process, frames=frames, steps=steps,
                                 sampler=sampler, eta=eta, init=True, generator=generator, progress=progress)
            return out.float()
        proc = process.with_phase("uniform")
        grid, step = sweep_grid(proc, steps), get_sampler(sampler)
        options = {"eta": eta} if sampler == "ddim" else {}

        def per_frame(z: Tensor, lam: Tensor, **kw: Any):
            return model(z, proc.frame_logsnr(lam), **kw)

        chunks: list[Tensor] = []
        done = 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=frames, desc=f"video diffusion ({sampler}, {steps} steps / {w - c} frames)", unit="frame")
        while done < frames:
            z = step(per_frame, window_of(noise(w - c)), grid, process=proc, generator=generator, **options)
            new = z[:, c:][:, : frames - done]
            chunks.append(new.detach().float().cpu())
            done += new.shape[1]
            if c > 0:
                ctx = z[:, w - c :]
            if bar is not None:
                bar.update(new.shape[1])
        if bar is not None:
            bar.close()
        return torch.cat(chunks, 1)


# --------------------------------------------------------------------------------------------------- pictures


def frames_to_rgb(x: Tensor, *, data: str = "") -> np.ndarray:
    """Frames ``[..., C, H, W]`` -> uint8 RGB ``[..., H, W, 3]``: grey ``[-1, 1]``, or a blue-white-red map over
    ``[-r, r]`` for the data sets that are signed fields (Kolmogorov vorticity, ``r = 2.5``); 3 channels as RGB."""
    x = x.detach().float().cpu()
    if data in _DIVERGING:
        r = _DIVERGING[data]
        u = ((x[..., 0, :, :] / r).clamp(-1, 1) + 1) / 2  # [..., H, W] in [0, 1]
        lo, hi = torch.tensor([0.23, 0.30, 0.75]), torch.tensor([0.71, 0.02, 0.15])
        white = torch.ones(3)
        a = (2 * u).clamp(max=1)[..., None]
        b = (2 * u - 1).clamp(min=0)[..., None]
        rgb = torch.where(u[..., None] < 0.5, lo + (white - lo) * a, white + (hi - white) * b)
    else:
        v = ((x.clamp(-1, 1) + 1) * 0.5)
        rgb = v.movedim(-3, -1)
        if rgb.shape[-1] == 1:
            rgb = rgb.expand(*rgb.shape[:-1], 3)
    return (rgb * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()


def _columns(t: int, max_columns: int) -> list[int]:
    if t <= max_columns:
        return list(range(t))
    return sorted({round(i * (t - 1) / (max_columns - 1)) for i in range(max_columns)})


def _strip_image(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Rows of frames ``[T, H, W, 3]`` -> one image with white padding."""
    t, h, w, _ = rows[0].shape
    out = np.full((len(rows) * (h + pad) + pad, t * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j in range(t):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = row[j]
    return out


def save_rollout(x: Tensor, out: str | Path, *, truth: Tensor | None = None, context: Tensor | None = None,
                 data: str = "", max_rows: int = 4, max_columns: int = 16, gif: bool = True,
                 npz: bool = True) -> dict[str, Path]:
    """Write rollouts ``x [B, T, C, H, W]`` as ``<out>.png`` (a strip: per rollout, the ground truth row when given,
    then the rollout; at most ``max_columns`` evenly spaced frames), ``<out>.gif`` (all frames, rollouts side by
    side, ground truth above) and ``<out>.npz`` (``rollout``, and ``truth`` / ``context`` when given; float32).
    Returns the written paths by kind."""
    from PIL import Image

    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() in (".png", ".gif", ".npz") else out
    stem.parent.mkdir(parents=True, exist_ok=True)
    b, t = x.shape[:2]
    n = min(b, max_rows)
    scale = max(1, 64 // x.shape[-1])
    if truth is not None and tuple(truth.shape[:2]) != (b, t):
        raise ValueError(f"truth of shape {tuple(truth.shape)} does not match rollout {tuple(x.shape)}")

    def rgb(v: Tensor) -> np.ndarray:
        a = frames_to_rgb(v, data=data)
        return a.repeat(scale, -3).repeat(scale, -2) if scale > 1 else a

    cols = _columns(t, max_columns)
    rows = []
    for i in range(n):
        if truth is not None:
            rows.append(rgb(truth[i, cols]))
        rows.append(rgb(x[i, cols]))
    paths = {"png": stem.with_suffix(".png")}
    Image.fromarray(_strip_image(rows)).save(paths["png"])
    if gif:
        per_t = []
        for j in range(t):
            tiles = [rgb(x[i, j : j + 1]) for i in range(n)]
            if truth is not None:
                tiles = [np.concatenate([rgb(truth[i, j : j + 1]), tile], 0) for i, tile in enumerate(tiles)]
            per_t.append(Image.fromarray(_strip_image([np.concatenate(tiles, 0)])))
        paths["gif"] = stem.with_suffix(".gif")
        per_t[0].save(paths["gif"], save_all=True, append_images=per_t[1:], duration=120, loop=0)
    if npz:
        arrays = {"rollout": x.detach().float().cpu().numpy()}
        if truth is not None:
            arrays["truth"] = truth.detach().float().cpu().numpy()
        if context is not None:
            arrays["context"] = context.detach().float().cpu().numpy()
        paths["npz"] = stem.with_suffix(".npz")
        np.savez(paths["npz"], **arrays)
    return paths


def preview_rollout(model: Any, process: RollingDiffusion, sample_cfg: Any, *, shape: tuple[int, ...],
                    out: str | Path, num: int, device: Any = "cpu") -> Path:
    """A PNG strip of ``min(num, 4)`` rollouts of ``2 W`` frames after all-zero context frames, with the run's
    ``sample.steps`` per sweep (per chunk for the "uniform" phase) and ``sample.sampler`` when it is ddim / ddpm
    (else ddim): the picture a training run saves at its sample steps."""
    w = process.window
    n = max(1, min(num, 4))
    was_training = getattr(model, "training", False)
    model.eval()
    dev = torch.device(device)
    ctx = torch.zeros(n, process.context, *shape[1:], device=dev) if process.context else None
    sampler = sample_cfg.sampler if sample_cfg.sampler in _SAMPLERS else "ddim"
    mode = "uniform" if process.phase == "uniform" else "rolling"
    g = torch.Generator(dev).manual_seed(int(sample_cfg.seed))
    x = rollout(model, process, context=ctx, num=n, frames=2 * w, steps=int(sample_cfg.steps), mode=mode,
                sampler=sampler, eta=float(sample_cfg.eta), generator=g, device=dev)
    if was_training:
        model.train()
    return save_rollout(x, out, gif=False, npz=False)["png"]


# --------------------------------------------------------------------------------------------------- CLI


def add_rollout_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of ``simdiff sample`` for frame-window models (the sampler, steps, eta, seed, num, device and out
    flags of ``simdiff sample`` are shared: steps are per sweep / per chunk, the sampler ddim or ddpm)."""
    g = parser.add_argument_group("rollout (frame-window models: rolling diffusion / video diffusion)")
    g.add_argument("--frames", type=int, default=32, help="frames to roll out (default 32)")
    g.add_argument("--mode", choices=("auto", *MODES), default="auto",
                   help="rolling (one frame per sweep) or uniform (window at one level, chunks); auto: the "
                        "training phase (uniform for a 'uniform' model, else rolling)")
    g.add_argument("--context", choices=("data", "zeros"), default="data",
                   help="context frames from the data set's sequences (with ground truth shown), or zeros")
    g.add_argument("--context-split", default="test", help="data split the context comes from (default test)")
    g.add_argument("--context-start", type=int, default=0, help="first frame of the context in each sequence")


def _context_and_truth(loaded: Any, num: int, frames: int, split: str, start: int):
    from simdiff.data.video_sets import SEQUENCE_DEFAULTS, load_trajectories

    data = loaded.config.data
    if data.name not in SEQUENCE_DEFAULTS:
        raise ConfigError(f"--context data: the run's data set {data.name!r} is not a sequence data set; use "
                          f"--context zeros")
    seqs = load_trajectories(data.name, data.options, split=split)
    c = loaded.process.context
    if start < 0 or start + c > seqs.shape[1]:
        raise ConfigError(f"--context-start {start}: sequences have {seqs.shape[1]} frames, need {c} from there")
    idx = torch.arange(num) % seqs.shape[0]
    ctx = seqs[idx, start : start + c]
    end = start + c + frames
    truth = seqs[idx, start + c : end] if end <= seqs.shape[1] else None
    return ctx, truth


def _settings(args: argparse.Namespace, loaded: Any) -> dict[str, Any]:
    process = loaded.process
    if not isinstance(process, RollingDiffusion):
        raise ConfigError("this model is not a frame-window (rolling / video diffusion) model; sample it without "
                          "rollout flags")
    scfg = loaded.config.sample
    sampler = getattr(args, "sampler", None) or (scfg.sampler if scfg.sampler in _SAMPLERS else "ddim")
    if sampler not in _SAMPLERS:
        raise ConfigError(f"--sampler {sampler}: a rollout runs ddim or ddpm steps")
    mode = getattr(args, "mode", "auto")
    if mode == "auto":
        mode = "uniform" if process.phase == "uniform" else "rolling"
    return {"sampler": sampler, "steps": int(getattr(args, "steps", None) or scfg.steps),
            "eta": float(args.eta if getattr(args, "eta", None) is not None else scfg.eta),
            "seed": int(args.seed if getattr(args, "seed", None) is not None else scfg.seed),
            "frames": int(getattr(args, "frames", 32)), "mode": mode,
            "device": resolve_device(getattr(args, "device", None) or "cpu", what="--device")}


def run_rollout(args: argparse.Namespace, loaded: Any) -> int:
    """``simdiff sample`` for a frame-window model: roll out ``--frames`` frames for ``--num`` (default 4)
    sequences and write ``--out`` (default ``rollout.png``) with its .gif and .npz beside it."""
    import time

    st = _settings(args, loaded)
    process, num, frames = loaded.process, getattr(args, "num", None) or 4, st["frames"]
    ctx = truth = None
    if process.context:
        if getattr(args, "context", "data") == "data":
            ctx, truth = _context_and_truth(loaded, num, frames, getattr(args, "context_split", "test"),
                                            int(getattr(args, "context_start", 0)))
        else:
            ctx = torch.zeros(num, process.context, *loaded.image_shape[1:])
    g = torch.Generator(st["device"]).manual_seed(st["seed"])
    start = time.perf_counter()
    x = rollout(loaded.model, process, context=ctx, num=num, frames=frames, steps=st["steps"], mode=st["mode"],
                sampler=st["sampler"], eta=st["eta"], generator=g, device=st["device"], progress=True)
    secs = time.perf_counter() - start
    out = Path(getattr(args, "out", None) or "rollout.png")
    paths = save_rollout(x, out, truth=truth, context=ctx, data=loaded.config.data.name)
    print(f"wrote {num} rollouts of {frames} frames ({st['mode']}, {st['sampler']}, {st['steps']} steps) to "
          f"{', '.join(str(p) for p in paths.values())} in {secs:.1f} s")
    return 0


def forecast_scores(pred: Tensor, truth: Tensor, data: str = "") -> dict[str, Any]:
    """Scores of forecasts ``pred`` against ``truth`` (both ``[B, H, C, H', W']``), per lead time, averaged over B:
    ``mse [H]``; for Kolmogorov flow also ``corr [H]`` (Pearson correlation of the vorticity fields per frame) and
    ``spectrum_err``: ``mean_k |log E_pred(k) - log E_true(k)|`` over ``1 <= k < N / 2`` of the energy spectra
    averaged over the last third of the horizon and over B (where forecast and truth have decorrelated, this judges
    the statistics, not the trajectory), with the spectra themselves (``spectrum_model``, ``spectrum_true``)."""
    p, t = pred.double().flatten(2), truth.double().flatten(2)  # [B, H, D]
    out: dict[str, Any] = {"mse": ((p - t) ** 2).mean((0, 2)).tolist()}
    if data == "kolmogorov":
        from simdiff.data.kolmogorov import energy_spectrum

        pc, tc = p - p.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
        corr = (pc * tc).sum(-1) / (pc.norm(dim=-1) * tc.norm(dim=-1)).clamp_min(1e-12)
        out["corr"] = corr.mean(0).tolist()
        h = pred.shape[1]
        late = slice(h - max(1, h // 3), h)
        ep = energy_spectrum(pred[:, late, 0]).mean((0, 1))
        et = energy_spectrum(truth[:, late, 0]).mean((0, 1))
        k = slice(1, pred.shape[-1] // 2)
        out["spectrum_err"] = float((ep[k].log() - et[k].log()).abs().mean())
        out["spectrum_model"], out["spectrum_true"] = ep.tolist(), et.tolist()
    return out


def run_rollout_eval(args: argparse.Namespace, loaded: Any) -> dict[str, Any]:
    """``simdiff eval`` for a frame-window model: ``--num`` (default 16) rollouts of ``--frames`` frames after the
    context of as many test sequences, scored against their ground truth (:func:`forecast_scores`; the spectra are
    left out of the returned summary)."""
    st = _settings(args, loaded)
    process, num = loaded.process, getattr(args, "num", None) or 16
    if not process.context:
        raise ConfigError("rollout scores need context frames to forecast from; this model has context 0")
    ctx, truth = _context_and_truth(loaded, num, st["frames"], getattr(args, "context_split", "test"),
                                    int(getattr(args, "context_start", 0)))
    if truth is None:
        raise ConfigError(f"--frames {st['frames']}: the test sequences are shorter than context + frames; lower "
                          f"--frames or --context-start")
    g = torch.Generator(st["device"]).manual_seed(st["seed"])
    x = rollout(loaded.model, process, context=ctx, frames=st["frames"], steps=st["steps"], mode=st["mode"],
                sampler=st["sampler"], eta=st["eta"], generator=g, device=st["device"], progress=True)
    scores = forecast_scores(x, truth, loaded.config.data.name)
    summary = {"mode": st["mode"], "sampler": st["sampler"], "steps": st["steps"], "num": num,
               "frames": st["frames"], "mse_mean": float(np.mean(scores["mse"])), "mse": scores["mse"]}
    for key in ("corr", "spectrum_err"):
        if key in scores:
            summary[key] = scores[key]
    return summary
