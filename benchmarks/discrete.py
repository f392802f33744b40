"""Masked discrete diffusion vs an autoregressive transformer of the same size and budget, on byte-level text.

Both models are :class:`simdiff.discrete.TokenTransformer` s with the same width, depth and heads (bidirectional for
the masked model, causal for the autoregressive one), trained through the same :class:`simdiff.train.Trainer` with
the same optimiser, steps, batch size and seed on ``seq_len``-byte windows of the Python standard library's source
(``data.name: text``, split by file). The masked model uses the MDLM log-linear schedule and the continuous-time
ELBO (MD4 / MDLM); the EMA weights are scored.

Tables:

1. Validation bits per character: the masked model's ELBO (a bound: Monte Carlo over ``--elbo-samples`` times per
   sequence) vs the autoregressive model's exact negative log-likelihood, on the first ``--num-valid`` windows of
   the valid split.
2. Sample quality vs network calls per sample, ``--num-samples`` samples per row: tau-leaping on uniform grids (a
   sequence whose tokens did not change in a step reuses its last logits, valid because the network takes no time
   input, so a sample costs at most ``seq_len`` calls however many steps) and the first-hitting sampler with ``k``
   tokens per call (``seq_len / k`` calls); the autoregressive model's own samples and the valid data as
   references. Scores: the autoregressive model's negative log-likelihood of the samples in bits per character (its
   perplexity is ``2^bpc``; lower means more "typical" text to it) and the unigram entropy of the sample bytes in
   bits (the data's is the reference: lower means less diverse text).
3. Float32 vs float64 categorical sampling: tau-leaping with many steps, where each step's unmasking probability
   (and so each token's probability in the step's categorical) is tiny; float32 Gumbel-max truncates the noise
   (Zheng et al. 2024) while float64 inverse-CDF sampling does not. Same seeds in both precisions.

Run (CPU, about 20 minutes on one thread)::

    nice -n 10 python benchmarks/discrete.py

and bigger with ``--budget 4`` (4x the training steps) or ``--steps N``. Writes ``benchmarks/results/<name>.json``,
``<name>.md``, ``<name>_samples.txt`` and ``<name>_samples.png`` (first-hitting samples, one block each).

``--part mnist`` instead trains a class-conditional masked model (same architecture family) on MNIST as image
tokens (``--mnist-size`` pixels a side, ``--levels`` grey levels; 14x14 binarised by default to fit the CPU) and
scores samples from tau-leaping and first-hitting with the MNIST-classifier Frechet distance and class accuracy
against test images put through the same token map (``simdiff.eval``; images are resized to 28x28 for the
classifier). Writes ``<name>_mnist.{json,md}`` and ``<name>_mnist_grid.png`` (rows: samplers, columns 0..9).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, command_line, machine_info, table_markdown, table_text, write_json, write_text  # noqa: E402

from simdiff.data import build_dataset  # noqa: E402
from simdiff.discrete import (  # noqa: E402
    AutoregressiveLM,
    MaskedDiffusion,
    TokenTransformer,
    TokenTransformerConfig,
    decode_text,
    sample_first_hitting,
    sample_tau_leaping,
)
from simdiff.discrete.render import render_text_strip  # noqa: E402
from simdiff.train import BatchIterator, Trainer  # noqa: E402
from simdiff.train.config import OptimConfig, TrainConfig  # noqa: E402

LN2 = math.log(2)


class CachedDenoiser:
    """Reuse each row's last logits while its input tokens are unchanged (the network ignores ``t``), evaluating the
    network on the changed rows only; ``calls`` counts rows evaluated / batch rows, i.e. network calls per sample."""

    def __init__(self, net, labels=None, mask_id: int = 256):
        self.net, self.labels, self.mask_id = net, labels, mask_id
        self.rows, self.batch, self._x, self._out = 0, 1, None, None

    @property
    def calls(self) -> float:
        return self.rows / self.batch

    def __call__(self, x_t, t=None, **cond):
        self.batch = x_t.shape[0]
        if self._x is None or self._x.shape != x_t.shape:
            changed = torch.ones(x_t.shape[0], dtype=torch.bool)
            self._out = None
        else:
            changed = (self._x != x_t).reshape(x_t.shape[0], -1).any(1)
            changed &= (x_t == self.mask_id).reshape(x_t.shape[0], -1).any(1)  # finished rows need no logits
        if bool(changed.any()):
            cond = {} if self.labels is None else {"labels": self.labels[changed]}
            fresh = self.net(x_t[changed], **cond)
            self._out = fresh if self._out is None else self._out.index_put((changed,), fresh)
            self.rows += int(changed.sum())
            self._x = x_t.clone()
        return self._out


def unigram_entropy(tokens: torch.Tensor, vocab: int = 256) -> float:
    """Entropy in bits of the byte histogram of ``tokens``."""
    p = torch.bincount(tokens.reshape(-1), minlength=vocab).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def train_model(net, loss_fn, dataset, args, run_dir: Path) -> tuple[torch.nn.Module, float]:
    """Train ``net`` on ``loss_fn`` with the shared recipe; returns the EMA network and the wall-clock seconds."""
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, seed=0, log_every=max(1, args.steps // 10),
                      checkpoint_every=0, progress=False, ema_half_life_images=args.steps * args.batch / 10,
                      optim=OptimConfig(lr=args.lr, warmup_steps=max(1, args.steps // 10), decay="cosine",
                                        min_lr_ratio=0.1))
    start = time.perf_counter()
    trainer = Trainer(net, loss_fn, BatchIterator(dataset, args.batch, seed=0), cfg, run_dir, resume=False)
    trainer.fit()
    secs = time.perf_counter() - start
    net.load_state_dict(trainer.full_state_dict(ema=True))
    return net.eval(), secs


def batched(fn, n: int, size: int):
    return torch.cat([fn(i, min(size, n - i)) for i in range(0, n, size)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=800, help="training steps per model (before --budget)")
    p.add_argument("--budget", type=float, default=1.0, help="multiply the training steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-valid", type=int, default=512)
    p.add_argument("--elbo-samples", type=int, default=4)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--tau-steps", type=int, nargs="+", default=[8, 16, 64, 256])
    p.add_argument("--fh-k", type=int, nargs="+", default=[8, 4, 2, 1])
    p.add_argument("--precision-steps", type=int, nargs="+", default=[64, 1024, 4096])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="discrete")
    p.add_argument("--part", choices=("text", "mnist"), default="text")
    p.add_argument("--mnist-size", type=int, default=14)
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--num-eval", type=int, default=500, help="MNIST samples per sampler (classes cycling)")
    args = p.parse_args()
    args.steps = max(1, int(round(args.steps * args.budget)))
    torch.set_num_threads(args.threads)
    if args.part == "mnist":
        return mnist_part(args)
    t_all = time.perf_counter()
    L = args.seq_len
    data = {s: build_dataset({"name": "text", "split": s, "options": {"seq_len": L}}) for s in ("train", "valid")}
    arch = TokenTransformerConfig(dim=args.dim, depth=args.depth, num_heads=args.heads)
    masked = MaskedDiffusion(levels=256, masking="log_linear")
    ar = AutoregressiveLM(levels=256)
    kw = masked.network_kwargs((1, 1, L), 0)
    tmp = Path(tempfile.mkdtemp(prefix="discrete_bench_"))  # trainer checkpoints, outside the repository
    mdm_net, mdm_secs = train_model(TokenTransformer(arch, **kw), masked.loss, data["train"], args, tmp / "masked")
    ar_cfg = TokenTransformerConfig(dim=args.dim, depth=args.depth, num_heads=args.heads, causal=True)
    ar_net, ar_secs = train_model(TokenTransformer(ar_cfg, **kw), ar.loss, data["train"], args, tmp / "ar")
    params = sum(q.numel() for q in mdm_net.parameters())
    print(f"trained masked ({mdm_secs:.0f} s) and autoregressive ({ar_secs:.0f} s), {params} parameters each")

    valid = masked.tokens(data["valid"][torch.arange(min(args.num_valid, len(data["valid"])))]["x"])
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        elbo = batched(lambda i, n: masked.elbo(mdm_net, valid[i:i + n], samples=args.elbo_samples, generator=g),
                       len(valid), 64)
        ar_nll = batched(lambda i, n: ar.nll(ar_net, valid[i:i + n]).double(), len(valid), 64)
    bpc = [["masked diffusion (ELBO)", float(elbo.mean()) / LN2, mdm_secs],
           ["autoregressive (exact NLL)", float(ar_nll.mean()) / LN2, ar_secs]]

    def score(tokens) -> tuple[float, float]:
        with torch.inference_mode():
            nll = batched(lambda i, n: ar.nll(ar_net, tokens[i:i + n]).double(), len(tokens), 64)
        return float(nll.mean()) / LN2, unigram_entropy(tokens)

    n, mask = args.num_samples, masked.mask_id
    rows, samples = [], {}
    ref = valid[:n].reshape(n, L)
    rows.append(["valid data", "-", 0, *score(ref), 0.0])

    def run(label, knob, fn):
        start = time.perf_counter()
        den = CachedDenoiser(mdm_net)
        gen = torch.Generator().manual_seed(1)
        with torch.inference_mode():
            x = fn(den, torch.full((n, L), mask), gen)
        rows.append([label, str(knob), den.calls, *score(x), time.perf_counter() - start])
        samples[(label, knob)] = x
        print(table_text(["sampler", "setting", "calls", "AR bpc", "unigram H", "s"], rows[-1:]))
        return x

    for steps in args.tau_steps:
        run("tau-leaping", steps, lambda d, x, gen, s=steps: sample_tau_leaping(
            d, x, steps=s, schedule=masked.mask_schedule, mask_id=mask, generator=gen)[0])
    for k in args.fh_k:
        run("first-hitting", k, lambda d, x, gen, k=k: sample_first_hitting(
            d, x, schedule=masked.mask_schedule, mask_id=mask, k=k, generator=gen)[0])
    start = time.perf_counter()
    with torch.inference_mode():
        x_ar = ar.sample(ar_net, n, L, generator=torch.Generator().manual_seed(1))
    rows.append(["autoregressive", "-", L, *score(x_ar), time.perf_counter() - start])

    prec_rows = []
    for steps in args.precision_steps:
        for precision in ("float64", "float32"):
            den = CachedDenoiser(mdm_net)
            start = time.perf_counter()
            with torch.inference_mode():
                x, _ = sample_tau_leaping(den, torch.full((n, L), mask), steps=steps, schedule=masked.mask_schedule,
                                          mask_id=mask, generator=torch.Generator().manual_seed(2),
                                          precision=precision)
            prec_rows.append([f"tau-leaping {steps}", precision, den.calls, *score(x), time.perf_counter() - start])
            print(table_text(["sampler", "precision", "calls", "AR bpc", "unigram H", "s"], prec_rows[-1:]))

    best = samples[("first-hitting", min(args.fh_k))][:8]  # the exact sampler (k = 1 by default)
    texts = decode_text(best.reshape(len(best), 1, 1, L).float() / 127.5 - 1)
    write_text(f"{args.name}_samples.txt", "".join(f"--- sample {i}\n{s}\n" for i, s in enumerate(texts)))
    render_text_strip(texts, RESULTS_DIR / f"{args.name}_samples.png", width=L)
    wall = time.perf_counter() - t_all
    h1 = ["model", "valid bits/char", "train s"]
    h2 = ["sampler", "setting", "network calls / sample", "AR bpc of samples", "unigram entropy (bits)", "sampling s"]
    h3 = ["sampler", "precision", "network calls / sample", "AR bpc of samples", "unigram entropy (bits)", "sampling s"]
    setup = (f"seq_len {L}, {params} parameters per model (dim {args.dim}, depth {args.depth}, heads {args.heads}), "
             f"{args.steps} steps x batch {args.batch}, lr {args.lr}, {args.num_valid} valid windows, "
             f"{args.elbo_samples} ELBO times each, {n} samples per row; total wall {wall:.0f} s")
    md = "\n\n".join([setup, table_markdown(h1, bpc), table_markdown(h2, rows), table_markdown(h3, prec_rows)])
    print("\n" + "\n\n".join([setup, table_text(h1, bpc), table_text(h2, rows), table_text(h3, prec_rows)]))
    write_text(f"{args.name}.md", md)
    write_json(args.name, {"machine": machine_info(), "command": command_line(), "args": vars(args),
                           "parameters": params, "wall_s": wall, "bpc": bpc, "samples": rows,
                           "precision": prec_rows, "first_hitting_texts": texts})


def mnist_part(args) -> None:
    """Class-conditional masked diffusion on MNIST tokens: MNIST-FD and accuracy per sampler, and a sample grid."""
    from simdiff.eval.evaluate import evaluate_samples
    from simdiff.images import save_grid

    t_all = time.perf_counter()
    size = args.mnist_size
    train = build_dataset({"name": "mnist", "split": "train", "image_size": size})
    test = build_dataset({"name": "mnist", "split": "test", "image_size": size})
    proc = MaskedDiffusion(levels=args.levels, masking="cosine")
    arch = TokenTransformerConfig(dim=args.dim, depth=args.depth, num_heads=args.heads)
    net = TokenTransformer(arch, **proc.network_kwargs((1, size, size), 10))
    net, secs = train_model(net, proc.loss, train, args, Path(tempfile.mkdtemp(prefix="discrete_mnist_")) / "m")
    n = args.num_eval
    labels = torch.arange(n) % 10
    ref = test[torch.arange(n)]["x"]
    ref = proc.to_data(proc.tokens(ref))  # the test images through the same token map
    mask, length = proc.mask_id, size * size
    rows, grid = [], []
    settings = [("tau-leaping", s) for s in args.tau_steps] + [("first-hitting", k) for k in args.fh_k]
    for label, knob in settings:
        start = time.perf_counter()
        out = []
        for i in range(0, n, 100):
            lab = labels[i:i + 100]
            den = CachedDenoiser(net, labels=lab, mask_id=mask)
            gen = torch.Generator().manual_seed(1 + i)
            x0 = torch.full((len(lab), 1, size, size), mask)
            with torch.inference_mode():
                if label == "tau-leaping":
                    x, _ = sample_tau_leaping(den, x0, steps=knob, schedule=proc.mask_schedule, mask_id=mask,
                                              generator=gen)
                else:
                    x, _ = sample_first_hitting(den, x0, schedule=proc.mask_schedule, mask_id=mask, k=knob,
                                                generator=gen)
            out.append(proc.to_data(x))
        imgs = torch.cat(out)
        secs_s = time.perf_counter() - start
        scores = evaluate_samples(imgs, ref, metrics=("mnist_fd", "accuracy"), labels=labels, progress=False)
        rows.append([label, str(knob), den.calls, scores["mnist_fd"], scores["accuracy"], secs_s])
        grid.append(imgs[:10])
        print(table_text(["sampler", "setting", "calls", "MNIST-FD", "accuracy", "s"], rows[-1:]))
    other = proc.to_data(proc.tokens(test[torch.arange(n, 2 * n)]["x"]))
    real = evaluate_samples(other, ref, metrics=("mnist_fd", "accuracy"), labels=test.labels[n:2 * n],
                            progress=False)
    rows.append(["test images (other half), token map", "-", 0, real["mnist_fd"], real["accuracy"], 0.0])
    save_grid(torch.cat(grid), RESULTS_DIR / f"{args.name}_mnist_grid.png", nrow=10, scale=max(1, 56 // size))
    wall = time.perf_counter() - t_all
    setup = (f"MNIST {size}x{size}, {args.levels} levels ({length} tokens), class-conditional token transformer "
             f"(dim {args.dim}, depth {args.depth}), {args.steps} steps x batch {args.batch} ({secs:.0f} s), "
             f"{n} samples per row vs {n} test images; total wall {wall:.0f} s")
    h = ["sampler", "setting", "network calls / sample", "MNIST-FD", "class accuracy", "sampling s"]
    print("\n" + setup + "\n" + table_text(h, rows))
    write_text(f"{args.name}_mnist.md", setup + "\n\n" + table_markdown(h, rows))
    write_json(f"{args.name}_mnist", {"machine": machine_info(), "command": command_line(), "args": vars(args),
                                      "wall_s": wall, "rows": rows})


if __name__ == "__main__":
    main()
