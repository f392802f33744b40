"""Shared helpers for the benchmark scripts: machine facts, result files, plain-text and markdown tables.

Every benchmark writes ``benchmarks/results/<name>.json`` (numbers + machine + command) and
``benchmarks/results/<name>.md`` (the tables, ready to paste into BENCHMARKS.md), and prints the same tables.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = [
    "RESULTS_DIR",
    "machine_info",
    "command_line",
    "fmt_num",
    "table_text",
    "table_markdown",
    "write_json",
    "write_text",
    "CallCounter",
    "steps_for_nfe",
]


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, Python / torch / diffusers / numpy / scipy versions and the date (UTC)."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    for mod in ("torch", "diffusers", "numpy", "scipy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just "absent"
            info[mod] = "absent"
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    return info


def command_line() -> str:
    """The command that ran this process, shell-quoted (script path made relative to the repo root)."""
    argv = list(sys.argv)
    if argv:
        p = Path(argv[0]).resolve()
        root = Path(__file__).resolve().parent.parent
        argv[0] = str(p.relative_to(root)) if p.is_relative_to(root) else argv[0]
    return "python " + " ".join(shlex.quote(a) for a in argv)


def fmt_num(v: float | None, digits: int = 3) -> str:
    """Compact scientific/fixed formatting; ``None``/NaN -> ``-``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v == 0:
        return "0"
    a = abs(v)
    if 1e-3 <= a < 1e4:
        return f"{v:.{digits}g}"
    return f"{v:.{max(digits - 1, 1)}e}"


def _cells(rows: Sequence[Sequence[Any]], fmt: Callable[[Any], str]) -> list[list[str]]:
    return [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]


def table_text(header: Sequence[str], rows: Sequence[Sequence[Any]], fmt: Callable[[Any], str] = fmt_num) -> str:
    """Fixed-width table: first column left aligned, the rest right aligned."""
    cells = [list(header), *_cells(rows, fmt)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(parts))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table_markdown(header: Sequence[str], rows: Sequence[Sequence[Any]], fmt: Callable[[Any], str] = fmt_num) -> str:
    """GitHub markdown table (first column left aligned, numbers right aligned)."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in _cells(rows, fmt)]
    return "\n".join(out)


def _jsonable(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_jsonable(v) for v in o]
    return o


def write_json(name: str, payload: dict[str, Any], directory: Path = RESULTS_DIR) -> Path:
    """Write ``payload`` (NaN -> null, inf -> "inf") to ``directory/name.json``; returns the path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(_jsonable(payload), indent=1, sort_keys=False) + "\n")
    return path


def write_text(name: str, text: str, directory: Path = RESULTS_DIR) -> Path:
    """Write ``text`` to ``directory/name`` (e.g. ``samplers.md``); returns the path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


class CallCounter:
    """Wrap a callable and count its calls (network-evaluation accounting that trusts no formula)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.fn(*args, **kwargs)


def steps_for_nfe(
    run: Callable[..., Tensor], denoise: Callable[..., Any], dim: int, targets: Sequence[int]
) -> dict[int, tuple[int, int]]:
    """Map target NFE -> (steps, actual NFE): the most steps whose counted calls do not exceed the target.

    ``run(z, steps, denoise)`` runs one method; calls are counted on a one-point ``[1, dim]`` batch (NFE is
    assumed non-decreasing in steps; binary search per target). Targets no step count reaches are left out."""
    z = torch.randn(1, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    memo: dict[int, int | None] = {}

    def calls(steps: int) -> int | None:
        if steps not in memo:
            c = CallCounter(denoise)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    run(z, steps, c)
                memo[steps] = c.calls
            except Exception:  # noqa: BLE001 - some methods need a minimum number of steps
                memo[steps] = None
        return memo[steps]

    out = {}
    for t in targets:
        lo, hi = 0, t + 1  # invariant: calls(lo) <= t (or lo = 0), calls(hi) > t; NFE >= 1 per step below t + 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            c = calls(mid)
            if c is not None and c <= t:
                lo = mid
            else:
                hi = mid
        if lo > 0:
            out[t] = (lo, memo[lo])
    return out
