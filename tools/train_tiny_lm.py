#!/usr/bin/env python
"""Train the small Llama-shaped causal LM that the causal-LM side of tngraph is measured on.

  python tools/train_tiny_lm.py --out DIR [--preset default|test] [--steps N] [--minutes M]
                                [--threads 2] [--seed 0] [--force]
  python tools/train_tiny_lm.py --cached [--preset default]     # train into the cache once, print its folder

A byte-level BPE tokenizer (the `tokenizers` library) and a 4-layer, 256-wide Llama decoder (4.5 M
parameters, tied embeddings) trained on pydoc's topics and the standard library's docstrings; one
document in 20 is held out and scored (perplexity) at the end. The result is a Hugging Face folder:
config.json, model.safetensors, the tokenizer, and tngraph_tinylm.json (settings, loss, held-out
perplexity, time). The run is deterministic for a preset, seed and thread count; `--minutes` caps it
(a capped run says so in tngraph_tinylm.json). The default preset takes about 12 minutes on 2 CPU
cores, `--preset test` (2 layers, 64 wide) about 20 seconds. Keep trained models out of the
repository: `--cached` keeps them in $TNGRAPH_CACHE (default ~/.cache/tngraph).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="folder to write (refused if it exists, unless --force)")
    where.add_argument("--cached", action="store_true", help="train into the cache folder unless it is there; print its path")
    p.add_argument("--preset", default="default", help="default (about 12 min on 2 cores) or test (about 20 s)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this many minutes even if steps remain")
    p.add_argument("--seed", type=int, default=None, help="seed of the initialisation and the batches (default 0)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2; results depend on it)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from tngraph import tinylm
    from tngraph.errors import TngraphError

    if args.threads < 1:
        print("train_tiny_lm: error: --threads must be at least 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        if args.cached:
            if args.steps is not None or args.seed is not None or args.minutes is not None:
                print("train_tiny_lm: error: --cached trains the preset as it is (no --steps/--seed/--minutes)", file=sys.stderr)
                return 2
            print(tinylm.cached(args.preset, show=not args.quiet))
            return 0
        spec = tinylm.spec_for(args.preset, steps=args.steps, seed=args.seed)
        meta = tinylm.train(spec, args.out, minutes=args.minutes, force=args.force, show=not args.quiet)
    except TngraphError as exc:
        print(f"train_tiny_lm: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: meta[k] for k in ("steps_done", "cut_by_minutes", "final_loss", "heldout_perplexity", "train_seconds")}))
    print(f"model: {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
