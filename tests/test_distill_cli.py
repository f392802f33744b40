"""``simdiff distill`` end to end on the 8x8 digits: a tiny uvit teacher, every method for a few steps through the CLI,
``simdiff sample`` on the students (their recorded sampler and step count), and one-line errors on bad input."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import simdiff.experiment as experiment
import simdiff.runs as runs
from simdiff.cli import main
from simdiff.configuration import from_dict
from simdiff.distill.experiment import load_distill_config
from simdiff.nets.students import GuidanceConditioned

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from tiny_configs import tiny_uvit  # noqa: E402

TEACHER = tiny_uvit("tiny_teacher", steps=20, sample_num=4)
FAST = ["--set", "train.steps=3", "--set", "train.batch_size=8", "--set", "train.progress=false",
        "--set", "train.log_every=1", "--set", "train.ema_half_life_images=0", "--set", "sample.num=4",
        "--set", "train.optim.warmup_steps=0", "--set", "train.optim.lr=1e-3"]
#: method -> (student steps, extra flags, expected sampler name, network calls per sampling batch)
METHOD_CASES = {
    "progressive": (2, ["--set", "method_params.start_steps=8"], "ddim", 2),
    "guided": (2, [], "ddim", 2),
    "consistency": (2, ["--set", "method_params.teacher_steps=8"], "ddim", 2),
    "moment_matching": (2, [], "moment_matching", 2),
    "em": (1, ["--set", "method_params.langevin_steps=1"], "generator", 1),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distill")
    cfg = from_dict(experiment.ExperimentConfig, TEACHER)
    experiment.train(cfg, root / "teacher")
    return root


@pytest.fixture(scope="module")
def students(root) -> dict[str, Path]:
    out = {}
    for method, (steps, extra, _, _) in METHOD_CASES.items():
        run = root / method
        assert main(["distill", "--method", method, "--teacher", str(root / "teacher"), "--student-steps", str(steps),
                     "--run-dir", str(run), *FAST, *extra]) == 0
        out[method] = run
    return out


def _state(run: Path) -> dict:
    ckpts = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_000003"]
    return json.loads((ckpts[-1] / "state.json").read_text())


def _count_network_calls(monkeypatch) -> list:
    """Patch ``runs.load_model`` so every network it loads appends to the returned list on each forward."""
    counts: list = []
    real_load = runs.load_model

    def counting_load(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        loaded.model.register_forward_hook(lambda *_: counts.append(1))
        return loaded

    monkeypatch.setattr(runs, "load_model", counting_load)
    return counts


@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_each_method_distils_and_samples_with_its_spec(students, method, monkeypatch, capsys):
    steps, _, sampler, calls = METHOD_CASES[method]
    run = students[method]
    doc = _state(run)["config"]
    assert doc["kind"] == method and doc["image_shape"] == [1, 8, 8] and doc["num_classes"] == 10
    assert doc["sampler_spec"]["sampler"] == sampler and doc["sampler_spec"]["steps"] == steps
    assert doc["experiment"]["model"]["arch"] == "uvit"
    assert (run / "samples" / "final.png").is_file()
    aux = run / "checkpoints" / "step_000003" / "aux.safetensors"
    assert aux.is_file() == (method != "guided")  # loss-owned state travels in every checkpoint
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3 and all("nan" not in r.split(",")[1].lower() for r in rows[1:])

    counts = _count_network_calls(monkeypatch)
    out = run / "grid.png"
    capsys.readouterr()
    assert main(["sample", str(run), "--num", "4", "--out", str(out)]) == 0
    assert out.is_file()
    assert f"{sampler}, {steps} steps" in capsys.readouterr().out
    assert len(counts) == calls  # one sampling batch of 4 images: the student's step count in network calls


def test_loaded_student_exposes_spec_and_export_roundtrip(students, root):
    loaded = experiment.load_model(students["moment_matching"])
    assert loaded.meta["kind"] == "moment_matching" and loaded.meta["sampler_spec"]["steps"] == 2
    assert loaded.config.sample.sampler == "moment_matching"
    exported = root / "em.safetensors"
    assert main(["export", str(students["em"]), str(exported)]) == 0
    gen = experiment.load_model(exported)
    z = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(gen.model(z, labels=torch.tensor([0, 1, 2])),
                               experiment.load_model(students["em"]).model(z, labels=torch.tensor([0, 1, 2])))


def test_guided_student_starts_as_teacher_and_takes_w(root, students):
    teacher = experiment.load_model(root / "teacher").model
    student = GuidanceConditioned(copy.deepcopy(teacher))
    z, lam, labels = torch.randn(4, 1, 8, 8), torch.linspace(-3, 3, 4), torch.arange(4)
    ref = teacher(z, lam, labels=labels).x
    torch.testing.assert_close(student(z, lam, labels=labels, guidance=torch.full((4,), 3.0)).x, ref)
    trained = experiment.load_model(students["guided"]).model
    a = trained(z, lam, labels=labels, guidance=torch.zeros(4)).x
    b = trained(z, lam, labels=labels, guidance=torch.full((4,), 4.0)).x
    assert (a - b).abs().max() > 0  # the w-embedding was trained away from zero


@pytest.mark.parametrize("arch", ["uvit", "unet"])
def test_guided_student_passes_w_explicitly_as_the_former_hook_did(arch):
    """The w-embedding reaches the backbone as ``extra_emb`` (no forward hook): with a non-zero embedding the output
    equals the former construction (a hook adding ``w_embed(w)`` to ``backbone.cond.logsnr``'s output) to float
    rounding, and the state_dict keys are the former ones (``model.*`` + ``w_embed.*``), so old guided checkpoints
    load and give the same images."""
    from simdiff.nets import build_model

    opts = {"uvit": {"channels": [8], "dim": 16, "depth": 1, "num_heads": 2, "num_res_blocks": 1},
            "unet": {"channels": [8, 16], "num_res_blocks": 1, "attention_levels": [], "num_heads": 2}}[arch]
    torch.manual_seed(0)
    teacher = build_model(arch, "v", opts, image_channels=1, image_size=8, num_classes=3).double()
    for p in teacher.parameters():  # the zero-initialised output heads would hide any difference
        p.data.add_(0.05 * torch.randn_like(p))
    student = GuidanceConditioned(copy.deepcopy(teacher)).double()
    assert not student.model.backbone.cond.logsnr._forward_hooks
    assert set(student.state_dict()) == {f"model.{k}" for k in teacher.state_dict()} | {
        f"w_embed.{k}" for k in student.w_embed.state_dict()}
    z, lam, labels = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([-2.0, 0.5, 3.0]), torch.arange(3)
    w = torch.tensor([0.0, 1.5, 4.0])
    torch.testing.assert_close(student(z, lam, labels=labels, guidance=w).x, teacher(z, lam, labels=labels).x,
                               rtol=0, atol=0)  # zero-initialised: exactly the teacher
    torch.nn.init.normal_(student.w_embed.mlp[-1].weight, std=0.3)
    torch.nn.init.normal_(student.w_embed.mlp[-1].bias, std=0.3)
    reference = copy.deepcopy(teacher)
    w_embed = student.w_embed
    reference.backbone.cond.logsnr.register_forward_hook(lambda _m, _i, out: out + w_embed(w).to(out.dtype))
    got = student(z, lam, labels=labels, guidance=w).x
    want = reference(z, lam, labels=labels).x
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got - teacher(z, lam, labels=labels).x).abs().max() > 1e-3  # the embedding does reach the output


def test_progressive_rounds_recorded(root, tmp_path):
    cfg = load_distill_config(Path(__file__).parents[1] / "simdiff" / "configs" / "distill_progressive.yaml")
    assert cfg.method == "progressive" and cfg.student_steps == 4 and cfg.method_params["start_steps"] == 16
    run = tmp_path / "prog"
    assert main(["distill", "--method", "progressive", "--teacher", str(root / "teacher"), "--student-steps", "1",
                 "--run-dir", str(run), *FAST, "--set", "train.steps=4", "--set", "method_params.start_steps=4",
                 "--set", "method_params.steps_per_round=2"]) == 0
    doc = json.loads(sorted((run / "checkpoints").iterdir())[-1].joinpath("state.json").read_text())["config"]
    assert doc["sampler_spec"]["steps"] == 1 and doc["experiment"]["sample"]["steps"] == 1


def _one_line_error(capsys, argv, pattern):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert pattern in err, err


def test_bad_input_one_line(root, students, tmp_path, capsys):
    teacher = str(root / "teacher")
    base = ["distill", "--run-dir", str(tmp_path / "x"), *FAST]
    _one_line_error(capsys, [*base, "--method", "progressive", "--teacher", str(tmp_path / "nope")],
                    "no such run directory")
    bad = tmp_path / "random.safetensors"
    save_file({"w": torch.zeros(3)}, str(bad))
    _one_line_error(capsys, [*base, "--method", "progressive", "--teacher", str(bad)], "not a simdiff-inference-v1")
    _one_line_error(capsys, [*base, "--method", "consistency", "--teacher", str(students["progressive"])],
                    "distilled 'progressive' student")
    _one_line_error(capsys, [*base, "--method", "progressive", "--teacher", str(students["progressive"]),
                             "--student-steps", "1", "--set", "method_params.start_steps=8"], "start_steps must be 2")
    _one_line_error(capsys, [*base, "--method", "progressive", "--teacher", teacher, "--student-steps", "3",
                             "--set", "method_params.start_steps=8"], "progressive rounds must halve")
    _one_line_error(capsys, [*base, "--method", "consistency", "--teacher", teacher, "--student-steps", "0"], ">= 1")
    _one_line_error(capsys, [*base, "--method", "em", "--teacher", teacher, "--student-steps", "2"], "steps must be 1")
    _one_line_error(capsys, [*base, "--method", "distil", "--teacher", teacher], "valid: consistency, em, guided")
    _one_line_error(capsys, [*base, "--method", "consistency", "--teacher", teacher, "--set", "method_params.huberc=1"],
                    "unknown method_params ['huberc']")
    _one_line_error(capsys, [*base, "--method", "consistency"], "needs a teacher")
    _one_line_error(capsys, [*base, "--method", "consistency", "--teacher", teacher, "--set",
                             f"train.init_from={teacher}"], "train.init_from is not supported by distillation")
    cfg = tmp_path / "d.yaml"
    cfg.write_text(yaml.safe_dump({"method": "em", "stepz": 1}))
    _one_line_error(capsys, ["distill", str(cfg), "--teacher", teacher], "unknown config key 'stepz'")
    assert not (tmp_path / "x").exists()


def test_progressive_continues_from_a_progressive_student(root, students, tmp_path):
    """A progressive run can start from the last student of an earlier one: its rounds continue the halving."""
    run = tmp_path / "pd1"
    assert main(["distill", "--method", "progressive", "--teacher", str(students["progressive"]),
                 "--student-steps", "1", "--run-dir", str(run), *FAST]) == 0
    doc = _state(run)["config"]
    assert doc["teacher_kind"] == "progressive" and doc["sampler_spec"]["steps"] == 1
    assert doc["distill"]["method_params"]["start_steps"] == 2  # the earlier student's step count


def test_generate_student_samplers_match_the_loss_objects(root, students):
    """The registered student samplers (``simdiff.samplers.SAMPLERS``) are what the loss objects sample with."""
    from simdiff.distill.moment_matching import MomentMatching
    from simdiff.generate import SampleConfig, generate
    from simdiff.samplers import get_sampler, make_grid

    loaded = experiment.load_model(students["moment_matching"])
    mm = MomentMatching(loaded.model, loaded.model, loaded.schedule, steps=2)
    z, labels = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    ref = mm.sample(loaded.model, z, generator=torch.Generator().manual_seed(5), cond={"labels": labels})
    got = get_sampler("moment_matching")(
        loaded.model, z, make_grid(loaded.schedule, 2, kind="uniform_t"), generator=torch.Generator().manual_seed(5),
        cond={"labels": labels})
    torch.testing.assert_close(got, ref)
    guided = experiment.load_model(students["guided"])
    calls = []
    guided.model.register_forward_hook(lambda *_: calls.append(1))
    cfg = SampleConfig(sampler="guided_stochastic", steps=3, grid="uniform_t", num=2, guidance=1.5)
    x = generate(guided.model, guided.schedule, (1, 8, 8), cfg, labels=torch.tensor([0, 1]), num_classes=10)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all() and len(calls) == 3


def test_guided_stage_two_distils_the_w_conditioned_student(root, tmp_path, monkeypatch, capsys):
    """Meng et al. 2023 stage two: teacher -> guided (stage one, w in [0, 2.5]) -> guided_progressive (4 -> 2 steps)."""
    one, two = tmp_path / "stage1", tmp_path / "stage2"
    assert main(["distill", "--method", "guided", "--teacher", str(root / "teacher"), "--student-steps", "4",
                 "--run-dir", str(one), *FAST, "--set", "method_params.w_max=2.5"]) == 0
    assert main(["distill", "--method", "guided_progressive", "--teacher", str(one), "--student-steps", "2",
                 "--run-dir", str(two), *FAST]) == 0
    doc = _state(two)["config"]
    assert doc["kind"] == "guided_progressive" and doc["teacher_kind"] == "guided"
    assert doc["student"] == {"wrapper": "guidance"}
    assert doc["sampler_spec"]["sampler"] == "ddim" and doc["sampler_spec"]["steps"] == 2
    assert doc["distill"]["method_params"]["w_max"] == 2.5  # the stage-one guidance range is kept
    loaded = experiment.load_model(two)
    assert isinstance(loaded.model, GuidanceConditioned) and loaded.config.sample.steps == 2

    counts = _count_network_calls(monkeypatch)
    capsys.readouterr()
    assert main(["sample", str(two), "--num", "4", "--guidance", "1.5", "--out", str(tmp_path / "g.png")]) == 0
    assert "ddim, 2 steps" in capsys.readouterr().out
    assert len(counts) == 2  # w is an input: no second (unconditional) call per step


def test_guided_stage_two_needs_a_guided_teacher(root, students, tmp_path, capsys):
    base = ["distill", "--run-dir", str(tmp_path / "x"), *FAST, "--method", "guided_progressive",
            "--student-steps", "1"]
    _one_line_error(capsys, [*base, "--teacher", str(root / "teacher")], "this method needs one of: guided")
    _one_line_error(capsys, [*base, "--teacher", str(students["guided"]), "--set", "method_params.guidance_range=1"],
                    "unknown method_params ['guidance_range']")
    _one_line_error(capsys, ["distill", "--run-dir", str(tmp_path / "x"), *FAST, "--method", "progressive",
                             "--teacher", str(students["guided"])], "distilled 'guided' student")
    assert not (tmp_path / "x").exists()


#: method -> (student steps, flags, step of the simulated kill): progressive 8 -> 2 in two rounds of 3 trainer steps
#: (killed inside round two, whose teacher is the round-one student); consistency with an EMA target.
RESUME_CASES = {
    "progressive": (2, ["--set", "method_params.start_steps=8"], 4),
    "moment_matching": (2, [], 3),
    "em": (1, ["--set", "method_params.langevin_steps=1"], 3),
    "consistency": (2, ["--set", "method_params.teacher_steps=8", "--set", "method_params.target=ema"], 3),
}


@pytest.mark.parametrize("method", list(RESUME_CASES))
def test_resume_from_a_mid_run_checkpoint_is_exact(root, tmp_path, method):
    """Kill after step k (drop the later checkpoints), resume: the final student equals the uninterrupted one
    bit for bit, so the loss-owned state (aux networks + Adam, the round's teacher, the EMA target) came back."""
    from safetensors.torch import load_file

    steps, extra, kill = RESUME_CASES[method]
    flags = [*FAST, "--set", "train.steps=6", "--set", "train.checkpoint_every=1", "--set", "train.keep_last=10",
             *extra]
    runs = {}
    for name in ("straight", "resumed"):
        runs[name] = tmp_path / name
        assert main(["distill", "--method", method, "--teacher", str(root / "teacher"), "--student-steps", str(steps),
                     "--run-dir", str(runs[name]), *flags]) == 0
    ckdir = runs["resumed"] / "checkpoints"
    for later in sorted(ckdir.iterdir())[kill:]:
        shutil.rmtree(later)
    assert sorted(p.name for p in ckdir.iterdir())[-1] == f"step_{kill:06d}"
    assert main(["distill", "--method", method, "--teacher", str(root / "teacher"), "--student-steps", str(steps),
                 "--run-dir", str(runs["resumed"]), *flags]) == 0
    final = {k: load_file(str(r / "checkpoints" / "step_000006" / "model.safetensors")) for k, r in runs.items()}
    assert final["straight"].keys() == final["resumed"].keys()
    diff = max((final["straight"][k] - final["resumed"][k]).abs().max().item() for k in final["straight"])
    assert diff == 0.0, f"{method}: resumed student differs from the uninterrupted one by {diff:.3g}"
    aux = {k: load_file(str(r / "checkpoints" / "step_000006" / "aux.safetensors")) for k, r in runs.items()}
    assert aux["straight"].keys() == aux["resumed"].keys() and aux["straight"]
    assert all(torch.equal(aux["straight"][k], aux["resumed"][k]) for k in aux["straight"])


def test_sample_refuses_what_a_student_was_not_distilled_for(students, capsys):
    """``simdiff sample`` on a student: another sampler, step count or grid is one line naming what it supports."""
    em, mm, prog = str(students["em"]), str(students["moment_matching"]), str(students["progressive"])
    _one_line_error(capsys, ["sample", em, "--sampler", "ddim"], "--sampler generator --steps 1")
    _one_line_error(capsys, ["sample", em, "--steps", "4"], "got --steps 4")
    _one_line_error(capsys, ["sample", mm, "--sampler", "dpmpp_2m"],
                    "distilled for --sampler moment_matching --steps 2 --grid uniform_t")
    _one_line_error(capsys, ["sample", mm, "--steps", "3"], "got --steps 3")
    _one_line_error(capsys, ["sample", prog, "--grid", "edm"], "got --grid edm")
    _one_line_error(capsys, ["eval", mm, "--steps", "4"], "got --steps 4")
    _one_line_error(capsys, ["sample", str(students["guided"]), "--sampler", "generator"], "runs em students only")


def test_student_sampling_check_accepts_what_it_supports(students, tmp_path, capsys):
    """The recorded sampler and steps, spelled out, pass; a guided stage-one student (w as an input) takes any
    denoiser sampler and step count."""
    assert main(["sample", str(students["moment_matching"]), "--sampler", "moment_matching", "--steps", "2",
                 "--num", "2", "--out", str(tmp_path / "a.png")]) == 0
    assert main(["sample", str(students["guided"]), "--sampler", "dpmpp_2m", "--steps", "3", "--num", "2",
                 "--guidance", "1.0", "--out", str(tmp_path / "b.png")]) == 0
    assert "dpmpp_2m, 3 steps" in capsys.readouterr().out


def test_old_steps_spelling_is_refused_with_a_hint(root, tmp_path, capsys):
    teacher = str(root / "teacher")
    base = ["distill", "--method", "consistency", "--teacher", teacher, "--run-dir", str(tmp_path / "x"), *FAST]
    _one_line_error(capsys, [*base, "--steps", "2"], "--student-steps")
    _one_line_error(capsys, [*base, "--set", "steps=2"], "'student_steps'")
    cfg = tmp_path / "old.yaml"
    cfg.write_text(yaml.safe_dump({"method": "consistency", "steps": 2}))
    _one_line_error(capsys, ["distill", str(cfg), "--teacher", teacher], "now 'student_steps'")
    assert not (tmp_path / "x").exists()


def test_distill_owns_its_run_directory(root, tmp_path, capsys):
    """A second process on a locked run directory stops at once naming the holder; a resume by another method (another
    kind of student) is refused before distill.yaml is rewritten."""
    import subprocess
    import time

    run = tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from simdiff.train import run_lock\n"
        f"with run_lock({str(run)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        code = main(["distill", "--method", "progressive", "--teacher", str(root / "teacher"), "--student-steps", "2",
                     "--run-dir", str(run), *FAST, "--set", "method_params.start_steps=8"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and str(holder.pid) in err and err.count("\n") == 0, err
        assert time.perf_counter() - start < 30 and not (run / "distill.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    run = tmp_path / "resumed"
    base = ["distill", "--method", "consistency", "--teacher", str(root / "teacher"), "--student-steps", "2",
            "--run-dir", str(run), *FAST, "--set", "method_params.teacher_steps=8"]
    assert main(base) == 0
    before = (run / "distill.yaml").read_bytes()
    capsys.readouterr()
    other = ["distill", "--method", "moment_matching", "--teacher", str(root / "teacher"), "--student-steps", "2",
             "--run-dir", str(run), *FAST, "--set", "train.steps=6"]
    assert main(other) == 2
    err = capsys.readouterr().err.strip()
    assert "another network" in err and "kind" in err and err.count("\n") == 0, err
    assert (run / "distill.yaml").read_bytes() == before
