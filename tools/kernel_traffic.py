#!/usr/bin/env python
"""Bytes the low-rank kernels load per call at real shapes, counted in triton's interpreter (CPU).

For few rows the fused low-rank op is memory-bound: its floor is reading each weight once. This
runs the kernels in triton's interpreter (TRITON_INTERPRET=1, set here) on Qwen3-32B shapes with
random fp16 weights, with the grid they get on a GPU of --sms streaming multiprocessors (H200: 132),
and counts every load (tngraph.debug.traffic): per tensor, the bytes loaded over its size, and the
scratch bytes (split-rank's partial products and t). It says what a kernel asks of memory, not how
much of it a GPU's caches serve: loads over 1.00x of the weights come from L2/L1 at best.

  python tools/kernel_traffic.py [--shapes 5120x5120 5120x25600] [--kept 0.25 0.5] [--rows 1 16]
                                 [--kernels split_rank tiled] [--sms 132] [--json FILE]

The tiled kernel is slow in the interpreter (minutes per shape); it is off by default.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined
sys.path.insert(0, ".")

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["5120x5120", "5120x25600"], help="IN x OUT")
    p.add_argument("--kept", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--rows", nargs="+", type=int, default=[1, 16])
    p.add_argument("--kernels", nargs="+", default=["split_rank"], choices=["split_rank", "tiled"])
    p.add_argument("--sms", type=int, default=132, help="streaming multiprocessors of the GPU whose grid is used (H200: 132)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)

    from tngraph.debug.traffic import count_loads
    from tngraph.ops import load_kernels, lowrank_reference
    from tngraph.tn import rank_for_budget

    kernels = load_kernels()
    fill = kernels._programs_to_fill
    kernels._programs_to_fill = lambda device: 4 * args.sms  # the GPU's grid, not the interpreter's
    try:
        return _table(args, kernels, count_loads, lowrank_reference, rank_for_budget)
    finally:
        kernels._programs_to_fill = fill


def _table(args, kernels, count_loads, lowrank_reference, rank_for_budget) -> int:
    print(f"loads per call in triton's interpreter, fp16, grid of a {args.sms}-SM GPU (4 programs per SM)")
    header = (f"{'kernel':>10} {'shape':>11} {'kept':>5} {'rank':>5} {'m':>4} | {'weights MB':>10} {'loaded':>7} {'max/elt':>7} | "
              f"{'x loaded':>8} | {'scratch MB':>10} | {'all MB':>7} {'floor/all':>9} {'s':>5}")
    print(header)
    print("-" * len(header))
    rows = []
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        in_f, out_f = (int(v) for v in shape.lower().split("x"))
        for kept in args.kept:
            r = rank_for_budget(out_f, in_f, kept)
            b = (torch.randn(r, in_f, generator=g) / in_f**0.5).half()
            a = (torch.randn(out_f, r, generator=g) / r**0.5).half()
            bias = torch.randn(out_f, generator=g).half()
            for m in args.rows:
                x = torch.randn(m, in_f, generator=g).half()
                for name in args.kernels:
                    started = time.perf_counter()
                    with count_loads(x=x, b=b, a=a, bias=bias) as loads:
                        y = getattr(kernels, name)(x, b, a, bias)
                    seconds = time.perf_counter() - started
                    ref = lowrank_reference(x.float(), b.float(), a.float(), bias.float(), "none")
                    error = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                    weights = (b.numel() + a.numel()) * 2
                    loaded = (int(loads["b"].sum()) + int(loads["a"].sum())) * 2
                    floor = weights + (x.numel() + bias.numel()) * 2
                    total = loaded + (int(loads["x"].sum()) + int(loads["bias"].sum())) * 2 + loads.other_bytes
                    row = {"kernel": name, "shape": shape, "kept": kept, "rank": r, "m": m, "weight_bytes": weights,
                           "weight_bytes_loaded": loaded, "weight_max_loads": int(max(loads["b"].max(), loads["a"].max())),
                           "x_loads_per_element": float(loads["x"].mean()), "scratch_bytes_loaded": loads.other_bytes,
                           "bytes_loaded": total, "floor_over_loaded": floor / total, "rel_error": error, "seconds": seconds}
                    rows.append(row)
                    print(f"{name:>10} {shape:>11} {kept:>5.2f} {r:>5} {m:>4} | {weights / 1e6:>10.2f} {loaded / weights:>6.2f}x "
                          f"{row['weight_max_loads']:>7} | {row['x_loads_per_element']:>7.1f}x | {loads.other_bytes / 1e6:>10.2f} | "
                          f"{total / 1e6:>7.2f} {row['floor_over_loaded']:>9.3f} {seconds:>5.0f}", flush=True)
                    if not error < 2e-2:
                        print(f"kernel_traffic: {name} is off the reference by {error:.3g} (relative)", file=sys.stderr)
                        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
