#!/usr/bin/env python
"""The MiniLM's feed-forward blocks at one parameter budget: tngraph's low-rank pipeline against
structured neuron pruning with the down projection refitted (tngraph.tn.prune), side by side.

Only the six feed-forward blocks (intermediate.dense -> GELU -> output.dense) are compressed; the
attention and embeddings stay dense, so each row shows what the method does to those layers alone.
Rows:
- svd: `tngraph.compress` on the feed-forward linears alone (default options: output-whitened SVD,
  measured sensitivity, budgeted ranks), no healing;
- prune uniform: every block keeps the same number of hidden neurons;
- prune allocated: the blocks' neuron counts chosen by tngraph's budget solver
  (tngraph.passes.allocate.solve_budget) on each block's predicted-error curve (one greedy sweep).
The blocks are the ones tngraph.passes.mlp finds in the captured graph; the statistics (the hidden
activations' Gram, the output-gradient Gram) come from tngraph's own calibrate and fisher passes on
the same calibration sentences as the svd row.

  python tools/bench_mlp.py [--budget 0.5] [--calibration-samples 2048] [--eval-samples 1000]
                            [--outside-part tune] [--damping 1e-6] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, ".")

import torch  # noqa: E402

import tngraph  # noqa: E402
from tngraph.batches import calibration_batches  # noqa: E402
from tngraph.capture import capture  # noqa: E402
from tngraph.data import outside_sentences, sentence_sets  # noqa: E402
from tngraph.evaluate import agreement, sentence_embeddings, sentence_objective  # noqa: E402
from tngraph.models import ModelSource, load_model  # noqa: E402
from tngraph.passes import PassContext, calibrate, fisher, targets  # noqa: E402
from tngraph.passes.allocate import solve_budget  # noqa: E402
from tngraph.passes.mlp import mlp_pairs, prune_pair_modules  # noqa: E402
from tngraph.pipeline import run_passes  # noqa: E402
from tngraph.tn.prune import params_kept, prune_curve  # noqa: E402

FFN = r"^encoder\.layer\.\d+\.(intermediate|output)\.dense$"
GRID = 32  # neuron counts per block's curve: every hidden/GRID


def statistics(model, tokenizer, texts, config):
    """The MLP blocks (tngraph.passes.mlp) by down name, and per down name (hidden Gram C, damped
    output-gradient Gram G), from tngraph's targets, calibrate and fisher passes."""
    batches = calibration_batches(texts, config, tokenizer)
    gm = capture(model, batches[0])
    ctx = PassContext(config=config, calibration=batches, objective=sentence_objective)
    gm = run_passes(gm, ctx, [targets, calibrate, fisher])
    pairs = {pair.down: pair for pair in mlp_pairs(gm)[0]}
    out = {}
    for name in pairs:
        grad = ctx.grad_stats[name]
        g = grad.gram
        g = g + grad.damping(config.output_damping) * float(g.diagonal().mean()) * torch.eye(g.shape[0], dtype=g.dtype)
        out[name] = (ctx.stats[name].gram, g)
    return pairs, out


def pruned(model, pairs, choice):
    """A copy of `model` whose blocks keep the chosen neurons: {down name: Selection}."""
    model = copy.deepcopy(model)
    for down_name, sel in choice.items():
        prune_pair_modules(model, pairs[down_name], sel.keep, sel.weight)
    return model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=0.5, help="fraction of the feed-forward linears' parameters kept")
    p.add_argument("--calibration-samples", type=int, default=2048)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--outside-part", default="tune", choices=("tune", "report"))
    p.add_argument("--damping", type=float, default=1e-6, help="relative damping of the refit's Gram (default 1e-6)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(ModelSource("minilm"))
    sets = sentence_sets(args.calibration_samples, args.eval_samples)
    outside = outside_sentences(args.eval_samples, part=args.outside_part)
    refs = [sentence_embeddings(model, tokenizer, s) for s in (sets.evaluation, outside)]
    config = tngraph.Config(budget=args.budget, include=(FFN,), heal_steps=0, progress=False,
                            calibration_samples=args.calibration_samples, short_side=False)

    def row(label, candidate, seconds):
        a, b = (agreement(r, sentence_embeddings(candidate, tokenizer, s)) for r, s in zip(refs, (sets.evaluation, outside)))
        print(f"{label:>16} {a.mean_cos:9.4f} {a.top10_overlap:7.4f} {b.mean_cos:9.4f} {b.top10_overlap:7.4f} {seconds:8.1f}", flush=True)

    print(f"MiniLM feed-forward blocks at budget {args.budget} of their parameters; {args.calibration_samples} calibration sentences; "
          f"{args.eval_samples} sentences in domain and out of it ({args.outside_part} part); {args.threads} threads")
    print(f"{'run':>16} {'in: cos':>9} {'top-10':>7} {'out: cos':>9} {'top-10':>7} {'seconds':>8}")
    start = time.perf_counter()
    row("svd", tngraph.compress(model, calibration=sets.calibration, tokenizer=tokenizer, config=config), time.perf_counter() - start)

    start = time.perf_counter()
    pairs, stats = statistics(model, tokenizer, sets.calibration, config)
    names = sorted(stats)
    shapes = {n: model.get_submodule(n).weight.shape for n in names}  # (out, hidden)
    counts = {n: [shapes[n][1] * k // GRID for k in range(1, GRID + 1)] for n in names}
    curves = {n: prune_curve(model.get_submodule(n).weight, *stats[n][:1], counts[n], stats[n][1], damping=args.damping) for n in names}
    setup = time.perf_counter() - start

    def cost(n, count):
        up = model.get_submodule(pairs[n].ups[0])
        return params_kept(shapes[n][0], up.in_features, count, up_bias=up.bias is not None, projections=len(pairs[n].ups))

    dense = sum(cost(n, shapes[n][1]) for n in names)
    uniform = {}
    for n in names:  # the largest grid count within the budget
        fits = [k for k, c in enumerate(counts[n]) if cost(n, c) <= args.budget * cost(n, shapes[n][1])]
        uniform[n] = curves[n][fits[-1]]
    row("prune uniform", pruned(model, pairs, uniform), setup)
    best = solve_budget([[cost(n, c) for c in counts[n]] for n in names], [[s.error for s in curves[n]] for n in names], args.budget * dense)
    row("prune allocated", pruned(model, pairs, {n: curves[n][i] for n, i in zip(names, best)}), setup)
    print("allocated neurons per block: " + ", ".join(str(counts[n][i]) for n, i in zip(names, best)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
