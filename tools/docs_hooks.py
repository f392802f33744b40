"""MkDocs hooks: publish the repository's BENCHMARKS.md (and the result images it shows) as the site's benchmarks
page, so the tables have one source."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def on_files(files, config):
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    files.append(File.generated(config, "benchmarks.md", content=text))
    for rel in sorted(set(_IMAGE.findall(text))):
        if "://" not in rel and (ROOT / rel).is_file():
            files.append(File.generated(config, rel, abs_src_path=str(ROOT / rel)))
    return files
