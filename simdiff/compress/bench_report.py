"""Tables, rate-distortion-perception plots and an image strip for the compression benchmark."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["markdown_table", "write_report", "image_strip"]

STRIP_TARGETS = (0.1, 0.3, 0.6)
STRIP_BOX = (60, 188, 170, 298)  # (row0, row1, col0, col1) of the first test photo: the cat's face


def _f(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_table(rows, fid_label: str = "FID") -> str:
    """One line per row: method, setting, bpp, PSNR, MS-SSIM, KID, FID, encode / decode seconds per image."""
    out = [f"| method | setting | bpp | PSNR (dB) | MS-SSIM | KID | {fid_label} | encode s | decode s |",
           "|:---|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r.method, r.bpp)):
        out.append(f"| {r.method} | {r.setting} | {r.bpp:.3f} | {r.psnr:.2f} | {r.ms_ssim:.4f} | {_f(r.kid, 4)} | "
                   f"{_f(r.fid, 1)} | {r.encode_s:.3f} | {r.decode_s:.2f} |")
    return "\n".join(out)


def _plot(rows, path: Path, fid_label: str = "FID") -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for ax, key, label in zip(axes, ("psnr", "ms_ssim", "kid", "fid"),
                              ("PSNR (dB)", "MS-SSIM", "KID (lower is better)", f"{fid_label} (lower is better)")):
        for method in sorted({r.method for r in rows}):
            pts = sorted((r.bpp, getattr(r, key)) for r in rows if r.method == method and getattr(r, key) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xlabel("bits per pixel (whole file)")
        ax.set_ylabel(label)
        ax.set_xlim(0, 1.0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def image_strip(rows, original: np.ndarray, *, box=STRIP_BOX, targets=STRIP_TARGETS) -> np.ndarray:
    """Grid uint8: one line per method (original first), one column per target bpp (the row nearest to it)."""
    r0, r1, c0, c1 = box
    if r1 > original.shape[0] or c1 > original.shape[1]:  # a smaller image (smoke runs): its top-left corner
        r0, c0 = 0, 0
        r1, c1 = min(r1 - box[0], original.shape[0]), min(c1 - box[2], original.shape[1])
    h, w = r1 - r0, c1 - c0
    methods = sorted({r.method for r in rows})
    grid = np.full(((len(methods) + 1) * (h + 4), len(targets) * (w + 4), 3), 255, np.uint8)
    grid[2 : 2 + h, 2 : 2 + w] = original[r0:r1, c0:c1]
    for i, method in enumerate(methods, start=1):
        cands = [r for r in rows if r.method == method and r.decoded]
        for j, t in enumerate(targets):
            best = min(cands, key=lambda r: abs(r.bpp - t), default=None)
            if best is not None:
                y, x = i * (h + 4) + 2, j * (w + 4) + 2
                grid[y : y + h, x : x + w] = best.decoded[0][r0:r1, c0:c1]
    return grid


def write_report(rows, images, out: Path, name: str, fid_label: str = "FID") -> None:
    """``{name}.md`` (table + strip legend), ``{name}_rd.png`` (curves), ``{name}_strip.png``."""
    table = markdown_table(rows, fid_label)
    plotted = _plot(rows, out / f"{name}_rd.png", fid_label)
    strip = image_strip(rows, images[0])
    Image.fromarray(strip).save(out / f"{name}_strip.png")
    methods = sorted({r.method for r in rows})
    legend = ("Strip: top-left the original crop; then one line per method in this order: " + ", ".join(methods)
              + f"; columns: the row nearest to {', '.join(map(str, STRIP_TARGETS))} bpp.")
    text = table + "\n\n" + legend + ("\n" if plotted else "\n(matplotlib missing: no plot)\n")
    (out / f"{name}.md").write_text(text)
    print(table, flush=True)
