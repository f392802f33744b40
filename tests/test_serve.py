"""``simdiff serve`` through Starlette's TestClient: the model list, a sample request returning a PNG grid of the
expected size, progress, distilled students' fixed samplers, bad parameters (400 naming the parameter), unknown
models (404), refusing paths, a full queue (429) while sampling runs in its worker thread, and the CLI's errors.

The models are tiny random-weight U-ViTs on 8x8 images (built in milliseconds, exported to ``.safetensors`` where a
file is needed): what is tested is the server, not the samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("starlette", reason="simdiff serve needs the [serve] extra (starlette, uvicorn, httpx)")
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx")
from safetensors.torch import save_file  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from simdiff.configuration import ConfigError, to_dict  # noqa: E402
from simdiff.runs import LoadedModel, build_network, config_from_dict  # noqa: E402
from simdiff.schedules import schedule_from_dict  # noqa: E402
from simdiff.serve import Limits, add_serve_parser, build_entries, cmd_serve, create_app, listen_socket, make_entry  # noqa: E402,E501
from simdiff.train.checkpoint import INFERENCE_FORMAT, CheckpointError  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from tiny_configs import tiny_uvit  # noqa: E402

STUDENT_SPEC = {"sampler": "ddim", "steps": 2, "grid": "uniform_t"}


def tiny_loaded(*, conditional: bool = True, kind: str = "diffusion", spec: dict | None = None,
                seed: int = 0) -> LoadedModel:
    """A random-weight class-conditional (or unconditional) U-ViT on 1x8x8 images, as :func:`load_model` returns."""
    d = tiny_uvit("tiny", steps=1, sample_steps=3)
    d["model"]["class_conditional"] = conditional
    cfg = config_from_dict(d)
    torch.manual_seed(seed)
    net = build_network(cfg, image_shape=(1, 8, 8), num_classes=10).eval().requires_grad_(False)
    meta = {"kind": kind, **({"sampler_spec": spec} if spec else {})}
    return LoadedModel(net, cfg, schedule_from_dict(cfg.diffusion.schedule), (1, 8, 8), 10 if conditional else 0,
                       meta, None)


def tiny_export(path: Path, *, kind: str = "diffusion", spec: dict | None = None) -> Path:
    """Write :func:`tiny_loaded`'s network as an exported ``.safetensors`` file (a distilled student if ``kind``)."""
    lm = tiny_loaded()
    config = {"experiment": to_dict(lm.config), "image_shape": [1, 8, 8], "num_classes": 10, "kind": kind}
    if spec:
        config.update(sampler_spec=spec, student={"wrapper": "none"})
    state = {k: v.contiguous() for k, v in lm.model.state_dict().items()}
    save_file(state, str(path), metadata={"format": INFERENCE_FORMAT, "config": json.dumps(config)})
    return path


class Gate(torch.nn.Module):
    """A denoiser that waits at its first call until ``release`` is set (``entered`` tells it got there), or raises
    ``fail`` there."""

    def __init__(self, net: torch.nn.Module, fail: Exception | None = None):
        super().__init__()
        self.net, self.fail = net, fail
        self.entered, self.release = threading.Event(), threading.Event()

    def forward(self, *args, **kwargs):
        self.entered.set()
        if self.fail is not None:
            raise self.fail
        assert self.release.wait(60), "the test never released the gate"
        return self.net(*args, **kwargs)


def wait_job(client: TestClient, job_id: str, until=("done", "error"), timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        doc = client.get(f"/api/jobs/{job_id}").json()
        if doc["status"] in until:
            return doc
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} not {until} after {timeout} s: {doc}")


def png(content: bytes) -> Image.Image:
    assert content[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(content))
    img.load()
    return img


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    return {"tiny": tiny_export(root / "tiny.safetensors"),
            "student": tiny_export(root / "student.safetensors", kind="progressive", spec=STUDENT_SPEC),
            "other": tiny_export(root / "not_served.safetensors")}


