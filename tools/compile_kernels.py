#!/usr/bin/env python
"""Compile every Triton kernel of tngraph/kernels/ for a GPU target without a GPU (ahead of time).

Each kernel x autotune configuration x dtype x WIDE (int32 or int64 tile offsets, the launchers'
choice by tensor extent, tngraph/kernels/_common.needs_wide) goes through triton's whole CUDA pipeline (TTIR,
TTGIR, LLVM IR, PTX, ptxas -> cubin) for --target (default cuda:90:32, Hopper: H100/H200). Printed
per compilation: registers per thread and local (spill) bytes from the cubin (triton's cuobjdump),
shared memory, and the matrix instruction the PTX uses (wgmma: Hopper's warpgroup MMA; mma: the
warp-level mma.sync of earlier GPUs; none: no tensor cores, e.g. fp32 IEEE dots); the script fails
(exit 1) when a compilation fails or needs more shared memory than the target has per block
(227 KiB on Hopper). On the CPU this is what can be known of the kernels on the GPU before a GPU
session: they compile for it with the installed triton, and what they cost in registers and
shared memory. The tests run it for one configuration per kernel, both WIDE.

  python tools/compile_kernels.py [--target cuda:90:32] [--dtypes fp16 bf16 fp32] [--wide both|off|on] [--first]
                                  [--json FILE] [--ptx DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, ".")

# per kernel: (module, name, pointer element types by argument (T = the dtype compiled), fixed constexprs);
# every kernel also takes WIDE (int64 tile offsets), compiled False and True (--wide); a parameter
# named nowhere here is compiled as an i32 scalar
KERNELS = {
    "lowrank.split_rank": ("lowrank", "_split_rank_kernel", {"x_ptr": "T", "b_ptr": "T", "a_ptr": "T", "bias_ptr": "T", "y_ptr": "T",
                                                             "part_ptr": "fp32", "t_ptr": "T", "count_ptr": "i32"}, {"HAS_BIAS": True, "ACT": 1}),
    "lowrank.tiled": ("lowrank", "_tiled_kernel", {"x_ptr": "T", "b_ptr": "T", "a_ptr": "T", "bias_ptr": "T", "y_ptr": "T"},
                      {"HAS_BIAS": True, "ACT": 1}),
    "tt.tt2": ("tt", "_tt2_kernel", {"x_ptr": "T", "g1_ptr": "T", "g2_ptr": "T", "bias_ptr": "T", "y_ptr": "T"}, {"HAS_BIAS": True}),
    "quant.int4": ("quant", "_quant_kernel", {"x_ptr": "T", "c_ptr": "u8", "s_ptr": "fp16", "z_ptr": "u8", "bias_ptr": "T", "y_ptr": "T"},
                   {"HAS_BIAS": True, "BITS": 4}),
    "quant.int8": ("quant", "_quant_kernel", {"x_ptr": "T", "c_ptr": "i8", "s_ptr": "fp16", "z_ptr": "i8", "bias_ptr": "T", "y_ptr": "T"},
                   {"HAS_BIAS": True, "BITS": 8}),
}
SHARED_LIMIT = {90: 232448, 89: 101376, 80: 166912}  # bytes of shared memory one block may use, by compute capability


def compile_one(kernel: Any, pointers: dict[str, str], fixed: dict[str, Any], config: Any, dtype: str, target: Any) -> dict[str, Any]:
    """triton.compile of one JIT function for `target`; returns its resource use."""
    import triton

    fn = kernel.fn  # the autotuner's JIT function
    constants = {**fixed, **config.kwargs}
    signature = {}
    for p in fn.params:
        if p.name in constants:
            signature[p.name] = "constexpr"
        elif p.name in pointers:
            signature[p.name] = "*" + (dtype if pointers[p.name] == "T" else pointers[p.name])
        else:
            signature[p.name] = "i32"
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": config.num_warps, "num_stages": config.num_stages})
    started = time.perf_counter()
    compiled = triton.compile(src, target=target, options=options.__dict__)
    ptx = compiled.asm.get("ptx", "")
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "none"
    return {**resource_usage(compiled.asm["cubin"]), "shared": compiled.metadata.shared, "mma": mma,
            "seconds": time.perf_counter() - started, "cubin_bytes": len(compiled.asm["cubin"]), "ptx": ptx}


def resource_usage(cubin: bytes) -> dict[str, int | None]:
    """Registers per thread and local-memory bytes (spills) of a cubin, read by triton's own cuobjdump."""
    import re
    import subprocess
    import tempfile

    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=False).stdout
    found = re.search(r"REG:(\d+).*?LOCAL:(\d+)", text)
    return {"regs": int(found.group(1)), "local": int(found.group(2))} if found else {"regs": None, "local": None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="cuda:90:32", help="backend:capability:warp size (default cuda:90:32, Hopper)")
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16", "fp32"], choices=["fp16", "bf16", "fp32"])
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    p.add_argument("--wide", choices=["both", "off", "on"], default="both",
                   help="WIDE=False (int32 tile offsets, any tensor under 2**31 elements), True (int64) or both (default)")
    p.add_argument("--first", action="store_true", help="only the first autotune configuration of each kernel")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--ptx", metavar="DIR", help="also write each compilation's PTX to DIR (one file per kernel, dtype, config)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_kernels: unset TRITON_INTERPRET (the interpreter compiles nothing and keeps one configuration)", file=sys.stderr)
        return 2
    import warnings

    import triton
    from triton.backends.compiler import GPUTarget

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # triton 3.9's notice of a coming default

    from tngraph.ops import load_kernels

    backend, capability, warp = args.target.split(":")
    target = GPUTarget(backend, int(capability), int(warp))
    limit = SHARED_LIMIT.get(int(capability))
    print(f"triton {triton.__version__}, target {args.target}" + (f", shared memory limit {limit} B per block" if limit else ""))
    print(f"{'kernel':>20} {'dtype':>5} {'wide':>4} {'config':>44} {'warps':>5} | {'regs':>4} {'local B':>7} {'shared B':>9} "
          f"{'mma':>5} {'s':>5}")
    wides = {"both": [False, True], "off": [False], "on": [True]}[args.wide]
    rows, failed = [], 0
    for name in args.kernels:
        module, attr, pointers, fixed = KERNELS[name]
        kernel = getattr(load_kernels(module), attr)
        configs = kernel.configs[:1] if args.first else kernel.configs
        for dtype in args.dtypes:
            for wide in wides:
                for config in configs:
                    label = ",".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in config.kwargs.items())
                    row = {"kernel": name, "dtype": dtype, "wide": wide, "config": config.kwargs, "num_warps": config.num_warps}
                    head = f"{name:>20} {dtype:>5} {'yes' if wide else 'no':>4} {label:>44} {config.num_warps:>5} |"
                    try:
                        row.update(compile_one(kernel, pointers, {**fixed, "WIDE": wide}, config, dtype, target))
                    except Exception as exc:  # noqa: BLE001 (reported per compilation; the exit code says it failed)
                        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
                        failed += 1
                        print(f"{head} FAILED {row['error']}")
                        rows.append(row)
                        continue
                    ptx = row.pop("ptx")
                    if args.ptx:
                        os.makedirs(args.ptx, exist_ok=True)
                        stem = (f"{name}.{dtype}." + ("wide." if wide else "") + "_".join(f"{k}{v}" for k, v in row["config"].items())
                                + f".w{config.num_warps}")
                        with open(os.path.join(args.ptx, stem + ".ptx"), "w") as f:
                            f.write(ptx)
                    over = limit is not None and row["shared"] > limit
                    failed += over
                    print(f"{head} {row['regs']!s:>4} {row['local']!s:>7} {row['shared']:>9} {row['mma']:>5} {row['seconds']:>5.1f}"
                          + ("  over the shared-memory limit" if over else ""), flush=True)
                    rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print(f"{len(rows) - failed} of {len(rows)} compilations fit {args.target}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
