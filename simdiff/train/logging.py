"""Rank-0 training logs: ``metrics.csv``, an optional TensorBoard writer, a tqdm bar, a loss-curve PNG.

``metrics.csv`` columns: step, loss, lr, grad_norm, images_per_s, nonfinite. Floats are written with ``repr``
so a resumed run can be compared with an uninterrupted one bit for bit. On resume, rows after the restored
step (written by the killed run after its last checkpoint) are dropped.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

__all__ = ["MetricsLogger", "read_metrics", "plot_loss_curve", "COLUMNS"]

COLUMNS = ("step", "loss", "lr", "grad_norm", "images_per_s", "nonfinite")


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``metrics.csv`` as dicts of strings (empty list if the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class MetricsLogger:
    """Appends metric rows; a no-op object when ``enabled`` is False (ranks other than 0).

    Args:
        run_dir: where ``metrics.csv`` (and TensorBoard events, if installed) go.
        resume_step: drop existing rows with ``step > resume_step`` (None: start a fresh file).
        total_steps, initial_step: for the progress bar; ``progress`` turns the bar on/off.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, resume_step: int | None = None,
                 total_steps: int = 0, initial_step: int = 0, progress: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.csv"
        self.bar = self.tb = None
        if not enabled:
            return
        keep = [r for r in read_metrics(self.path) if int(r["step"]) <= resume_step] if resume_step is not None else []
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(keep)
        try:  # TensorBoard only if installed (it is not a dependency)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=initial_step + 1)
        except ImportError:
            self.tb = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, **metrics: float) -> None:
        """Write one row (missing columns left blank) and update TensorBoard / the bar's postfix."""
        if not self.enabled:
            return
        row = {"step": step, **{k: (repr(v) if isinstance(v, int) else repr(float(v))) for k, v in metrics.items()}}
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writerow(row)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"train/{k}", float(v), step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics.get('loss', math.nan):.4g}",
                                 img_s=f"{metrics.get('images_per_s', math.nan):.1f}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Plot loss vs. step from ``metrics.csv`` to a PNG (matplotlib Agg); None if there is nothing to plot."""
    rows = [r for r in read_metrics(metrics_path) if r.get("loss") not in (None, "")]
    pts = [(int(r["step"]), float(r["loss"])) for r in rows]
    pts = [(s, v) for s, v in pts if math.isfinite(v)]
    if not pts:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([s for s, _ in pts], [v for _, v in pts], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if min(v for _, v in pts) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    return Path(out_path)
