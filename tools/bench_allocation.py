#!/usr/bin/env python
"""Uniform vs budgeted allocation on the bundled MiniLM, side by side in one run.

For each run of RUNS (uniform ranks with and without output whitening; budgeted with each
sensitivity estimator, with patch-level dense rows, under a latency budget; the default Config,
calibrated as `tngraph compress` does and on the standard library's sentences alone): the fraction
of the 36 encoder linears' parameters kept (dense-kept targets included), targets kept dense, output
rows kept dense, sentence-embedding agreement on held-out standard-library sentences (the
calibration's domain) and on as many out-of-domain ones (tngraph.data.outside_sentences), the cut in
1 - mean cos against the first row (uniform whitened SVD) in each, and the compress time. No healing.

Every run calibrates on the same sentences: --calibration-mix of them (default: the product's,
Config.calibration_mix) from other packages' docstrings (tngraph.data.sentence_sets), except the
"unmixed" row, which takes the standard library's alone.

  python tools/bench_allocation.py [--budget 0.5] [--calibration-samples 2048] [--eval-samples 1000]
                                   [--calibration-mix SHARE] [--outside-part report|tune] [--runs 1,11,12]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, ".")

import torch  # noqa: E402

import tngraph  # noqa: E402
from tngraph import meta  # noqa: E402
from tngraph.errors import TngraphError  # noqa: E402
from tngraph.data import outside_sentences, sentence_sets  # noqa: E402
from tngraph.evaluate import agreement, sentence_embeddings  # noqa: E402
from tngraph.models import MINILM_INCLUDE, ModelSource, load_model  # noqa: E402

# label, Config overrides; the first row is the baseline of the cut (uniform whitened SVD, SVD-LLM style)
RUNS = [
    ("uniform", dict(allocation="uniform", output_whiten=False)),
    ("uniform +out-whiten", dict(allocation="uniform")),
    ("budgeted spectral", dict(allocation="budgeted", sensitivity="spectral")),
    ("budgeted fisher", dict(allocation="budgeted", sensitivity="fisher")),
    ("budgeted predicted", dict(allocation="budgeted", sensitivity="predicted")),
    ("budgeted measured x1", dict(allocation="budgeted", sensitivity="measured", sensitivity_rounds=1)),
    ("budgeted measured x2", dict(allocation="budgeted", sensitivity="measured", sensitivity_rounds=2)),
    ("budgeted fisher +rows", dict(allocation="budgeted", sensitivity="fisher", dense_rows=True)),
    ("budgeted measured x1 +rows", dict(allocation="budgeted", sensitivity="measured", sensitivity_rounds=1, dense_rows=True)),
    ("budgeted fisher latency", dict(allocation="budgeted", sensitivity="fisher", budget_kind="latency")),
    ("default", dict(mlp="auto")),  # the product's Config (a text encoder's MLP blocks pruned), whatever --mlp says
    ("default, unmixed", dict(mlp="auto", calibration_mix=0.0)),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--mlp", default="lowrank", choices=("auto", "lowrank", "prune"),
                   help="the feed-forward blocks: low rank like every other target (default: what docs/allocation.md measured), "
                        "or pruned by neurons (auto, the product default for a text encoder; docs/formats.md)")
    p.add_argument("--calibration-samples", type=int, default=2048)
    p.add_argument("--calibration-mix", type=float, default=tngraph.Config.calibration_mix,
                   help="share of the calibration sentences from other packages' docstrings (default: the product's)")
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--outside-part", choices=("report", "tune"), default="report",
                   help="which half of the out-of-domain set scores: the one set aside for reports (default), or the one a "
                        "choice between runs may read (tngraph.data.outside_sentences)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", default=None, help="comma-separated row numbers of RUNS to run (1 = the baseline, always run)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(ModelSource("minilm"))
    sets = {mix: sentence_sets(args.calibration_samples, args.eval_samples, mix=mix) for mix in {args.calibration_mix, 0.0}}
    held = {"in domain": sets[0.0].evaluation, "out of domain": outside_sentences(args.eval_samples, part=args.outside_part)}
    refs = {k: sentence_embeddings(model, tokenizer, v) for k, v in held.items()}
    print(f"MiniLM at budget {args.budget}, {args.calibration_samples} calibration sentences ({args.calibration_mix:g} from other packages), "
          f"{args.eval_samples} held-out per domain ({args.outside_part} part out of it), {args.threads} threads")
    print(f"{'run':>27} {'kept':>6} {'dense':>5} {'rows':>5}" + "".join(f" {k + ': mean cos':>24} {'min cos':>8} {'top-10':>7} {'err cut':>8}" for k in held)
          + f" {'seconds':>8}")
    baseline: dict[str, float] = {}
    chosen = sorted({1, *(int(v) for v in args.runs.split(","))}) if args.runs else range(1, len(RUNS) + 1)
    for label, overrides in (RUNS[i - 1] for i in chosen):
        options = {"mlp": args.mlp, **overrides}
        mix = options.pop("calibration_mix", args.calibration_mix)
        config = tngraph.Config(budget=args.budget, include=MINILM_INCLUDE, heal_steps=0, **options,
                                calibration_samples=args.calibration_samples, progress=False)
        start = time.perf_counter()
        try:
            result = tngraph.compress_with_result(model, calibration=sets[mix].calibration, tokenizer=tokenizer, config=config)
        except TngraphError as exc:
            print(f"{label:>27} refused: {exc}", flush=True)
            continue
        seconds = time.perf_counter() - start
        plans = [meta.info(n).plan for n in meta.targets(result.graph)]
        kept = sum(pl.params_after for pl in plans) / sum(pl.params_before for pl in plans)
        dense = sum(pl.format == "dense" for pl in plans)
        cells = ""
        for k, texts in held.items():
            agree = agreement(refs[k], sentence_embeddings(result.module, tokenizer, texts))
            baseline.setdefault(k, 1 - agree.mean_cos)
            cut = 1 - (1 - agree.mean_cos) / baseline[k]
            cells += f" {agree.mean_cos:>24.4f} {agree.min_cos:>8.4f} {agree.top10_overlap:>7.4f} {cut:>8.1%}"
        rows = sum(pl.dense_rows for pl in plans)
        print(f"{label:>27} {kept:>6.3f} {dense:>5} {rows:>5}{cells} {seconds:>8.1f}", flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