@pytest.fixture(scope="module")
def client(files):
    entries = build_entries([str(files["tiny"]), str(files["student"])], pretrained=False)
    entries.append(make_entry(tiny_loaded(conditional=False), id="uncond"))
    with TestClient(create_app(entries, limits=Limits(max_images=16, max_steps=50))) as c:
        yield c


def sample(client: TestClient, **body) -> dict:
    r = client.post("/api/sample", json=body)
    assert r.status_code == 202, r.text
    return wait_job(client, r.json()["id"])


def test_page_and_model_list(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="model"' in r.text and 'id="sample"' in r.text and r.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'self'" in r.headers["content-security-policy"]
    js = client.get("/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"] and "/api/sample" in js.text
    doc = client.get("/api/models").json()
    models = {m["id"]: m for m in doc["models"]}
    assert list(models) == ["tiny", "student", "uncond"]
    assert models["tiny"]["class_conditional"] and models["tiny"]["num_classes"] == 10
    assert models["tiny"]["image_shape"] == [1, 8, 8] and models["tiny"]["locked"] is None
    assert models["tiny"]["defaults"]["steps"] == 3 and models["tiny"]["defaults"]["num"] == 10
    assert models["student"]["kind"] == "progressive" and models["student"]["locked"] == STUDENT_SPEC
    assert models["student"]["defaults"]["steps"] == 2 and "distilled" in models["student"]["name"]
    assert not models["uncond"]["class_conditional"]
    assert "ddim" in doc["samplers"] and "uniform_logsnr" in doc["grids"]
    assert doc["limits"]["max_images"] == 16


def test_sample_returns_png_grid_of_the_expected_size(client):
    doc = sample(client, model="tiny", sampler="ddim", steps=3, num=6, labels="1,2,3", seed=5)
    assert doc["status"] == "done", doc
    assert doc["done"] == doc["total"] == 3  # ddim: one network call per step, one batch
    assert doc["params"]["labels"] == [1, 2, 3, 1, 2, 3]
    img = png(client.get(doc["image"]).content)
    # 3 columns (one per requested label) x 2 rows of 8x8 cells, 2-pixel borders, each pixel drawn 64 // 8 = 8 times
    assert img.size == (doc["width"], doc["height"]) == ((3 * 10 + 2) * 8, (2 * 10 + 2) * 8)
    assert img.mode == "L"
    same = sample(client, model="tiny", sampler="ddim", steps=3, num=6, labels=[1, 2, 3], seed=5)
    other = sample(client, model="tiny", sampler="ddim", steps=3, num=6, labels="1,2,3", seed=6)
    assert client.get(same["image"]).content == client.get(doc["image"]).content  # the seed decides the noise
    assert client.get(other["image"]).content != client.get(doc["image"]).content


def test_guidance_heun_and_unconditional(client):
    doc = sample(client, model="tiny", sampler="heun", steps=3, num=2, guidance="1.5", interval=["-2", "4"])
    assert doc["status"] == "done" and doc["total"] == 5  # Heun: 2 steps - 1 calls
    assert doc["params"]["guidance"] == 1.5 and doc["params"]["interval"] == [-2.0, 4.0]
    assert png(client.get(doc["image"]).content).size == ((2 * 10 + 2) * 8, (1 * 10 + 2) * 8)
    doc = sample(client, model="uncond", steps=2, num=4)
    assert doc["status"] == "done" and doc["params"]["labels"] is None


def test_student_samples_only_with_its_sampler(client):
    doc = sample(client, model="student", num=2)  # blank settings: the recorded ddim, 2 steps, uniform_t
    assert doc["status"] == "done" and (doc["params"]["sampler"], doc["params"]["steps"]) == ("ddim", 2)
    for body, param in (({"steps": 4}, "steps"), ({"sampler": "euler"}, "sampler"), ({"grid": "edm"}, "grid")):
        r = client.post("/api/sample", json={"model": "student", **body})
        assert r.status_code == 400 and r.json()["param"] == param, r.text
        assert "distilled for sampler ddim, 2 steps, grid uniform_t" in r.json()["error"]


BAD = [
    ({"steps": 0}, "steps", "steps must be an integer >= 1, got 0"),
    ({"steps": "abc"}, "steps", "steps must be an integer"),
    ({"steps": 51}, "steps", "at most 50"),
    ({"sampler": "nope"}, "sampler", "unknown sampler 'nope'"),
    ({"sampler": "generator"}, "sampler", "generator"),
    ({"grid": "zigzag"}, "grid", "unknown grid"),
    ({"guidance": "nan"}, "guidance", "must be a finite number"),
    ({"guidance": "inf"}, "guidance", "must be a finite number"),
    ({"guidance": "strong"}, "guidance", "must be a number"),
    ({"labels": "3,10"}, "labels", "10 is out of range; this model has classes 0..9"),
    ({"labels": "a,b"}, "labels", "labels must be an integer"),
    ({"num": 17}, "num", "at most 16 images"),
    ({"num": 0}, "num", "num must be an integer >= 1"),
    ({"seed": -1}, "seed", "seed must be an integer in [0, 2**32)"),
    ({"interval": [2, 1]}, "interval", "LO <= HI"),
    ({"interval": ["1", ""]}, "interval", "needs both LO and HI"),
    ({"model": "uncond", "labels": "1"}, "labels", "unconditional"),
    ({"model": "uncond", "guidance": 2}, "guidance", "class-conditional"),
    ({"path": "/etc/passwd"}, "path", "never by path"),
    ({"run_dir": "/tmp"}, "run_dir", "unknown parameter 'run_dir'"),
]


@pytest.mark.parametrize("body,param,message", BAD, ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(BAD)])
def test_bad_parameter_answers_400_naming_it(client, body, param, message):
    r = client.post("/api/sample", json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    doc = r.json()
    assert doc["param"] == param and message in doc["error"] and param in doc["error"]
    assert "\n" not in doc["error"]


def test_bad_bodies(client):
    r = client.post("/api/sample", content=b'{"model": "tiny", "guidance": NaN}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["param"] == "guidance"
    r = client.post("/api/sample", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.post("/api/sample", json=["tiny"])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]
    r = client.post("/api/sample", json={"model": "tiny", "labels": "1," * 20_000})
    assert r.status_code == 413
    assert client.get("/api/sample").status_code == 405


def test_unknown_models_and_paths_are_refused(client, files):
    for model in ("nope", "../../etc/passwd", str(files["other"]), str(files["tiny"]), "pretrained", 3):
        r = client.post("/api/sample", json={"model": model})
        assert r.status_code == 404 and r.json()["param"] == "model", (model, r.text)
        assert "this server samples only student, tiny, uncond" in r.json()["error"]
    assert client.post("/api/sample", json={}).status_code == 400
    for url in ("/static/../pyproject.toml", "/pyproject.toml", "/app.js/../../pyproject.toml", "/index.html",
                "/api/jobs/nope", "/api/jobs/nope/image.png", "/api/jobs/../../README.md"):
        assert client.get(url).status_code == 404, url
    with pytest.raises(CheckpointError, match="no such run directory"):
        build_entries([str(files["tiny"].parent / "missing.safetensors")], pretrained=False)


def test_queue_full_answers_429_while_the_event_loop_keeps_serving(files):
    gate = Gate(tiny_loaded().model)
    blocked = dataclasses.replace(tiny_loaded(), model=gate)
    entries = [make_entry(blocked, id="gated"), make_entry(tiny_loaded(), id="free")]
    with TestClient(create_app(entries, limits=Limits(max_queue=1))) as c:
        first = c.post("/api/sample", json={"model": "gated", "steps": 3, "num": 2}).json()
        assert gate.entered.wait(30)
        doc = wait_job(c, first["id"], until=("running",))
        assert (doc["done"], doc["total"]) == (1, 3)  # progress: the first of three network calls is under way
        assert c.get("/api/models").status_code == 200  # sampling blocks its worker thread, not the server
        second = c.post("/api/sample", json={"model": "gated", "steps": 3, "num": 2})
        assert second.status_code == 202 and second.json()["position"] == 1
        assert c.get(f"/api/jobs/{second.json()['id']}").json()["status"] == "queued"
        full = c.post("/api/sample", json={"model": "gated", "steps": 3, "num": 2})
        assert full.status_code == 429 and full.headers["retry-after"] == "2"
        assert "model 'gated' is busy" in full.json()["error"] and "try again" in full.json()["error"]
        assert c.get(f"/api/jobs/{first['id']}/image.png").status_code == 409
        other = c.post("/api/sample", json={"model": "free", "steps": 1, "num": 1})  # one queue per model
        assert other.status_code == 202
        gate.release.set()
        for job in (first["id"], second.json()["id"], other.json()["id"]):
            assert wait_job(c, job)["status"] == "done"


def test_a_failing_job_reports_one_line_and_the_worker_goes_on():
    bad = Gate(tiny_loaded().model, fail=RuntimeError("out of memory\nsecond line"))
    lm = tiny_loaded()
    entry = make_entry(dataclasses.replace(lm, model=bad), id="bad")
    with TestClient(create_app([entry])) as c:
        job = c.post("/api/sample", json={"model": "bad", "num": 1}).json()
        doc = wait_job(c, job["id"])
        assert doc["status"] == "error" and doc["error"] == "RuntimeError: out of memory second line"
        bad.fail = None
        bad.release.set()
        job = c.post("/api/sample", json={"model": "bad", "num": 1}).json()
        assert wait_job(c, job["id"])["status"] == "done"


def test_trusted_hosts_refuse_other_host_headers(files):
    app = create_app([make_entry(tiny_loaded(), id="tiny")], allowed_hosts=["127.0.0.1", "localhost"])
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/api/models").status_code == 200
        assert c.get("/api/models", headers={"host": "rebound.example:8000"}).status_code == 400


def test_make_entry_refuses_bad_ids_and_non_image_models():
    with pytest.raises(ValueError, match="model id"):
        make_entry(tiny_loaded(), id="../x")
    with pytest.raises(ConfigError, match="not an image model"):
        make_entry(dataclasses.replace(tiny_loaded(), image_shape=(4, 16)), id="seq")
    with pytest.raises(ValueError, match="distinct"):
        create_app([make_entry(tiny_loaded(), id="a"), make_entry(tiny_loaded(), id="a")])


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="simdiff")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


def test_cli_flags_and_errors(files):
    args = _args(str(files["tiny"]))
    assert (args.host, args.port, args.device, args.sources) == ("127.0.0.1", 8000, "auto", [str(files["tiny"])])
    assert args.func is cmd_serve
    with pytest.raises(ConfigError, match="--port must be in 0..65535"):
        cmd_serve(_args("--port", "70000"))
    with pytest.raises(ConfigError, match="--max-images must be"):
        cmd_serve(_args("--max-images", "0"))
    with pytest.raises(ConfigError, match="--device"):
        cmd_serve(_args("--device", "tpu"))
    with pytest.raises(CheckpointError, match="no such run directory"):
        cmd_serve(_args("--port", "0", str(files["tiny"].parent / "missing")))
    taken = listen_socket("127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match=r"--port \d+: cannot listen"):
            cmd_serve(_args("--port", str(taken.getsockname()[1])))
    finally:
        taken.close()


def test_shipped_models_are_offered_once_each():
    entries = build_entries(["pretrained", "pretrained-fashion"])
    assert [e.id for e in entries] == ["pretrained", "pretrained-student", "pretrained-fashion"]
    infos = [e.info() for e in entries]
    assert all(i["num_classes"] == 10 and i["image_shape"] == [1, 28, 28] for i in infos)
    assert infos[0]["locked"] is None and infos[2]["locked"] is None
    assert infos[1]["locked"] is not None  # the student samples only with what it was distilled for
