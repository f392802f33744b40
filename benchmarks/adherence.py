"""Why does the class-conditional MNIST model follow its label so rarely? Probes and small controlled runs.

Sections (``--section``):

* ``probe``: the shipped model (``simdiff/pretrained/mnist_uvit.safetensors``). (1) the data/label wiring: the
  MNIST classifier's accuracy on real training digits with the data set's own labels; (2) the label embedding: norm
  of each row of ``cond.label`` vs the log-SNR embedding it is added to; (3) where in log-SNR the label is used:
  for real test digits ``x`` noised to ``z = alpha x + sigma eps`` at a grid of log-SNRs, the x-prediction under
  each of the 10 labels and the null label; reported are the RMS spread of ``x_hat`` across labels, the RMS error
  ``x_hat(true label) - x``, and the classifier's agreement of ``x_hat(z, lam, label=a)`` with ``a`` (chance 0.1);
  (4) class accuracy of samples with and without guidance.
* ``runs``: small controlled trainings of the MNIST recipe (``simdiff/configs/mnist.yaml``) at a reduced size and
  budget, one factor changed per row, same seed and step count; each row reports class accuracy (w = 0 and w = 2;
  EMA and raw weights) and MNIST-FD of its samples, and the training wall-clock.

* ``ideal``: the probe's agreement column for the exact class-conditional denoiser of 20000 training digits
  (what a model that uses its label fully would score), and whether class-mean images are classified correctly.

Run: ``python benchmarks/adherence.py --section probe`` (and ``ideal``), then ``--section runs --rows NAME ...``;
results go to ``benchmarks/results/adherence_{probe,ideal,runs*}.{json,md}`` (rows accumulate across invocations).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, command_line, machine_info, table_markdown  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "simdiff" / "configs" / "mnist.yaml"
PRETRAINED = ROOT / "simdiff" / "pretrained" / "mnist_uvit.safetensors"
LOGSNRS = (-12.0, -8.0, -6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0)


def _sample_acc(model, schedule, *, num: int, guidance: float, seed: int = 1, steps: int = 10):
    from simdiff.eval import MNISTFeatures
    from simdiff.generate import SampleConfig, generate
    from simdiff.runs import class_null_cond

    labels = torch.arange(num) % 10
    with torch.no_grad():
        x = generate(model, schedule, model.image_shape,
                     SampleConfig(sampler="unipc", steps=steps, grid="uniform_t", seed=seed, guidance=guidance),
                     num=num, labels=labels, num_classes=10, null_cond=class_null_cond(10))
    return MNISTFeatures().accuracy(x, labels), x


def _mnist_fd(x: torch.Tensor, ref: torch.Tensor) -> float:
    from simdiff.eval import MNISTFeatures
    from simdiff.eval.fid import frechet_distance_features

    f = MNISTFeatures()
    return frechet_distance_features(f(x), f(ref))


def _test_digits(num: int, size: int | None = None):
    from simdiff.data import DataConfig, build_dataset

    ds = build_dataset(DataConfig(name="mnist", split="test", limit=num, image_size=size))
    return ds.images, ds.labels


def probe(num_samples: int) -> dict:
    from simdiff.data import DataConfig, build_dataset
    from simdiff.eval import MNISTFeatures
    from simdiff.experiment import load_model

    out: dict = {}
    clf = MNISTFeatures()
    tr = build_dataset(DataConfig(name="mnist", split="train+valid"))
    idx = torch.randperm(len(tr), generator=torch.Generator().manual_seed(0))[:2000]
    out["classifier_acc_on_train_with_dataset_labels"] = clf.accuracy(tr.images[idx], tr.labels[idx])

    loaded = load_model(PRETRAINED)
    model, schedule = loaded.model, loaded.schedule
    emb = model.backbone.cond
    with torch.no_grad():
        lam = torch.tensor(LOGSNRS)
        t_emb = emb.logsnr(lam)
        lab = emb.label.weight
        out["label_row_norm"] = [round(float(v), 3) for v in lab.norm(dim=1)]
        out["label_row_mean_pairwise_dist"] = float(torch.cdist(lab[:10], lab[:10]).sum() / 90)
        out["logsnr_emb_norm"] = {str(k): round(float(v), 3) for k, v in zip(LOGSNRS, t_emb.norm(dim=1))}

    x0, y0 = _test_digits(200)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(x0.shape, generator=g)
    rows = []
    with torch.no_grad():
        for lam_v in LOGSNRS:
            a2 = torch.sigmoid(torch.tensor(lam_v))
            z = a2.sqrt() * x0 + (1 - a2).sqrt() * eps
            preds = [model(z, torch.full((len(z),), lam_v), labels=torch.full_like(y0, c)).x for c in range(11)]
            p = torch.stack(preds[:10])  # [10, B, ...]
            spread = float((p - p.mean(0, keepdim=True)).pow(2).mean().sqrt())
            true = p[y0, torch.arange(len(y0))]
            err = float((true - x0).pow(2).mean().sqrt())
            null_err = float((preds[10] - x0).pow(2).mean().sqrt())
            agree = sum(clf.accuracy(p[c], torch.full_like(y0, c)) for c in range(10)) / 10
            rows.append({"logsnr": lam_v, "spread_across_labels": round(spread, 4), "rms_err_true_label":
                         round(err, 4), "rms_err_null": round(null_err, 4),
                         "clf_agrees_with_given_label": round(agree, 3)})
    out["label_effect"] = rows
    for w in (0.0, 2.0):
        acc, _ = _sample_acc(model, schedule, num=num_samples, guidance=w)
        out[f"sample_acc_w{w:g}"] = acc
    out["num_samples"] = num_samples
    return out


def ideal(num_train: int = 20000) -> dict:
    """The reference for the probe's agreement column: the exact class-conditional denoiser of an empirical set.

    For ``num_train`` training digits, ``x_hat(z, lam, c)`` is the posterior mean over the digits of class ``c``
    (softmax of ``-||z - alpha x_i||^2 / (2 sigma^2)``); reported is how often the classifier calls it ``c`` for the
    same 200 noised test digits as the probe. Also: whether the 10 class-mean images are classified correctly.
    """
    from simdiff.data import DataConfig, build_dataset
    from simdiff.eval import MNISTFeatures

    clf = MNISTFeatures()
    ds = build_dataset(DataConfig(name="mnist", split="train+valid"))
    means = torch.stack([ds.images[ds.labels == c].mean(0) for c in range(10)])
    out: dict = {"class_means_predicted": clf.predict(means).tolist(), "num_train": num_train, "rows": []}
    x0, _ = _test_digits(200)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    tr, trl = ds.images[:num_train].flatten(1), ds.labels[:num_train]
    for lam_v in LOGSNRS:
        a2 = torch.sigmoid(torch.tensor(lam_v))
        a, s = a2.sqrt(), (1 - a2).sqrt()
        z = (a * x0 + s * eps).flatten(1)
        agree = 0.0
        for c in range(10):
            xc = tr[trl == c]
            w = torch.softmax(-torch.cdist(z, a * xc).pow(2) / (2 * s * s), dim=1)
            agree += clf.accuracy((w @ xc).reshape(x0.shape), torch.full((len(z),), c)) / 10
        out["rows"].append({"logsnr": lam_v, "ideal_clf_agrees_with_given_label": round(agree, 3)})
    return out


#: Rows of the controlled study: name -> overrides on top of the small base (one factor each).
SMALL = ["data.image_size=28", "model.options={channels: [16, 32], dim: 96, depth: 2, num_heads: 4, emb_dim: 64}",
         "train.batch_size=64", "train.log_every=100", "train.sample_every=0", "train.checkpoint_every=100000",
         "train.optim={lr: 1.0e-3, warmup_steps: 100, decay: cosine, min_lr_ratio: 0.1}"]
ROWS = {
    "base": [],
    "drop0": ["diffusion.cond_drop_prob=0.0"],
    "drop0.2": ["diffusion.cond_drop_prob=0.2"],
    "ema_short": ["train.ema_half_life_images=4000"],
    "shift_noise": ["diffusion.schedule={name: shifted_cosine, image_size: 28, noise_size: 8}"],
    "no_jacobian": ["diffusion.jacobian=false"],
    "eps_weight": ["diffusion.weighting=eps"],
    "label_std1": [],  # the label embedding initialised N(0, 1) instead of N(0, 0.02): see LABEL_INIT_STD
    "label_std1+ema_short": ["train.ema_half_life_images=4000"],  # two factors: the recommended combination
}
#: Rows that change the label-embedding initialisation (no config option exists for it; set after the network is
#: built, before training).
LABEL_INIT_STD = {"label_std1": 1.0, "label_std1+ema_short": 1.0}


def _patched_network(std: float):
    """``simdiff.experiment.seeded_network`` with the class-embedding table re-initialised ``N(0, std^2)``."""
    import simdiff.experiment as experiment

    orig = experiment.seeded_network

    def seeded_network(cfg, **kw):
        net = orig(cfg, **kw)
        with torch.no_grad():
            torch.nn.init.normal_(net.backbone.cond.label.weight, std=std)
        return net

    return experiment, orig, seeded_network


def run_row(name: str, steps: int, num_samples: int, seed: int) -> dict:
    from simdiff.experiment import load_model, train
    from simdiff.runs import load_config

    overrides = SMALL + [f"train.steps={steps}", f"train.seed={seed}"] + ROWS[name]
    cfg = load_config(RECIPE, overrides)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        if name in LABEL_INIT_STD:
            mod, orig, patched = _patched_network(LABEL_INIT_STD[name])
            mod.seeded_network = patched
            try:
                train(cfg, Path(tmp) / "run", resume=False)
            finally:
                mod.seeded_network = orig
        else:
            train(cfg, Path(tmp) / "run", resume=False)
        wall = time.time() - t0
        res = {"row": name, "overrides": ROWS[name], "steps": steps, "train_s": round(wall, 1)}
        ref, _ = _test_digits(1000)
        for ema in (True, False):
            loaded = load_model(Path(tmp) / "run", ema=ema)
            tag = "ema" if ema else "raw"
            for w in (0.0, 2.0):
                acc, x = _sample_acc(loaded.model, loaded.schedule, num=num_samples, guidance=w)
                res[f"acc_{tag}_w{w:g}"] = round(acc, 3)
                if w == 0.0:
                    res[f"fd_{tag}_w0"] = round(_mnist_fd(x, ref), 2)
    res["num_samples"] = num_samples
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--section", choices=("probe", "ideal", "runs"), required=True)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    head = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine_info(),
            "command": command_line()}
    if args.section == "ideal":
        t0 = time.time()
        res = ideal()
        res.update(head, wall_s=round(time.time() - t0, 1))
        (RESULTS_DIR / "adherence_ideal.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return
    if args.section == "probe":
        t0 = time.time()
        res = probe(args.samples)
        res.update(head, wall_s=round(time.time() - t0, 1))
        (RESULTS_DIR / "adherence_probe.json").write_text(json.dumps(res, indent=1))
        le = res["label_effect"]
        md = table_markdown(list(le[0]), [list(r.values()) for r in le])
        (RESULTS_DIR / "adherence_probe.md").write_text(
            f"{head['date']} | {head['command']}\n\n{md}\n\n" + "\n".join(
                f"- {k}: {v}" for k, v in res.items() if k != "label_effect") + "\n")
        print(json.dumps(res, indent=1))
        return
    path = RESULTS_DIR / f"adherence_runs{args.tag}.json"
    done = json.loads(path.read_text()) if path.exists() else {"rows": []}
    for name in args.rows:
        res = run_row(name, args.steps, args.samples, args.seed)
        res.update(head)
        print(json.dumps(res), flush=True)
        done = json.loads(path.read_text()) if path.exists() else {"rows": []}
        done["rows"] = [r for r in done["rows"] if r["row"] != name] + [res]
        path.write_text(json.dumps(done, indent=1))
    keys = ("row", "steps", "train_s", "acc_ema_w0", "acc_ema_w2", "acc_raw_w0", "acc_raw_w2", "fd_ema_w0",
            "fd_raw_w0", "num_samples")
    md = table_markdown(keys, [[r.get(k) for k in keys] for r in done["rows"]])
    (RESULTS_DIR / f"adherence_runs{args.tag}.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
