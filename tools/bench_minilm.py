#!/usr/bin/env python
"""CPU latency of the bundled MiniLM, dense vs tngraph-compressed, eager and torch.compile (Inductor).

All timings come from one run, interleaved, median of --repeats after warm-up; the ratios
(compressed / dense) are what to compare, as EVALUATION.md asks.

  python tools/bench_minilm.py [--budget 0.5] [--threads 2] [--no-compile]
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, ".")

import torch  # noqa: E402

import tngraph  # noqa: E402
from tngraph.data import sentence_sets  # noqa: E402
from tngraph.evaluate import latency, latency_inputs  # noqa: E402
from tngraph.models import MINILM_INCLUDE, ModelSource, load_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--mlp", default="auto", choices=("auto", "lowrank", "prune"),
                   help="the feed-forward blocks: auto (the default pipeline: a text encoder's pruned by neurons), or lowrank "
                        "(what the results measured before 2026-12-07 used; docs/formats.md)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calibration-samples", type=int, default=128)
    p.add_argument("--no-compile", action="store_true", help="eager only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(ModelSource("minilm"))
    calib = sentence_sets(args.calibration_samples, 10).calibration
    compressed = tngraph.compress(
        model, calibration=calib, tokenizer=tokenizer,
        config=tngraph.Config(budget=args.budget, include=MINILM_INCLUDE, heal_steps=0, progress=False, mlp=args.mlp),  # healing leaves shapes as they are
    )
    variants = {"eager": (model, compressed)}
    if not args.no_compile:
        variants["inductor"] = (torch.compile(model, dynamic=False), torch.compile(compressed, dynamic=False))
    print(f"MiniLM, budget {args.budget}, mlp {args.mlp}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'mode':>9} {'batch':>8} {'dense ms':>9} {'compressed ms':>14} {'ratio':>6}")
    for mode, (dense, comp) in variants.items():
        for batch, length in ((32, 128), (1, 128)):
            inputs = latency_inputs(tokenizer.vocab_size, batch, length)
            times = latency({"dense": dense, "compressed": comp}, inputs, repeats=args.repeats, warmup=2)
            print(f"{mode:>9} {batch:>4}x{length:<3} {times['dense'] * 1e3:>9.1f} {times['compressed'] * 1e3:>14.1f} {times['compressed'] / times['dense']:>6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
