"""Rank-0 training logs: ``metrics.csv``, an optional TensorBoard writer, a tqdm bar, a loss-curve PNG.

``metrics.csv`` columns: step, loss, lr, grad_norm, images_per_s, nonfinite. Floats are written with ``repr``
so a resumed run can be compared with an uninterrupted one bit for bit (every column but ``images_per_s``, a
wall-clock measurement). On resume, rows after the restored step (written by the killed run after its last
checkpoint), incomplete rows and rows out of step order are dropped, and the file is rewritten atomically (temp
file + ``os.replace``), never truncated in place. A failed append (disk full, read-only) is cut back to the last
whole row and raised as a one-line :class:`~simdiff.train.errors.RunDirError`.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from simdiff.train import rundir

__all__ = ["MetricsLogger", "read_metrics", "plot_loss_curve", "COLUMNS"]

COLUMNS = ("step", "loss", "lr", "grad_norm", "images_per_s", "nonfinite")


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``metrics.csv`` as dicts of strings (empty list if the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _whole_rows(rows: list[dict[str, str]], upto: int) -> list[dict[str, str]]:
    """The rows with every column present and ``step`` an integer, strictly increasing, ``<= upto``."""
    keep, last = [], 0
    for r in rows:
        step = r.get("step") or ""
        if None in r or any(r.get(c) is None for c in COLUMNS) or not step.isdigit():
            continue
        if last < int(step) <= upto:
            keep.append({c: r[c] for c in COLUMNS})
            last = int(step)
    return keep


def _csv_text(rows: list[dict[str, str]], *, header: bool) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    if header:
        w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


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
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.csv"
        self.bar = self.tb = None
        if not enabled:
            return
        keep = _whole_rows(read_metrics(self.path), resume_step) if resume_step is not None else []
        try:
            rundir.atomic_write_bytes(self.path, _csv_text(keep, header=True).encode())
        except OSError as e:
            raise rundir.write_error(e, run_dir=self.run_dir, what="metrics.csv", path=self.path) from None
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
        self._append(_csv_text([row], header=False).encode())
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"train/{k}", float(v), step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics.get('loss', math.nan):.4g}",
                                 img_s=f"{metrics.get('images_per_s', math.nan):.1f}", refresh=False)

    def _append(self, data: bytes) -> None:
        """Append whole rows; on failure cut the file back to its previous size and raise a RunDirError."""
        size = None
        try:
            with open(self.path, "ab") as f:
                size = f.tell()
                f.write(data)
        except OSError as e:
            if size is not None:
                try:
                    os.truncate(self.path, size)
                except OSError:
                    pass
            raise rundir.write_error(e, run_dir=self.run_dir, what="metrics.csv", path=self.path) from None

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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    rundir.atomic_write_bytes(out_path, buf.getvalue())
    return Path(out_path)
