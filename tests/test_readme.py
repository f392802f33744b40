"""The README's Python example runs as written, and the docs refer only to files that are in the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: file paths written in the docs: a name with a known extension that contains a folder or is a markdown file
_PATH = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w.-]+\.(?:md|py|yaml|png|safetensors|txt|toml|json|csv))(?![\w/-])")
#: outputs a command writes (run directories), not files of the repository
_GENERATED = ("runs/",)
#: pages the documentation site generates at build time (tools/docs_hooks.py: benchmarks.md from BENCHMARKS.md)
_SITE_PAGES = {"benchmarks.md"}
#: wording that refers to documents outside the repository or to how the code was written
_FORBIDDEN = re.compile(r"ALGORITHMS\.md|house rule|the brief|brief's|\[mem\]|\[summary\]|recollection", re.IGNORECASE)
#: in code, the architecture notes are cited by their path in the repository
_BARE_ARCHITECTURE = re.compile(r"(?<!docs/)ARCHITECTURE\.md")


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert tuple(scope["x"].shape) == (8, 1, 28, 28)
    assert tuple(scope["per_example"].shape) == (8,)


def _referenced_paths(doc: Path) -> set[str]:
    found = set()
    prose = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # command lines name their own outputs
    for match in _PATH.finditer(prose):
        path = match.group(1)
        if ("/" in path or path.endswith(".md")) and not path.startswith(_GENERATED) and "://" not in path:
            found.add(path)
    return found


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_docs_refer_only_to_files_in_the_repository(doc):
    assert _referenced_paths(ROOT / "README.md") >= {"BENCHMARKS.md", "simdiff/configs/mnist.yaml"}
    missing = sorted(p for p in _referenced_paths(doc) if not (doc.parent / p).exists() and not (ROOT / p).exists()
                     and not (doc.is_relative_to(ROOT / "docs") and Path(p).name in _SITE_PAGES))
    assert not missing, f"{doc.name} refers to files that are not in the repository: {missing}"


def test_no_references_to_outside_notes():
    code = [p for d in ("simdiff", "tests", "benchmarks") for p in (ROOT / d).rglob("*")
            if p.suffix in (".py", ".yaml", ".md") and p.name != Path(__file__).name]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in [*DOCS, *code] for i, line in enumerate(p.read_text().splitlines(), 1)
            if _FORBIDDEN.search(line) or (p in code and _BARE_ARCHITECTURE.search(line))]
    assert not hits, f"references to notes outside the repository or to how the code was written: {hits}"


def test_architecture_worked_example_runs():
    """The worked example of docs/ARCHITECTURE.md (adding a process) trains one loss evaluation and samples."""
    from simdiff.processes import PROCESSES

    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "docs/ARCHITECTURE.md has no python example"
    scope: dict = {}
    try:
        exec(compile(blocks[0], "ARCHITECTURE.md", "exec"), scope)
    finally:
        PROCESSES.pop("frequency_shifted", None)
    assert scope["per_example"].shape == (16,) and bool(scope["per_example"].isfinite().all())
    assert scope["images"].shape == (16, 1, 28, 28) and bool(scope["images"].isfinite().all())
