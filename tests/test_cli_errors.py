"""Bad input through the CLI: every case exits 2 with exactly one line on stderr (no traceback), before any work
(no sampling, no training), leaving every file as it was and no temporary file behind.

One tiny 8x8-digits run and its export are made once per module; each case snapshots the whole scratch folder
(paths and contents) before and after the command.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import simdiff.demo
import simdiff.experiment
import simdiff.generate
import simdiff.runs
from simdiff.cli import main
from simdiff.train import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from tiny_configs import tiny_uvit  # noqa: E402

TINY = tiny_uvit("tiny", steps=2, checkpoint_every=2, log_every=1, sampler="ddim", sample_steps=2, sample_num=2)


def _rewrite_export(src: Path, out: Path, *, options: dict | None = None, nan: bool = False) -> None:
    """A copy of export ``src`` whose stored model.options are updated with ``options`` (weights unchanged: another
    architecture's weights for that config), or whose first floating weight holds a NaN."""
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    state = load_file(src)
    if options:
        config = json.loads(meta["config"])
        config["experiment"]["model"]["options"].update(options)
        meta["config"] = json.dumps(config)
    if nan:
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")
    save_file(state, str(out), metadata=meta)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Scratch folder: ``run/`` (a tiny trained run), ``model.safetensors`` (its export), weights of other
    architectures, and bad config files."""
    root = tmp_path_factory.mktemp("cli_errors")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(cfg), "--run-dir", str(root / "run")]) == 0
    assert main(["export", str(root / "run"), str(root / "model.safetensors")]) == 0
    _rewrite_export(root / "model.safetensors", root / "wider.safetensors", options={"dim": 48})
    _rewrite_export(root / "model.safetensors", root / "deeper.safetensors", options={"depth": 2})
    _rewrite_export(root / "model.safetensors", root / "nan.safetensors", nan=True)
    # a run whose checkpoint's config describes another architecture than its weights
    (root / "other_run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "run" / "checkpoints" / "step_000002", root / "other_run" / "checkpoints" / "step_000002")
    state_json = root / "other_run" / "checkpoints" / "step_000002" / "state.json"
    doc = json.loads(state_json.read_text())
    doc["config"]["experiment"]["model"]["options"]["dim"] = 48
    doc.pop("state_sha256", None)
    if hasattr(checkpoint, "_doc_digest"):  # re-seal the edited state.json as the trainer would have written it
        doc["state_sha256"] = checkpoint._doc_digest(doc)
    state_json.write_text(json.dumps(doc))
    (root / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "broken.yaml").write_text("name: [unclosed\n")
    (root / "a_folder").mkdir()
    (root / "a_file.txt").write_text("not a folder\n")
    return root


def _snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file and folder under ``folder`` (folders map to "dir")."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if anything is sampled or trained."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(simdiff.generate, "generate", refuse)
    monkeypatch.setattr(simdiff.runs, "generate", refuse)
    monkeypatch.setattr(simdiff.experiment, "train", refuse)
    monkeypatch.setattr(simdiff.demo, "run_demo", refuse)


def _check_fails(capsys, root: Path, argv: list[str], pattern: str, *, progress: bool = False) -> str:
    """``main(argv)`` exits 2 with one line on stderr holding ``pattern`` and changes nothing under ``root``
    (``progress``: the command got as far as sampling, whose progress bar lines are dropped first)."""
    capsys.readouterr()
    before = _snapshot(root)
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    if progress:
        err = "\n".join(line for line in err.splitlines() if not line.startswith("sampling (")).strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("simdiff: error: ") and "Traceback" not in err, err
    assert pattern in err, err
    assert _snapshot(root) == before  # nothing written, nothing left behind (temp files included)
    return err


# (case id, argv with {root} / {run} / {model} placeholders, pattern the one line must contain)
CASES = [
    # devices
    ("device-misspelled", ["sample", "{run}", "--device", "gpu"], "--device: unknown device 'gpu'"),
    ("device-eval", ["eval", "{run}", "--device", "tpu"], "--device"),
    # sampling flags, each named
    ("guidance-nan", ["sample", "{run}", "--guidance", "nan"], "--guidance"),
    ("guidance-inf", ["sample", "{run}", "--guidance", "inf"], "--guidance"),
    ("num-0", ["sample", "{run}", "--num", "0"], "--num"),
    ("batch-size-0", ["sample", "{run}", "--batch-size", "0"], "--batch-size"),
    ("steps-negative", ["sample", "{run}", "--steps", "-3"], "--steps"),
    ("seed-negative", ["sample", "{run}", "--seed", "-1"], "--seed"),
    ("rescale", ["sample", "{run}", "--rescale", "2"], "--rescale"),
    ("eta-nan", ["sample", "{run}", "--eta", "nan"], "--eta"),
    ("interval-reversed", ["sample", "{run}", "--interval", "2", "-1"], "--interval"),
    ("eval-num-0", ["eval", "{run}", "--num", "0"], "--num"),
    ("eval-batch-size-0", ["eval", "{run}", "--batch-size", "0"], "--batch-size"),
    ("steps-not-int", ["sample", "{run}", "--steps", "abc"], "--steps"),
    ("sampler-unknown", ["sample", "{run}", "--sampler", "bogus"], "--sampler"),
    ("labels-range", ["sample", "{run}", "--labels", "12", "--out", "{root}/g.png"], "out of range"),
    ("labels-syntax", ["sample", "{run}", "--labels", "a,b", "--out", "{root}/g.png"], "--labels"),
    # output paths, found before sampling
    ("out-under-file", ["sample", "{run}", "--out", "{root}/a_file.txt/g.png"], "a_file.txt is a file"),
    ("out-is-folder", ["sample", "{run}", "--out", "{root}/a_folder"], "is a folder"),
    ("out-extension", ["sample", "{run}", "--out", "{root}/g.bogus"], "extension"),
    ("out-dir-is-file", ["sample", "{run}", "--out-dir", "{root}/a_file.txt"], "--out-dir"),
    ("out-unwritable", ["sample", "{run}", "--out", "/proc/simdiff-grid.png"], "--out"),
    ("json-under-file", ["eval", "{run}", "--json", "{root}/a_file.txt/s.json"], "--json"),
    ("json-is-folder", ["eval", "{run}", "--json", "{root}/a_folder"], "--json"),
    # metrics, found before sampling
    ("metrics-unknown", ["eval", "{run}", "--metrics", "bogus"], "--metrics: unknown metric"),
    ("metrics-too-few", ["eval", "{run}", "--metrics", "precision_recall", "--num", "3"], "too few"),
    ("metrics-unfit", ["eval", "{run}", "--metrics", "mnist_fd", "--num", "8"], "fit only MNIST digits"),
    ("metrics-default-too-few", ["eval", "{run}", "--num", "2"], "too few"),
    # sources
    ("source-missing", ["sample", "{root}/nope"], "no such run directory"),
    ("source-not-safetensors", ["sample", "{root}/tiny.yaml"], "tiny.yaml"),
    ("source-folder-no-run", ["sample", "{root}/a_folder"], "no checkpoint"),
    ("weights-other-shape", ["sample", "{root}/wider.safetensors"], "wider.safetensors: weights do not match"),
    ("weights-missing-keys", ["sample", "{root}/deeper.safetensors"], "missing key"),
    ("weights-other-eval", ["eval", "{root}/wider.safetensors", "--num", "8"], "another shape"),
    ("weights-nan", ["sample", "{root}/nan.safetensors"], "NaN"),
    ("weights-other-run", ["sample", "{root}/other_run", "--num", "2"], "ema.safetensors: weights do not match"),
    # export
    ("export-into-folder", ["export", "{run}", "{root}/a_folder"], "a_folder"),
    ("export-under-file", ["export", "{run}", "{root}/a_file.txt/m.safetensors"], "m.safetensors"),
    ("export-unwritable", ["export", "{run}", "/proc/simdiff-model.safetensors"], "simdiff-model.safetensors"),
    ("export-of-export", ["export", "{model}", "{root}/again.safetensors"], "model.safetensors: a file"),
    ("export-missing", ["export", "{root}/nope", "{root}/again.safetensors"], "nope"),
    # configs and overrides (train of the existing run: validated before the run is touched)
    ("config-missing", ["train", "{root}/nope.yaml"], "config file not found"),
    ("config-folder", ["train", "{root}/a_folder"], "a_folder: is a directory"),
    ("config-not-utf8", ["train", "{root}/latin1.yaml"], "latin1.yaml: not a UTF-8"),
    ("config-list", ["train", "{root}/list.yaml"], "list.yaml: the top level must be a mapping"),
    ("config-bad-yaml", ["train", "{root}/broken.yaml"], "broken.yaml: not valid YAML"),
    ("set-no-equals", ["train", "{root}/tiny.yaml", "--run-dir", "{run}", "--set", "train.steps"], "key.path=value"),
    ("set-bad-yaml", ["train", "{root}/tiny.yaml", "--run-dir", "{run}", "--set", "train.steps=["], "not valid YAML"),
    ("set-empty-key", ["train", "{root}/tiny.yaml", "--run-dir", "{run}", "--set", "train..steps=3"], "empty key"),
    ("set-unknown-key", ["train", "{root}/tiny.yaml", "--run-dir", "{run}", "--set", "train.stepz=3"],
     "unknown config key 'train.stepz'"),
    ("set-not-section", ["train", "{root}/tiny.yaml", "--run-dir", "{run}", "--set", "name.x=3"], "not a section"),
    ("sample-sampler", ["train", "{root}/tiny.yaml", "--run-dir", "{run}", "--set", "sample.sampler=bogus"],
     "sample.sampler: unknown sampler 'bogus'"),
    ("sample-steps", ["train", "{root}/tiny.yaml", "--run-dir", "{root}/fresh", "--set", "sample.steps=0"],
     "sample.steps"),
    ("sample-guidance", ["train", "{root}/tiny.yaml", "--run-dir", "{root}/fresh", "--set", "sample.guidance=.nan"],
     "sample.guidance"),
    ("sample-grid", ["train", "{root}/tiny.yaml", "--run-dir", "{root}/fresh", "--set", "sample.grid=linear"],
     "sample.grid"),
    ("model-options-key", ["train", "{root}/tiny.yaml", "--run-dir", "{run}", "--set", "model.options.foo=1"],
     "'model.options.foo'"),
    ("model-options-type", ["train", "{root}/tiny.yaml", "--run-dir", "{run}", "--set", "model.options.dim=abc"],
     "model.options.dim"),
    ("model-arch", ["train", "{root}/tiny.yaml", "--run-dir", "{run}", "--set", "model.arch=vit"], "model.arch"),
    ("command-unknown", ["smaple", "{run}"], "invalid choice"),
    ("demo-minutes", ["demo", "--minutes", "-1", "--run-dir", "{root}/demo"], "--minutes"),
    ("demo-num-eval", ["demo", "--num-eval", "1", "--run-dir", "{root}/demo"], "--num-eval"),
    ("demo-num-fid", ["demo", "--num-fid", "1", "--run-dir", "{root}/demo"], "--num-fid"),
]


@pytest.mark.parametrize("argv, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2(root, capsys, no_work, argv, pattern):
    argv = [a.format(root=root, run=root / "run", model=root / "model.safetensors") for a in argv]
    err = _check_fails(capsys, root, argv, pattern)
    assert "uvit." not in err  # model options are named as in the config, not by the backbone's name


def test_cuda_without_cuda(root, capsys, no_work):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _check_fails(capsys, root, ["sample", str(root / "run"), "--device", "cuda"], "CUDA is not available")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user for a read-only dir")
def test_read_only_folder(root, capsys, no_work, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _check_fails(capsys, root, ["export", str(root / "run"), str(ro / "m.safetensors")], "m.safetensors")
        _check_fails(capsys, root, ["sample", str(root / "run"), "--out", str(ro / "g.png")], "--out")
        assert list(ro.iterdir()) == []  # no temporary file left in the read-only folder either
    finally:
        ro.chmod(0o755)


def _read_only(monkeypatch) -> None:
    """Make every rename and temporary-file creation fail as on a read-only file system (root ignores chmod)."""
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)


def test_read_only_output_found_before_sampling(root, capsys, no_work, monkeypatch):
    _read_only(monkeypatch)
    _check_fails(capsys, root, ["sample", str(root / "run"), "--out", str(root / "g.png")],
                 "Read-only file system")
    _check_fails(capsys, root, ["eval", str(root / "run"), "--json", str(root / "s.json")], "--json")


def test_failed_rename_leaves_no_temp_file(root, capsys, monkeypatch):
    """When the final rename fails (read-only or full disk), the export and the sample grid leave nothing behind."""
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    _check_fails(capsys, root, ["export", str(root / "run"), str(root / "m2.safetensors")], "m2.safetensors")
    _check_fails(capsys, root, ["sample", str(root / "run"), "--num", "2", "--steps", "1", "--device", "cpu",
                                "--out", str(root / "g.png")], "g.png: cannot write", progress=True)


def test_good_input_still_works(root, capsys):
    """The checks refuse only bad input: the run samples and the weights of its own architecture load."""
    out = root / "ok" / "grid.png"
    try:
        assert main(["sample", str(root / "run"), "--num", "2", "--steps", "1", "--device", "cpu",
                     "--out", str(out)]) == 0
        assert out.is_file()
        assert main(["sample", str(root / "model.safetensors"), "--info"]) == 0
        assert main(["sample", str(root / "run" / "checkpoints"), "--info"]) == 0  # the run's checkpoints folder
    finally:
        for p in (out, out.parent):
            if p.is_file():
                p.unlink()
            elif p.is_dir():
                p.rmdir()


def test_no_traceback_reaches_the_terminal(root):
    """Through a fresh interpreter: the one line is all that is printed on stderr, exit status 2."""
    runner = [sys.executable, "-c", "import sys; from simdiff.cli import main; sys.exit(main())"]
    commands = [
        ["sample", str(root / "run"), "--device", "gpu"],
        ["sample", str(root / "wider.safetensors")],
    ]
    before = _snapshot(root)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(runner + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for argv in commands]
    for argv, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith("simdiff: error: "), err
    assert _snapshot(root) == before


@pytest.mark.parametrize("field, value", [
    ("sampler", "bogus"), ("grid", "linear"), ("steps", 0), ("steps", 2.5), ("num", -1), ("batch_size", 0),
    ("seed", -1), ("seed", 2**40), ("guidance", float("nan")), ("guidance", float("-inf")), ("rescale", 1.5),
    ("eta", -0.1), ("interval", (1.0, -1.0)), ("interval", (float("nan"), 1.0)), ("interval", (1.0,)),
])
def test_sample_config_field_refused_by_name(field, value):
    """Every SampleConfig field is checked by :func:`check_sample_config`, and a stored or loaded config with the
    bad value is refused when it is read (``config_from_dict``), naming ``sample.<field>``."""
    import dataclasses

    from simdiff.configuration import ConfigError
    from simdiff.generate import SampleConfig, check_sample_config
    from simdiff.runs import config_from_dict

    check_sample_config(SampleConfig())  # the defaults are valid
    bad = dataclasses.replace(SampleConfig(), **{field: value})
    with pytest.raises(ConfigError, match=f"^sample.{field}"):
        check_sample_config(bad)
    with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')}"):
        check_sample_config(bad, names={field: f"--{field.replace('_', '-')}"})
    if not isinstance(value, float) or value == value:  # JSON-like dicts (NaN compares unequal; covered above)
        with pytest.raises(ConfigError, match=f"sample.{field}"):
            config_from_dict({**TINY, "sample": {**TINY["sample"], field: list(value) if isinstance(value, tuple)
                                                 else value}})


def test_config_file_with_byte_order_mark_loads(tmp_path):
    from simdiff.runs import load_config

    p = tmp_path / "bom.yaml"
    p.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump(TINY).encode())
    assert load_config(p).name == "tiny"
