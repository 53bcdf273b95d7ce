#!/usr/bin/env python
"""Write a Llama-shaped causal LM with random weights (config.json + safetensors shards) for tests
and benchmarks of block-by-block compression. Weights are written one tensor at a time, so making
a model larger than memory needs only one tensor's worth of it.

  python tools/make_synthetic_llm.py --out DIR [--hidden 1024 --intermediate 2816 --layers 16
         --heads 16 --kv-heads 16 --vocab 32000] [--shard-mb 500] [--seed 0] [--dtype float32]

The weights are N(0, 0.02) except the norms (ones); `--spectrum-decay D` gives each linear weight
singular values falling as (1 + i)^-D (i = index), closer to what trained models have than plain noise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-mb", type=float, default=500.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--spectrum-decay", type=float, default=0.0)
    args = p.parse_args(argv)
    from tngraph.synthetic import write_synthetic_llama

    info = write_synthetic_llama(args.out, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, heads=args.heads,
                                 kv_heads=args.kv_heads, vocab=args.vocab, shard_bytes=int(args.shard_mb * 1e6), seed=args.seed,
                                 dtype=args.dtype, spectrum_decay=args.spectrum_decay)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
