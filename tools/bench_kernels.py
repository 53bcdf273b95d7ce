#!/usr/bin/env python
"""Fused low-rank kernels vs the unfused chain vs dense cuBLAS on Qwen3-32B shapes (random weights).

Per shape (in x out), kept fraction and row count m, measured in one run on the GPU: time of the
dense layer, of the unfused chain x·Bᵀ·Aᵀ (two cuBLAS GEMMs), of each Triton kernel (split-rank
for few rows, tiled) and of the dispatching op torch.ops.tngraph.lowrank; achieved GB/s, TFLOP/s and
the fraction of the memory-bandwidth bound (the bytes each must move / peak bandwidth, over its
time); then fused/chain and fused/dense time ratios. A second table does the same for the two-mode
tensor-network layers (TT, TR, CP, Tucker): dense vs the einsum reference vs the kernel path.
Before timing, every kernel's output is compared with the float32 chain (einsum) at that shape;
a result off by more than --tolerance (relative to the largest |value|) is listed at the end and
the script exits with 1, so a table is never printed for a wrong kernel without saying so.

  python tools/bench_kernels.py [--dtype fp16|bf16|fp32] [--rows 1 16 128 2048] [--json FILE]

--device cpu (with TRITON_INTERPRET=1, small --shapes) runs every step in triton's interpreter with
a wall-clock timer: a smoke run of the script (the tests do it), whose numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from tngraph.tn import rank_for_budget  # noqa: E402

QWEN3_32B = ["5120x5120", "5120x25600", "25600x5120"]  # attention o_proj, MLP up, MLP down


def timer(device: str):
    """ms per call of fn: triton's do_bench on the GPU; on the CPU (smoke runs) the median of 3 calls."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench
    import statistics
    import time

    def bench(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--shapes", nargs="+", default=QWEN3_32B, help="IN x OUT, e.g. 5120x25600")
    p.add_argument("--kept", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--rows", nargs="+", type=int, default=[1, 16, 128, 2048])
    p.add_argument("--peak-gbps", type=float, default=4800.0, help="peak memory bandwidth (H200: 4800 GB/s)")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--formats", nargs="*", default=["tt", "tr", "cp", "tucker"],
                   help="two-mode network formats for the second table (none: skip it)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke run in triton's interpreter")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest |kernel - fp32 reference| / max |reference| accepted (default 1e-4 fp32, 2e-2 fp16/bf16)")
    args = p.parse_args(argv)
    import os

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (the kernels run on the CPU only in triton's interpreter); "
              "tools/bench_lowrank.py times dense vs chain on the CPU", file=sys.stderr)
        return 2
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("bench_kernels: --device cpu runs the kernels in triton's interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    bench, device = timer(args.device), args.device

    from tngraph.ops import load_kernels  # registers torch.ops.tngraph

    kernels = load_kernels()

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    size = torch.tensor([], dtype=dtype).element_size()
    tolerance = args.tolerance if args.tolerance is not None else (1e-4 if dtype == torch.float32 else 2e-2)
    wrong: list[str] = []

    def check(label: str, out: torch.Tensor, ref: torch.Tensor) -> float:
        error = ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        if not error <= tolerance:
            wrong.append(f"{label}: relative error {error:.3g} > {tolerance:g}")
        return error
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU, triton interpreter (smoke run: times mean nothing)"
    print(f"{name} dtype={dtype} torch {torch.__version__} peak {args.peak_gbps:g} GB/s")
    header = (f"{'shape':>12} {'kept':>5} {'rank':>5} {'m':>5} | {'dense us':>9} {'bw%':>5} | {'chain us':>9} {'bw%':>5} | "
              f"{'split us':>9} {'bw%':>5} | {'tiled us':>9} {'bw%':>5} | {'op us':>8} {'bw%':>5} {'GB/s':>7} {'TF/s':>6} | {'op/chain':>8} {'op/dense':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    for shape in args.shapes:
        in_f, out_f = (int(v) for v in shape.lower().split("x"))
        w = torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f**0.5
        for kept in args.kept:
            r = rank_for_budget(out_f, in_f, kept)
            a = torch.randn(out_f, r, device=device, dtype=dtype) / r**0.5
            b = torch.randn(r, in_f, device=device, dtype=dtype) / in_f**0.5
            bias = torch.randn(out_f, device=device, dtype=dtype)
            for m in args.rows:
                x = torch.randn(m, in_f, device=device, dtype=dtype)
                io = (m * in_f + m * out_f) * size
                need = {"dense": out_f * in_f * size + io, "low": r * (out_f + in_f) * size + io}
                ref = F.linear(F.linear(x.float(), b.float()), a.float(), bias.float())
                fused = {"op": lambda: torch.ops.tngraph.lowrank(x, [a, b], bias, "none"), "tiled": lambda: kernels.tiled(x, b, a, bias)}
                if m <= 256:  # split-rank's scratch grows with the rows (K chunks x m x rank fp32); the dispatch stops at 128
                    fused["split"] = lambda: kernels.split_rank(x, b, a, bias)
                row = {"shape": shape, "kept": kept, "rank": r, "m": m}
                for name, fn in fused.items():  # checked at these m; timed where the dispatch might run them
                    row[f"{name}_rel_err"] = check(f"{name} {shape} kept {kept} m {m}", fn(), ref)
                timed = {"dense": (bench(lambda: F.linear(x, w, bias)), "dense"),
                         "chain": (bench(lambda: F.linear(F.linear(x, b), a, bias)), "low")}
                timed.update({name: (bench(fn), "low") for name, fn in fused.items() if name == "op" or m <= 256})
                for name, (ms, kind) in timed.items():
                    row[f"{name}_us"] = ms * 1e3
                    row[f"{name}_bw_frac"] = need[kind] / (args.peak_gbps * 1e9) / (ms * 1e-3)
                row["op_gbps"] = need["low"] / (row["op_us"] * 1e-6) / 1e9
                row["op_tflops"] = 2 * m * r * (in_f + out_f) / (row["op_us"] * 1e-6) / 1e12
                row["op_over_chain"] = row["op_us"] / row["chain_us"]
                row["op_over_dense"] = row["op_us"] / row["dense_us"]
                rows.append(row)

                def cell(name: str) -> str:
                    if f"{name}_us" not in row:
                        return f"{'-':>9} {'-':>5}"
                    return f"{row[f'{name}_us']:>9.1f} {100 * row[f'{name}_bw_frac']:>5.1f}"

                print(f"{shape:>12} {kept:>5.2f} {r:>5} {m:>5} | {cell('dense')} | {cell('chain')} | {cell('split')} | {cell('tiled')} | "
                      f"{row['op_us']:>8.1f} {100 * row['op_bw_frac']:>5.1f} {row['op_gbps']:>7.0f} {row['op_tflops']:>6.1f} | "
                      f"{row['op_over_chain']:>8.3f} {row['op_over_dense']:>8.3f}", flush=True)
    if any(scratch.counts.any() for scratch in kernels._workspaces.values()):  # each call must leave them zero
        wrong.append("split-rank left nonzero tickets/counters in its scratch")
    if args.formats:
        rows += _network_table(args, dtype, size, bench, device, check)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if wrong:
        print(f"\n{len(wrong)} kernel result(s) off the float32 reference:\n  " + "\n  ".join(wrong), file=sys.stderr)
        return 1
    print(f"\nevery kernel result within {tolerance:g} of the float32 reference (relative to its largest |value|)")
    return 0


def random_network(fmt: str, out_f: int, in_f: int, kept: float, device, dtype) -> tuple[str, list[torch.Tensor], list[int], int]:
    """Random cores of the shapes the two-mode `fmt` layer has at `kept` of the dense parameters
    (decomposing 25600 x 5120 weights would take longer than the benchmark; speed needs shapes only)."""
    from tngraph.tn.formats import FORMATS, rank_for_params
    from tngraph.tn.formats import tr as tr_format

    opts = {"tt": {"cores": 2}, "kron": {}, "tr": {"cores": 2, "ring": 2}, "cp": {"modes": 2}, "tucker": {"modes": 2}}[fmt]
    rank = rank_for_params(FORMATS[fmt], out_f, in_f, kept * out_f * in_f, **opts)
    (na, nb), (a, b) = tr_format._dims(out_f, in_f, 2)  # every format splits each side into two balanced factors
    if fmt in ("tt", "kron"):
        equation, shapes = "...ab,Aar,rBb->...AB", [(na, a, rank), (rank, nb, b)]
    elif fmt == "tr":
        r0, r1, _ = tr_format._bonds(out_f, in_f, rank, 2, 2)
        equation, shapes = "...ab,sAar,rBbs->...AB", [(r0, na, a, r1), (r1, nb, b, r0)]
    elif fmt == "cp":
        equation, shapes = "...ab,Ar,Br,ar,br->...AB", [(na, rank), (nb, rank), (a, rank), (b, rank)]
    else:
        rA, rB, ra, rb = (min(rank, n) for n in (na, nb, a, b))
        equation, shapes = "...ab,CDcd,AC,BD,ac,bd->...AB", [(rA, rB, ra, rb), (na, rA), (nb, rB), (a, ra), (b, rb)]
    cores = [torch.randn(s, device=device, dtype=dtype) / (s[-1] ** 0.5) for s in shapes]
    return equation, cores, [a, b], rank


def _network_table(args, dtype: torch.dtype, size: int, bench, device: str, check) -> list[dict]:
    """Two-mode tensor-network layers (args.formats) at the same shapes and budgets: dense, the
    unfused einsum and the kernel path of torch.ops.tngraph.network (tngraph/kernels/tt.py)."""
    from tngraph.ops import cached_network_plan, network_kernel, network_plan, network_reference

    print()
    header = (f"{'format':>7} {'shape':>12} {'kept':>5} {'rank':>5} {'m':>5} | {'dense us':>9} | {'einsum us':>9} {'bw%':>5} | "
              f"{'kernel us':>9} {'bw%':>5} | {'kern/einsum':>11} {'kern/dense':>10}")
    print(header)
    print("-" * len(header))
    rows = []
    for fmt in args.formats:
        for shape in args.shapes:
            in_f, out_f = (int(v) for v in shape.lower().split("x"))
            w = torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f**0.5
            for kept in args.kept:
                eq, cores, in_dims, rank = random_network(fmt, out_f, in_f, kept, device, dtype)
                plan = network_plan(eq, cores)
                assert not isinstance(plan, str), plan
                for m in args.rows:
                    x = torch.randn(m, in_f, device=device, dtype=dtype)
                    need = (sum(c.numel() for c in cores) + m * (in_f + out_f)) * size
                    ref = network_reference(x.float(), [c.float() for c in cores], eq, in_dims, out_f, None)
                    error = check(f"{fmt} kernel {shape} kept {kept} m {m}",
                                  network_kernel(x, cores, eq, out_f, None, cached_network_plan(eq, cores)), ref)
                    t_dense = bench(lambda: F.linear(x, w))
                    t_ein = bench(lambda: network_reference(x, cores, eq, in_dims, out_f, None))
                    t_kern = bench(lambda: network_kernel(x, cores, eq, out_f, None, cached_network_plan(eq, cores)))  # the op's CUDA path
                    bw = lambda ms: need / (args.peak_gbps * 1e9) / (ms * 1e-3)  # noqa: E731
                    row = {"format": fmt, "shape": shape, "kept": kept, "rank": rank, "m": m, "dense_us": t_dense * 1e3,
                           "einsum_us": t_ein * 1e3, "kernel_us": t_kern * 1e3, "einsum_bw_frac": bw(t_ein), "kernel_bw_frac": bw(t_kern),
                           "kernel_rel_err": error}
                    rows.append(row)
                    print(f"{fmt:>7} {shape:>12} {kept:>5.2f} {rank:>5} {m:>5} | {row['dense_us']:>9.1f} | {row['einsum_us']:>9.1f} "
                          f"{100 * row['einsum_bw_frac']:>5.1f} | {row['kernel_us']:>9.1f} {100 * row['kernel_bw_frac']:>5.1f} | "
                          f"{t_kern / t_ein:>11.3f} {t_kern / t_dense:>10.3f}", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
