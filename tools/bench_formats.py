#!/usr/bin/env python
"""Every tensor-network format side by side, at 25 % and 50 % of the parameters kept.

Per format and kept fraction, from one run:
- MiniLM: mean relative whitened output error ||(W - W') X^T|| / ||W X^T|| over the 36 encoder
  linears (X: the calibration activations reaching each layer), and the end-to-end sentence
  embedding agreement (mean cos, top-10 overlap) on held-out sentences;
- random matrices of real LLM shapes (Qwen3-32B, 5120 x 5120 by default): CPU time of
  `contract(x)` against the dense matmul for m rows, as a ratio.

  python tools/bench_formats.py [--eval-samples 500] [--shapes 5120x5120] [--rows 1 32 4096]
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, ".")

import torch  # noqa: E402
from torch.utils import benchmark  # noqa: E402

import tngraph  # noqa: E402
from tngraph.data import sentence_sets  # noqa: E402
from tngraph.evaluate import agreement, sentence_embeddings  # noqa: E402
from tngraph.models import MINILM_INCLUDE, ModelSource, load_model  # noqa: E402
from tngraph.tn.formats import FORMATS, rank_for_params  # noqa: E402

VARIANTS = {  # name shown -> (Config format, Config options, FORMATS key, format options)
    "svd (whitened)": ("lowrank", {}, "svd", {}),
    "tt-2 (whitened+refit)": ("tt", {"tt_cores": 2}, "tt", {"cores": 2}),
    "tt-3 (whitened+refit)": ("tt", {"tt_cores": 3}, "tt", {"cores": 3}),
    "tucker-2x2 (whitened)": ("tucker", {"tucker_modes": 2}, "tucker", {"modes": 2}),
}


def layer_errors(result, model) -> float:
    errors = []
    for name, plan in result.context.plan.items():
        w = model.get_submodule(name).weight.detach().double()
        gram = result.context.stats[name].gram
        if plan.format == "lowrank":
            approx = (plan.factors["a"] @ plan.factors["b"]).double()
        else:
            approx = plan.tensor_network().to_dense().double()
        diff = w - approx
        errors.append((torch.trace(diff @ gram @ diff.T) / torch.trace(w @ gram @ w.T)).sqrt().item())
    return sum(errors) / len(errors)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kept", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--calibration-samples", type=int, default=256)
    p.add_argument("--shapes", nargs="+", default=["5120x5120"], help="IN x OUT random matrices for timing")
    p.add_argument("--rows", nargs="+", type=int, default=[1, 32, 4096])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(ModelSource("minilm"))
    sets = sentence_sets(args.calibration_samples, args.eval_samples)
    ref = sentence_embeddings(model, tokenizer, sets.evaluation)
    print(f"MiniLM, {args.calibration_samples} calibration / {args.eval_samples} held-out sentences, {torch.get_num_threads()} threads")
    print(f"{'format':>24} {'kept':>5} {'params kept':>11} {'layer err':>9} {'mean cos':>9} {'top-10':>7}")
    for label, (fmt, options, _, _) in VARIANTS.items():
        for kept in args.kept:
            config = tngraph.Config(budget=kept, format=fmt, include=MINILM_INCLUDE, progress=False, **options)
            result = tngraph.compress_with_result(model, calibration=sets.calibration, tokenizer=tokenizer, config=config)
            before = sum(pl.params_before for pl in result.context.plan.values())
            after = sum(pl.params_after for pl in result.context.plan.values())
            agree = agreement(ref, sentence_embeddings(result.module, tokenizer, sets.evaluation))
            print(f"{label:>24} {kept:>5.2f} {after / before:>11.3f} {layer_errors(result, model):>9.4f} {agree.mean_cos:>9.4f} {agree.top10_overlap:>7.4f}", flush=True)
    print()
    print(f"contract(x) vs dense x @ W.T, random weights, CPU fp32: time ratio (format / dense)")
    print(f"{'shape':>11} {'format':>24} {'kept':>5} " + " ".join(f"{'m=' + str(m):>9}" for m in args.rows))
    for shape in args.shapes:
        in_f, out_f = (int(v) for v in shape.lower().split("x"))
        w = torch.randn(out_f, in_f) / in_f**0.5
        for label, (_, _, key, fopts) in VARIANTS.items():
            fmt = FORMATS[key]
            for kept in args.kept:
                rank = rank_for_params(fmt, out_f, in_f, kept * out_f * in_f, **fopts)
                net = fmt.decompose(w, rank, None, **fopts)
                ratios = []
                for m in args.rows:
                    x = torch.randn(m, in_f)
                    t_dense = benchmark.Timer("x @ w.T", globals={"x": x, "w": w}).blocked_autorange(min_run_time=0.2).median
                    t_net = benchmark.Timer("net.contract(x)", globals={"x": x, "net": net}).blocked_autorange(min_run_time=0.2).median
                    ratios.append(t_net / t_dense)
                print(f"{shape:>11} {label:>24} {kept:>5.2f} " + " ".join(f"{r:>9.3f}" for r in ratios), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
