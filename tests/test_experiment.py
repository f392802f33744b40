"""End to end through the CLI on the 8x8 digits: train, resume, sample, export, bad input gives one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from simdiff.cli import main
from simdiff.experiment import load_config, load_model
from simdiff.processes import PROCESSES, DCTBasis, GaussianProcess

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from tiny_configs import tiny_uvit  # noqa: E402

TINY = tiny_uvit("tiny", steps=6, checkpoint_every=3, log_every=1, sampler="dpmpp_2m", sample_steps=4, sample_num=10)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("exp")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(cfg), "--run-dir", str(root / "run")]) == 0
    return root


def test_train_writes_run_artifacts(run):
    d = run / "run"
    for name in ("config.yaml", "metrics.csv", "loss_curve.png", "samples/final.png"):
        assert (d / name).is_file(), name
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["step_000003", "step_000006"]
    rows = (d / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 6
    assert load_model(d).meta["conditioner"] == {"name": "class_labels", "version": 1, "num_classes": 10}


def test_resume_extends_the_run(run, tmp_path):
    cfg = run / "tiny.yaml"
    assert main(["train", str(cfg), "--run-dir", str(run / "run"), "--set", "train.steps=8"]) == 0
    rows = (run / "run" / "metrics.csv").read_text().strip().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, 9))


def test_sample_export_and_reload(run, capsys):
    out = run / "grid.png"
    assert main(["sample", str(run / "run"), "--steps", "3", "--num", "6", "--labels", "1,2", "--out", str(out)]) == 0
    assert out.is_file()
    exported = run / "model.safetensors"
    assert main(["export", str(run / "run"), str(exported)]) == 0
    a, b = load_model(run / "run"), load_model(exported)
    z = torch.randn(2, 1, 8, 8)
    lam = torch.zeros(2)
    torch.testing.assert_close(a.model(z, lam).x, b.model(z, lam).x)
    assert b.num_classes == 10 and b.image_shape == (1, 8, 8)
    half = run / "model16.safetensors"
    assert main(["export", str(run / "run"), str(half), "--dtype", "float16"]) == 0
    assert half.stat().st_size < 0.6 * exported.stat().st_size
    torch.testing.assert_close(load_model(half).model(z, lam).x, b.model(z, lam).x, rtol=0, atol=2e-2)
    assert main(["sample", str(exported), "--info"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["arch"] == "uvit"
    # sampling defaults replaced at export time: what `simdiff sample FILE` does without flags
    tuned = run / "model_w2.safetensors"
    assert main(["export", str(run / "run"), str(tuned), "--set", "sample.grid=calibrated",
                 "--set", "sample.guidance=2"]) == 0
    s = load_model(tuned).config.sample
    assert (s.grid, s.guidance) == ("calibrated", 2.0) and s.steps == load_model(exported).config.sample.steps
    torch.testing.assert_close(load_model(tuned).model(z, lam).x, b.model(z, lam).x)
    capsys.readouterr()
    _one_line_error(capsys, ["export", str(run / "run"), str(tuned), "--set", "sample.grid=zigzag"],
                    "sample.grid unknown grid 'zigzag'")
    _one_line_error(capsys, ["export", str(run / "run"), str(tuned), "--set", "train.steps=3"],
                    "export takes sampling defaults only")


def _one_line_error(capsys, argv, pattern):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert pattern in err, err


def test_bad_input_one_line(run, tmp_path, capsys):
    cfg = run / "tiny.yaml"
    _one_line_error(capsys, ["train", str(cfg), "--set", "train.stepz=3"], "unknown config key 'train.stepz'")
    _one_line_error(capsys, ["train", str(cfg), "--set", "model.arch=vit"], "unknown backbone 'vit'")
    _one_line_error(capsys, ["sample", str(tmp_path / "nope")], "no such run directory")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    _one_line_error(capsys, ["sample", str(bad)], "not a valid safetensors file")
    _one_line_error(capsys, ["sample", str(run / "run"), "--labels", "12"], "out of range")
    # a corrupt checkpoint in a copy of the run: loading falls back or names the file
    broken = tmp_path / "broken"
    (broken / "checkpoints" / "step_000001").mkdir(parents=True)
    (broken / "checkpoints" / "step_000001" / "state.json").write_text("{not json")
    _one_line_error(capsys, ["sample", str(broken)], "state.json")


def test_corrupt_image_folder_one_line(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG garbage")
    cfg = tmp_path / "folder.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "data": {"name": "folder", "root": str(tmp_path / "imgs"),
                                                    "image_size": 8}}))
    _one_line_error(capsys, ["train", str(cfg), "--run-dir", str(tmp_path / "r")], "broken.png")


def test_shipped_configs_validate():
    root = Path(__file__).parents[1] / "simdiff" / "configs"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert "mnist.yaml" in names and "demo.yaml" in names
    from simdiff.cascade.cascade import is_cascade_source
    from simdiff.cascade.cli import is_sr_config
    from simdiff.cascade.train import load_sr_config

    for p in root.glob("*.yaml"):
        if p.name.startswith("distill") or is_cascade_source(p):
            continue
        cfg = load_sr_config(p)[0] if is_sr_config(p) else load_config(p)
        assert cfg.train.steps > 0


def test_unconditional_training_on_labelled_data(tmp_path, capsys):
    """``model.class_conditional: false`` from the CLI: the digits' labels are dropped, the network has only the null
    class row, no label dropout, sample grids and ``--labels`` know the model is unconditional."""
    cfg = tmp_path / "uncond.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "steps": 2, "checkpoint_every": 0}}))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run), "--set", "model.class_conditional=false"]) == 0
    loaded = load_model(run)
    assert loaded.num_classes == 0 and loaded.meta["num_classes"] == 0
    assert loaded.meta["conditioner"] == {"name": "none", "version": 1}  # the conditioner's identity is recorded
    assert loaded.model.backbone.cond.label.num_embeddings == 1  # the null row only: no class embedding
    assert loaded.config.model.class_conditional is False and loaded.config.diffusion.cond_drop_prob == 0.0
    assert (run / "samples" / "final.png").is_file()
    capsys.readouterr()
    assert main(["sample", str(run), "--info"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["class_conditional"] is False
    _one_line_error(capsys, ["sample", str(run), "--labels", "1"], "unconditional")
    conditional = load_config(cfg)
    assert conditional.model.class_conditional is True  # the default: old configs and checkpoints unchanged
    _one_line_error(capsys, ["train", str(cfg), "--set", "model.class_conditional=maybe"], "class_conditional")


def test_eval_picks_metrics_from_the_data(run, monkeypatch, capsys):
    """``simdiff eval`` without ``--metrics`` on 8x8 digits scores with Inception metrics (not the MNIST classifier);
    an explicitly requested MNIST-classifier metric is refused with one line before any sampling."""
    import simdiff.eval

    asked = []

    def fake_scores(x, ref, *, metrics, **_):  # the scoring itself is tested in test_eval.py
        asked.append(tuple(metrics))
        return {m: 0.0 for m in metrics}

    monkeypatch.setattr(simdiff.eval, "evaluate_samples", fake_scores)
    capsys.readouterr()
    assert main(["eval", str(run / "run"), "--num", "4", "--steps", "2"]) == 0
    assert asked == [("fid", "kid", "precision_recall")]
    assert {"fid", "kid", "precision_recall"} <= set(json.loads(capsys.readouterr().out))
    _one_line_error(capsys, ["eval", str(run / "run"), "--num", "4", "--metrics", "mnist_fd,fid"],
                    "fit only MNIST digits")
    assert len(asked) == 1


class _Tilted(GaussianProcess):
    """A non-isotropic test process in the DCT basis: per-frequency level ``lam + tilt * b_k``."""

    name = "tilted_test"

    def __init__(self, schedule, *, tilt=1.0):
        super().__init__(schedule, basis=DCTBasis())
        self.b = tilt * torch.linspace(-1.0, 1.0, 64, dtype=torch.float64).reshape(1, 8, 8)
        self.coef_shape = (1, 8, 8)

    def log_alpha_sigma(self, lam):
        lev = lam.reshape(lam.shape + (1, 1, 1)) + self.b.to(device=lam.device, dtype=lam.dtype)
        return 0.5 * F.logsigmoid(lev), 0.5 * F.logsigmoid(-lev)


def test_a_registered_process_runs_end_to_end(tmp_path, capsys, monkeypatch):
    """``diffusion.process`` reaches the loss, the model's view conversion, the sample grids and a reloaded run; a
    sampler without a per-coordinate form and distillation refuse it with one line."""
    monkeypatch.setitem(PROCESSES, "tilted_test", _Tilted)
    cfg = tmp_path / "tilted.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "diffusion": {**TINY["diffusion"], "process": {"name": "tilted_test",
                                                                                          "tilt": 2.0}},
                                   "train": {**TINY["train"], "steps": 2, "checkpoint_every": 0}}))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 0
    loaded = load_model(run)
    assert isinstance(loaded.process, _Tilted) and loaded.process.to_dict() == {"name": "tilted_test", "tilt": 2.0}
    assert loaded.model.process is loaded.process
    z = torch.randn(2, 1, 8, 8)
    lam = torch.tensor([-1.0, 2.0])
    out = loaded.model(z, lam, labels=torch.tensor([1, 2]))
    pred = loaded.model.predict(z, lam, labels=torch.tensor([1, 2]))
    ref = loaded.process.to_output("v", pred, z=z, lam=lam)
    torch.testing.assert_close(out.x, ref.x)  # the views come from the process, not the isotropic formulas
    iso = load_model(run).model
    iso.process = None
    assert (iso(z, lam, labels=torch.tensor([1, 2])).x - out.x).abs().max() > 1e-3
    grid = tmp_path / "grid.png"
    assert main(["sample", str(run), "--sampler", "ddim", "--steps", "3", "--num", "4", "--out", str(grid)]) == 0
    assert grid.is_file()
    capsys.readouterr()
    _one_line_error(capsys, ["sample", str(run), "--sampler", "heun", "--steps", "3", "--num", "2",
                             "--out", str(grid)], "heun")
    _one_line_error(capsys, ["distill", "--method", "progressive", "--teacher", str(run), "--run-dir",
                             str(tmp_path / "d"), "--student-steps", "2"], "isotropic")


def test_init_from_starts_a_fresh_run_from_given_weights(run, tmp_path, capsys):
    """``train.init_from``: the new run's EMA starts from the source's weights (an lr of 1e-12 keeps them), a run
    without it does not (another seed draws other initial weights), a resume ignores it, and a source of another
    shape is refused in one line."""
    cfg = run / "tiny.yaml"
    src = load_model(run / "run").model.state_dict()

    def trained(name: str, *extra: str) -> float:  # the largest weight difference to the source
        argv = ["train", str(cfg), "--run-dir", str(tmp_path / name), "--set", "train.steps=1", "--set",
                "train.optim.lr=1e-12", "--set", "train.sample_every=0", "--set", "train.seed=1", *extra]
        assert main(argv) == 0
        got = load_model(tmp_path / name).model.state_dict()
        return max(float((got[k] - v).abs().max()) for k, v in src.items())

    assert trained("init", "--set", f"train.init_from={run / 'run'}") < 1e-6
    assert trained("fresh") > 1e-2
    # the run now holds a checkpoint: resuming it ignores init_from, even one that no longer exists
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "init"), "--set", "train.steps=2", "--set",
                 "train.sample_every=0", "--set", f"train.init_from={tmp_path / 'gone'}"]) == 0
    capsys.readouterr()
    _one_line_error(capsys, ["train", str(cfg), "--run-dir", str(tmp_path / "wide"), "--set", "model.options.dim=48",
                             "--set", f"train.init_from={run / 'run'}"], "is another network than this config builds")
    _one_line_error(capsys, ["train", str(cfg), "--run-dir", str(tmp_path / "none"), "--set",
                             f"train.init_from={tmp_path / 'gone'}"], "train.init_from: ")


def test_runs_and_exports_carry_their_data_moments(run, tmp_path, capsys):
    """Training writes the data's Gaussian moments into the run; an export embeds them; loading attaches them to
    the network (what ``generate`` reads for the Gaussian start); moments that do not fit the model are one line."""
    import shutil

    from simdiff.samplers.gaussian import MOMENTS_FILE, DataMoments

    d = run / "run"
    assert (d / MOMENTS_FILE).is_file()
    m = load_model(d).model.data_moments
    assert m.shape == (1, 8, 8) and m.num_classes == 10 and m.mean.shape == (11, 64)
    exported = tmp_path / "m.safetensors"
    assert main(["export", str(d), str(exported)]) == 0
    e = load_model(exported).model.data_moments
    torch.testing.assert_close(e.basis, m.basis.float().double())
    assert main(["sample", str(exported), "--steps", "3", "--num", "4", "--grid", "calibrated", "--out",
                 str(tmp_path / "g.png")]) == 0
    # the command line's cached calibrated grid starts after the Gaussian start too (and not without it)
    assert main(["sample", str(exported), "--steps", "3", "--num", "4", "--grid", "calibrated", "--no-gaussian-start",
                 "--out", str(tmp_path / "g0.png")]) == 0
    assert (tmp_path / "g.png").read_bytes() != (tmp_path / "g0.png").read_bytes()
    from simdiff.generate import SampleConfig
    from simdiff.samplers.calibrate import calibrated_grid_for

    loaded = load_model(exported)
    lo = float(loaded.schedule.logsnr_min)
    assert float(calibrated_grid_for(exported, loaded, 3, gaussian_start=True)[0]) > lo + 1
    assert float(calibrated_grid_for(exported, loaded, 3)[0]) == lo
    assert SampleConfig().gaussian_start
    bad = tmp_path / "bad_run"
    shutil.copytree(d, bad)
    DataMoments.from_images(torch.randn(20, 1, 4, 4)).save(bad / MOMENTS_FILE)
    capsys.readouterr()
    _one_line_error(capsys, ["sample", str(bad), "--steps", "3", "--num", "4", "--out", str(tmp_path / "b.png")],
                    "data moments for shape")
