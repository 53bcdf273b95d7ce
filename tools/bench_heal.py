#!/usr/bin/env python
"""Healing on the bundled MiniLM: the same compressed model before and after each healing variant.

Compresses the MiniLM once with the default pipeline without healing (or loads --artifact), then for
each variant heals a fresh copy against the original on the built-in sentences outside the
evaluation set and prints the held-out embedding agreement before and after, the cut in
1 - mean cos, the steps taken and the healing time (this machine, --threads threads).

  python tools/bench_heal.py [--artifact DIR] [--runs default,factors-only,last-layer] [--eval-samples 2000]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, ".")

import torch  # noqa: E402

import tngraph  # noqa: E402
from tngraph.api import heal_config  # noqa: E402
from tngraph.data import healing_pool, sentence_sets  # noqa: E402
from tngraph.evaluate import agreement, sentence_embeddings  # noqa: E402
from tngraph.heal import heal  # noqa: E402
from tngraph.models import MINILM_INCLUDE, ModelSource, load_model  # noqa: E402

# label: HealConfig overrides of the default (Config's heal_steps / heal_lr)
RUNS = {
    "default": {},
    "factors-only": dict(train_norms=False),
    "last-layer": dict(layers=False),
    "half-steps": dict(steps=250),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", help="a compressed MiniLM artifact (default: compress one now, ~3 min)")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--runs", default="default,factors-only,last-layer", help=f"comma-separated, from {', '.join(RUNS)}")
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        p.error(f"unknown run {unknown[0]!r}; choose from {', '.join(RUNS)}")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(ModelSource("minilm"))
    config = tngraph.Config(budget=args.budget, include=MINILM_INCLUDE, heal_steps=0, eval_samples=args.eval_samples, progress=False)
    sets = sentence_sets(config.calibration_samples, config.eval_samples, config.seed)
    if args.artifact:
        student = tngraph.load(args.artifact)
        label = args.artifact
    else:
        start = time.perf_counter()
        student = tngraph.compress(model, calibration=sets.calibration, tokenizer=tokenizer, config=config)
        label = f"default pipeline, budget {args.budget:g}, compressed in {time.perf_counter() - start:.0f}s"
    texts = healing_pool(sets.evaluation)
    ref = sentence_embeddings(model, tokenizer, sets.evaluation)
    before = agreement(ref, sentence_embeddings(student, tokenizer, sets.evaluation))
    print(f"MiniLM ({label}); healing on {len(texts)} built-in sentences, agreement on {before.sentences} others; "
          f"{torch.get_num_threads()} threads")
    print(f"{'run':14} {'steps':>5} {'best':>5} {'seconds':>7} {'mean cos':>17} {'cut':>6} {'min cos':>17} {'top-10':>17}")
    base = heal_config(config.replace(heal_steps=tngraph.Config().heal_steps))
    for run in runs:
        cfg = base.__class__(**{**base.__dict__, **RUNS[run]})
        healed = copy.deepcopy(student)
        result = heal(healed, model, texts, tokenizer, cfg, show=sys.stderr.isatty())
        after = agreement(ref, sentence_embeddings(healed, tokenizer, sets.evaluation))
        cut = 1 - (1 - after.mean_cos) / (1 - before.mean_cos)
        print(f"{run:14} {result.steps:>5} {result.best_step:>5} {result.seconds:>7.0f} {before.mean_cos:>8.4f}->{after.mean_cos:.4f} {cut:>6.1%} "
              f"{before.min_cos:>8.4f}->{after.min_cos:.4f} {before.top10_overlap:>8.4f}->{after.top10_overlap:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
