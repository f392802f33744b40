"""Packaging: ``python -m build`` makes a wheel and an sdist; the wheel installs into a fresh venv, carries the shipped
weights and configs, and its ``simdiff sample pretrained`` writes a grid from the installed copy.

The fresh venv gets the wheel with ``--no-deps``; its dependencies (torch, numpy, ...) come from this project's venv
through a ``.pth`` line, so the test runs offline and installs nothing else. The import is checked to resolve to the
installed copy, not to the source tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import simdiff

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("build", reason="the 'build' package is part of the [dev] extra (make setup installs it)")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """Build from a private copy of the source tree (the files git tracks or would track): setuptools writes its
    staging folders into the tree it builds, so parallel test workers must not share one."""
    src = tmp_path_factory.mktemp("src")
    listed = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT)
    assert listed.returncode == 0, listed.stderr
    for rel in filter(None, listed.stdout.split("\0")):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path_factory.mktemp("dist")
    proc = _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_build_makes_wheel_and_sdist_with_weights(dist: Path) -> None:
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    assert wheels[0].name.startswith(f"simdiff-{simdiff.__version__}-")  # the version has one home
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "simdiff/pretrained/mnist_uvit.safetensors" in names
    assert "simdiff/configs/mnist.yaml" in names and "simdiff/serve/static/index.html" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_wheel_installs_and_samples_in_fresh_venv(dist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    py = venv / "bin" / "python"
    wheel = next(dist.glob("*.whl"))
    proc = _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "zz_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co., appended last
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = _run([str(py), "-c", "import simdiff; print(simdiff.__file__, simdiff.__version__)"], cwd=tmp_path, env=env)
    assert where.returncode == 0, where.stderr[-2000:]
    path, version = where.stdout.split()
    assert Path(path).is_relative_to(venv) and version == simdiff.__version__
    out = tmp_path / "grid.png"
    proc = _run([str(venv / "bin" / "simdiff"), "sample", "pretrained", "--num", "4", "--steps", "4", "--device", "cpu",
                 "--out", str(out)], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.stat().st_size > 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
