#!/usr/bin/env python
"""Low-rank factor chain vs dense linear on real LLM shapes (Qwen3-32B), random weights.

Prints, per shape, kept fraction and row count m: median time of the dense layer and of the
unfused chain x·Bᵀ·Aᵀ, achieved GB/s and TFLOP/s, the fraction of the memory-bandwidth bound
(bytes moved / peak bandwidth, over the measured time), and the chain/dense time ratio, all
measured in one run. Fused kernels are added as a third column when they exist.

  python tools/bench_lowrank.py                      # GPU if present (fp16), else CPU (fp32, small m)
  python tools/bench_lowrank.py --device cpu --rows 1 16 --shapes 5120x5120
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.utils import benchmark

sys.path.insert(0, ".")
from tngraph.tn import rank_for_budget  # noqa: E402

QWEN3_32B = ["5120x5120", "5120x25600", "25600x5120"]  # in x out: attention o_proj, MLP up, MLP down


def _time(fn, min_run_time: float) -> float:
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None)
    p.add_argument("--shapes", nargs="+", default=QWEN3_32B, help="IN x OUT, e.g. 5120x25600")
    p.add_argument("--kept", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--rows", nargs="+", type=int, default=None)
    p.add_argument("--peak-gbps", type=float, default=4800.0, help="peak memory bandwidth (H200: 4800 GB/s)")
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("fp16" if gpu else "fp32")]
    rows_list = args.rows or ([1, 16, 128, 2048] if gpu else [1, 16, 128])
    torch.set_num_threads(args.threads)
    size = torch.tensor([], dtype=dtype).element_size()
    header = f"{'shape':>12} {'kept':>5} {'rank':>5} {'m':>5} | {'dense us':>9} {'GB/s':>7} {'TF/s':>6} {'bw%':>5} | {'chain us':>9} {'GB/s':>7} {'TF/s':>6} {'bw%':>5} | {'chain/dense':>11}"
    print(f"device={args.device} dtype={dtype} threads={torch.get_num_threads() if not gpu else '-'}")
    print(header)
    print("-" * len(header))
    out_rows = []
    for shape in args.shapes:
        in_f, out_f = (int(v) for v in shape.lower().split("x"))
        w = torch.randn(out_f, in_f, device=args.device, dtype=dtype) / in_f**0.5
        for kept in args.kept:
            r = rank_for_budget(out_f, in_f, kept)
            a = torch.randn(out_f, r, device=args.device, dtype=dtype) / r**0.5
            b = torch.randn(r, in_f, device=args.device, dtype=dtype) / in_f**0.5
            for m in rows_list:
                x = torch.randn(m, in_f, device=args.device, dtype=dtype)
                t_dense = _time(lambda: F.linear(x, w), args.min_run_time)
                t_chain = _time(lambda: F.linear(F.linear(x, b), a), args.min_run_time)
                io = (m * in_f + m * out_f) * size
                bytes_dense = out_f * in_f * size + io
                bytes_chain = r * (out_f + in_f) * size + io + 2 * m * r * size
                flops_dense = 2 * m * in_f * out_f
                flops_chain = 2 * m * r * (in_f + out_f)
                row = {
                    "shape": shape, "kept": kept, "rank": r, "m": m,
                    "dense_us": t_dense * 1e6, "chain_us": t_chain * 1e6,
                    "dense_gbps": bytes_dense / t_dense / 1e9, "chain_gbps": bytes_chain / t_chain / 1e9,
                    "dense_tflops": flops_dense / t_dense / 1e12, "chain_tflops": flops_chain / t_chain / 1e12,
                    "dense_bw_frac": bytes_dense / (args.peak_gbps * 1e9) / t_dense,
                    "chain_bw_frac": bytes_chain / (args.peak_gbps * 1e9) / t_chain,
                    "ratio": t_chain / t_dense,
                }
                out_rows.append(row)
                bw = lambda f: f"{100 * f:5.1f}" if gpu else "    -"  # noqa: E731
                print(
                    f"{shape:>12} {kept:>5.2f} {r:>5} {m:>5} | {row['dense_us']:>9.1f} {row['dense_gbps']:>7.1f} {row['dense_tflops']:>6.2f} {bw(row['dense_bw_frac'])} "
                    f"| {row['chain_us']:>9.1f} {row['chain_gbps']:>7.1f} {row['chain_tflops']:>6.2f} {bw(row['chain_bw_frac'])} | {row['ratio']:>11.3f}"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out_rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
