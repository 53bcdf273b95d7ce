#!/usr/bin/env python
"""torch.compile(backend="tngraph") on the bundled MiniLM, against Inductor on the dense model.

Measured in one run (CPU by default): the first call of the tngraph-compiled model (dynamo +
the tngraph pipeline + Inductor) and, after torch._dynamo.reset(), of a second compile of the same
model (the decompositions come from the backend's cache); agreement of the embeddings with the
original model (mean/min cosine, top-10 neighbour overlap on held-out sentences) for the compiled
model and for tngraph.compress with the same options; then the latency of compiled-compressed vs
compiled-dense (both Inductor) at batch 32 x 128 tokens and batch 1 x 128, and their ratios.

  python tools/bench_compile.py [--budget 0.5] [--calibration 128] [--eval 500] [--threads 2] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch
from torch.utils import benchmark

sys.path.insert(0, ".")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _latency(fn, min_run_time: float) -> float:
    with torch.no_grad():
        fn()  # compile / warm up at this shape
        return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--calibration", type=int, default=128, help="calibration sentences (built-in set)")
    p.add_argument("--eval", type=int, default=500, help="held-out sentences for agreement")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-run-time", type=float, default=3.0)
    p.add_argument("--no-compress", action="store_true", help="skip the tngraph.compress comparison")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    import tngraph
    from tngraph import backend
    from tngraph.data import sentence_sets
    from tngraph.evaluate import agreement, sentence_embeddings
    from tngraph.models import MINILM_INCLUDE, ModelSource, load_model

    model, tokenizer = load_model(ModelSource("minilm"))
    sets = sentence_sets(calibration=args.calibration, evaluation=args.eval)
    options = {"budget": args.budget, "include": MINILM_INCLUDE}
    result: dict = {"budget": args.budget, "calibration": args.calibration, "threads": args.threads}

    def compiled_tngraph():
        return torch.compile(model, backend="tngraph", dynamic=True, options={**options, "calibration": sets.calibration})

    with torch.no_grad():
        reference = sentence_embeddings(model, tokenizer, sets.evaluation)
        ours = compiled_tngraph()
        start = time.perf_counter()
        embedded = sentence_embeddings(ours, tokenizer, sets.evaluation)
        result["first_compile_s"] = time.perf_counter() - start
        result["graphs"] = backend.stats["graphs"]
        torch._dynamo.reset()
        again = compiled_tngraph()
        start = time.perf_counter()
        sentence_embeddings(again, tokenizer, sets.evaluation[:64])
        result["cached_compile_s"] = time.perf_counter() - start
        result["cache_hits"] = backend.stats["cache_hits"]
    ag = agreement(reference, embedded)
    result["compiled"] = {"mean_cos": ag.mean_cos, "min_cos": ag.min_cos, "top10": ag.top10_overlap}
    print(f"MiniLM, budget {args.budget}, {args.calibration} calibration sentences, {args.eval} held out, {args.threads} threads")
    print(f"first call of the tngraph-compiled model: {result['first_compile_s']:.1f} s ({result['graphs']} graphs)")
    print(f"second compile, decompositions from the cache: {result['cached_compile_s']:.1f} s "
          f"({result['cached_compile_s'] / result['first_compile_s']:.3f} of the first; {result['cache_hits']} cache hits)")
    print(f"agreement, torch.compile(backend='tngraph'): mean cos {ag.mean_cos:.4f}, min {ag.min_cos:.4f}, top-10 {ag.top10_overlap:.4f}")
    if not args.no_compress:
        start = time.perf_counter()
        compressed = tngraph.compress(model, calibration=sets.calibration, tokenizer=tokenizer, heal_steps=0, progress=False, **options)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            theirs = agreement(reference, sentence_embeddings(compressed, tokenizer, sets.evaluation))
        result["compress"] = {"mean_cos": theirs.mean_cos, "min_cos": theirs.min_cos, "top10": theirs.top10_overlap, "seconds": seconds}
        print(f"agreement, tngraph.compress (same options, no healing): mean cos {theirs.mean_cos:.4f}, min {theirs.min_cos:.4f}, "
              f"top-10 {theirs.top10_overlap:.4f} ({seconds:.1f} s)")

    torch._dynamo.reset()
    dense = torch.compile(model, backend="inductor", dynamic=True)
    ours = torch.compile(model, backend="tngraph", dynamic=True, options={**options, "calibration": sets.calibration})
    print(f"{'batch':>12} | {'dense (inductor) ms':>20} | {'tngraph ms':>11} | {'tngraph/dense':>13}")
    result["latency"] = []
    for rows, length in ((32, 128), (1, 128)):
        g = torch.Generator().manual_seed(rows)
        enc = {"input_ids": torch.randint(1000, 20000, (rows, length), generator=g), "attention_mask": torch.ones(rows, length, dtype=torch.long),
               "token_type_ids": torch.zeros(rows, length, dtype=torch.long)}
        t_dense = _latency(lambda: dense(**enc), args.min_run_time)
        t_ours = _latency(lambda: ours(**enc), args.min_run_time)
        result["latency"].append({"rows": rows, "length": length, "dense_ms": t_dense * 1e3, "tngraph_ms": t_ours * 1e3, "ratio": t_ours / t_dense})
        print(f"{f'{rows} x {length}':>12} | {t_dense * 1e3:>20.2f} | {t_ours * 1e3:>11.2f} | {t_ours / t_dense:>13.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
