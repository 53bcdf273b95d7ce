#!/usr/bin/env python
"""Healing on the bundled MiniLM: the same compressed model before and after each healing variant.

Compresses the MiniLM once with the default pipeline without healing (or loads --artifact), then for
each variant heals a fresh copy against the original and prints, before and after, the embedding
agreement on held-out standard-library sentences (the calibration's domain) and on as many
out-of-domain sentences (tngraph.data.outside_sentences: the part set aside for reports), the cut in
1 - mean cos, the steps taken and the healing time (this machine, --threads threads). Variants heal
on the default healing data (tngraph.data.healing_pool: built-in sentences outside the evaluation
set spread among three times as many sentences of other packages' docstrings, neither the
calibration's source nor the out-of-domain set's; as many texts as the longest run can use), except
"stdlib-only": the built-in sentences alone.
The other variants change one HealConfig option each (RUNS): steps, batch size (as many texts in
twice the steps), healing one block at a time (`blocks`: 1,000 steps per block, about the default's
time; `blocks-500`), learning rate and warm-up, the weight of the pooled embeddings' 1 - cos
(pooled-x10), the batch's sentence-to-sentence cosines (similarities), only the factors training,
only the last hidden state matched.

  python tools/bench_heal.py [--artifact DIR] [--runs default,stdlib-only,factors-only,last-layer,...] [--eval-samples 2000]
                             [--outside-part report|tune]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, ".")

import torch  # noqa: E402

import tngraph  # noqa: E402
from tngraph.api import heal_config  # noqa: E402
from tngraph.data import HEALING_SHARE, healing_pool, outside_sentences, sentence_sets  # noqa: E402
from tngraph.evaluate import agreement, sentence_embeddings  # noqa: E402
from tngraph.heal import HealConfig, heal  # noqa: E402
from tngraph.models import MINILM_INCLUDE, ModelSource, load_model  # noqa: E402

# label: HealConfig overrides of the default (Config's heal_steps / heal_lr); "stdlib-only" changes the texts instead
RUNS = {
    "default": {},
    "stdlib-only": {},
    "factors-only": dict(train_norms=False),
    "last-layer": dict(layers=False),
    "half-steps": dict(steps=250),
    "steps-800": dict(steps=800),
    "steps-2400": dict(steps=2400),
    "steps-6000": dict(steps=6000),  # how far healing goes (docs/healing.md, "How far healing goes")
    "steps-10000": dict(steps=10000),
    "batch-16": dict(batch_size=16, steps=1400, eval_every=100),  # the default's texts, in half-size batches
    "lr-2e-4": dict(lr=2e-4, warmup=0.2),
    "blocks": dict(scope="blocks", steps=1000),  # one block at a time (--heal-scope blocks), 1,000 steps each
    "blocks-500": dict(scope="blocks", steps=500),
    "pooled-x10": dict(pooled_weight=10.0),
    "similarities": dict(similarity_weight=10.0),
}


def scores(model, tokenizer, held: dict, refs: dict) -> dict:
    return {k: agreement(refs[k], sentence_embeddings(model, tokenizer, v)) for k, v in held.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", help="a compressed MiniLM artifact (default: compress one now, ~3 min)")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--mlp", default="auto", choices=("auto", "lowrank", "prune"),
                   help="the feed-forward blocks: auto (the default pipeline: a text encoder's pruned by neurons), or lowrank "
                        "(what the results measured before 2026-12-07 used; docs/formats.md)")
    p.add_argument("--runs", default="default,factors-only,last-layer", help=f"comma-separated, from {', '.join(RUNS)}")
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--outside-part", choices=("report", "tune"), default="report",
                   help="which half of the out-of-domain set scores: the one set aside for reports (default), or the one a "
                        "choice between variants may read (tngraph.data.outside_sentences)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        p.error(f"unknown run {unknown[0]!r}; choose from {', '.join(RUNS)}")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(ModelSource("minilm"))
    config = tngraph.Config(budget=args.budget, include=MINILM_INCLUDE, heal_steps=0, eval_samples=args.eval_samples, progress=False,
                            mlp=args.mlp)
    sets = sentence_sets(config.calibration_samples, config.eval_samples, config.seed, mix=config.calibration_mix)  # as `tngraph compress`
    if args.artifact:
        student = tngraph.load(args.artifact, model=model)  # onto a copy: `model` stays the dense teacher
        label = args.artifact
    else:
        start = time.perf_counter()
        student = tngraph.compress(model, calibration=sets.calibration, tokenizer=tokenizer, config=config)
        label = f"default pipeline, budget {args.budget:g}, mlp {args.mlp}, compressed in {time.perf_counter() - start:.0f}s"
    base = heal_config(config.replace(heal_steps=HealConfig().steps))  # 700: what the default chooses on this 2-core CPU
    configs = {r: dataclasses.replace(base, **RUNS[r]) for r in runs}
    most = max(c.texts_used for c in configs.values())
    texts = {mixed: healing_pool(sets.evaluation, share=None if mixed else 0.0, seed=config.seed, most=most) for mixed in (True, False)}
    held = {"in domain": sets.evaluation, "out of domain": outside_sentences(args.eval_samples, seed=0, part=args.outside_part)}
    refs = {k: sentence_embeddings(model, tokenizer, v) for k, v in held.items()}
    before = scores(student, tokenizer, held, refs)
    print(f"MiniLM ({label}); healing on {len(texts[True])} sentences, {HEALING_SHARE:g} of them from other packages (stdlib-only: "
          f"{len(texts[False])} built-in ones), agreement on "
          f"{before['in domain'].sentences} held-out stdlib and {before['out of domain'].sentences} out-of-domain sentences; "
          f"{torch.get_num_threads()} threads")
    print(f"{'run':14} {'steps':>5} {'best':>5} {'seconds':>7}" + "".join(f" {k + ': mean cos':>24} {'cut':>6} {'top-10':>17}" for k in held))
    for run in runs:
        cfg = configs[run]
        healed = copy.deepcopy(student)
        result = heal(healed, model, texts[run != "stdlib-only"], tokenizer, cfg, show=sys.stderr.isatty())
        after = scores(healed, tokenizer, held, refs)
        cells = ""
        for k in held:
            b, a = before[k], after[k]
            cut = 1 - (1 - a.mean_cos) / (1 - b.mean_cos)
            cells += f" {b.mean_cos:>15.4f}->{a.mean_cos:.4f} {cut:>6.1%} {b.top10_overlap:>8.4f}->{a.top10_overlap:.4f}"
        print(f"{run:14} {result.steps:>5} {result.best_step:>5} {result.seconds:>7.0f}{cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
