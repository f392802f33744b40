"""The documentation site: every tutorial's code runs as written, and ``mkdocs build --strict`` (what ``make docs``
runs) builds the site, API reference included, without a warning."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs" / "tutorials").glob("*.md")) + [ROOT / "docs" / "concepts.md"]


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, f"{page.name} has no python example"
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "__docs__"}
    for block in blocks:
        exec(compile(block, str(page), "exec"), scope)  # noqa: S102 - our own documentation


def test_nav_lists_every_page() -> None:
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))["nav"]

    def leaves(items):
        for item in items:
            for value in item.values() if isinstance(item, dict) else [item]:
                yield from leaves(value) if isinstance(value, list) else [value]

    listed = set(leaves(nav))
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert pages - listed == set(), f"pages missing from mkdocs.yml nav: {sorted(pages - listed)}"
    assert {p for p in listed if p != "benchmarks.md"} <= pages


def test_site_builds_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocstrings", reason="the docs tools come with the [dev] extra (make setup)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "index.html").is_file()
    assert "DiffusionModel" in (site / "api" / "nets" / "index.html").read_text(encoding="utf-8")
    benchmarks = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert "Samplers on exact Gaussian-mixture denoisers" in benchmarks  # BENCHMARKS.md is the page's source
