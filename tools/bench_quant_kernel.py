#!/usr/bin/env python
"""The quantized layers' GPU GEMM (tngraph/kernels/quant.py) against dense cuBLAS on Qwen3-32B shapes.

Per shape (in x out), precision (int8 per channel, int4 in groups of 128) and row count m, measured
in one run on the GPU (random weights; speed does not depend on their values): time of the dense
fp16/bf16 layer (F.linear), of the reference path (the weight dequantized, then F.linear: what
runs without the kernel), and of the kernel (autotuned); the weight bytes each reads and the
kernel's time over dense. Before timing, the kernel's output is compared with the float32 product
of the dequantized weight; one off by more than --tolerance (relative to the largest |value|) is
listed and the script exits with 1.

  python tools/bench_quant_kernel.py [--dtype fp16|bf16] [--rows 1 16 128 2048] [--json FILE]

--device cpu (with TRITON_INTERPRET=1, small --shapes) is a smoke run in triton's interpreter (the
tests do it); its times mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import QWEN3_32B, timer  # noqa: E402  (the same shapes and timer as the low-rank kernels' bench)

PRECISIONS = {"int8": (8, 0), "int4 g128": (4, 128)}


def _layer(k: int, n: int, bits: int, group: int, device: str) -> dict[str, torch.Tensor]:
    """Random codes, scales and zero points of a quantized (n x k) layer, as tngraph stores them."""
    from tngraph.tn.quant import pack_rows

    g = torch.Generator().manual_seed(0)
    groups = k // group if group else 1
    if bits == 8:
        codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        zeros = torch.zeros(n, groups, dtype=torch.int8)
    else:
        codes = pack_rows(torch.randint(0, 2**bits, (n, k), generator=g).to(torch.uint8), bits)
        zeros = torch.randint(0, 2**bits, (n, groups), generator=g).to(torch.uint8)
    scales = (torch.rand(n, groups, generator=g) * 0.02 / 2**bits).to(torch.float16)
    return {"codes": codes.to(device), "scales": scales.to(device), "zeros": zeros.to(device)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 128, 2048])
    p.add_argument("--shapes", nargs="+", default=QWEN3_32B, help="in x out (default: Qwen3-32B's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tolerance", type=float, default=2e-2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from tngraph.ops import load_kernels
    from tngraph.tn.quant import dequantize_layer

    kernels = load_kernels("quant")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    bench = timer(args.device)
    rows, wrong = [], []
    print(f"{'shape':>11} {'precision':>10} {'m':>5} | {'dense ms':>9} {'deq+mm ms':>9} {'kernel ms':>9} | {'weight MB dense/q':>17} | kernel/dense")
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        for label, (bits, group) in PRECISIONS.items():
            if group and k % group:
                continue
            layer = _layer(k, n, bits, group, args.device)
            dense_w = dequantize_layer(layer["codes"], layer["scales"], layer["zeros"], bits, dtype)
            for m in args.rows:
                x = torch.randn(m, k, device=args.device, dtype=dtype)
                y = kernels.quant_matmul(x, layer["codes"], layer["scales"], layer["zeros"], bits)
                ref = x.float() @ dense_w.float().T
                err = float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                if err > args.tolerance:
                    wrong.append(f"{shape} {label} m={m}: relative error {err:.3g}")
                t_dense = bench(lambda: F.linear(x, dense_w))
                t_deq = bench(lambda: F.linear(x, dequantize_layer(layer["codes"], layer["scales"], layer["zeros"], bits, dtype)))
                t_kernel = bench(lambda: kernels.quant_matmul(x, layer["codes"], layer["scales"], layer["zeros"], bits))
                q_bytes = sum(t.numel() * t.element_size() for t in layer.values())
                row = {"shape": shape, "precision": label, "m": m, "dense_ms": t_dense, "dequant_mm_ms": t_deq, "kernel_ms": t_kernel,
                       "dense_weight_bytes": dense_w.numel() * dense_w.element_size(), "quant_bytes": q_bytes, "error": err}
                rows.append(row)
                print(f"{shape:>11} {label:>10} {m:>5} | {t_dense:>9.3f} {t_deq:>9.3f} {t_kernel:>9.3f} | "
                      f"{row['dense_weight_bytes'] / 1e6:>8.1f}/{q_bytes / 1e6:<8.1f} | {t_kernel / t_dense:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "rows": rows}, f, indent=2)
    for line in wrong:
        print(f"WRONG: {line}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
