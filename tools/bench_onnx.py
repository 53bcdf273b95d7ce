#!/usr/bin/env python
"""ONNX export of the bundled MiniLM, compressed vs dense: file size and onnxruntime latency.

Measured in one run: both models exported by tngraph.export_onnx (checker + onnxruntime against
PyTorch), then onnxruntime (CPU provider, --threads intra-op threads) latency at batch 32 x 128
tokens and batch 1 x 128, dense and compressed runs interleaved, median of --repeats after warm-up.
The compressed model is an artifact folder (--artifact DIR) or, by default, the MiniLM compressed
at --budget by the default pipeline without healing (healing changes values, not sizes or speed).
--dtype fp16|bf16 exports both in that precision (max abs diff then against the float32 PyTorch
model, sizes also against the dense float32 file); a bf16 file, which onnxruntime's CPU provider
cannot run, is checked through emulation and its latency is not measured.
An artifact with quantized layers (--bits) is exported twice: with onnxruntime's MatMulNBits (the
default, codes kept packed) and with ONNX's own operators only (--quant-ops standard, the weight
dequantized at load); each file's peak resident memory is measured in a process of its own that
loads it and runs it once at 1 x 128 (beside that of a process that only imports onnxruntime).

  python tools/bench_onnx.py [--artifact DIR] [--budget 0.5] [--dtype fp32] [--threads 2] [--repeats 20] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, ".")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", help="a `tngraph compress` folder of the MiniLM (default: compress one now)")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--mlp", default="auto", choices=("auto", "lowrank", "prune"),
                   help="the feed-forward blocks: auto (the default pipeline: a text encoder's pruned by neurons), or lowrank "
                        "(what the results measured before 2026-12-07 used; docs/formats.md)")
    p.add_argument("--calibration", type=int, default=512, help="calibration sentences when compressing here")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="precision of both files (default fp32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None, help="folder for the .onnx files (default: a temporary one)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    import torch

    import tngraph
    from tngraph.data import sentence_sets
    from tngraph.lowering.onnx import _session, text_inputs
    from tngraph.models import MINILM_INCLUDE, ModelSource, load_model

    torch.set_num_threads(args.threads)
    dense, tokenizer = load_model(ModelSource("minilm"))
    if args.artifact:
        compressed = tngraph.load(args.artifact)
    else:
        config = tngraph.Config(budget=args.budget, include=MINILM_INCLUDE, heal_steps=0, progress=False, mlp=args.mlp)
        calibration = sentence_sets(calibration=args.calibration, evaluation=10).calibration
        compressed = tngraph.compress(dense, calibration=calibration, tokenizer=tokenizer, config=config)
    folder = args.out or tempfile.mkdtemp(prefix="tngraph-onnx-")
    example = text_inputs(tokenizer, 2, 16)
    exports = {}
    from tngraph.layers import QUANT_LAYERS

    runs = [("dense", dense, "onnxruntime"), ("compressed", compressed, "onnxruntime")]
    if any(getattr(m, "layer_name", "") in QUANT_LAYERS for m in compressed.modules()):
        runs.append(("compressed, standard ops", compressed, "standard"))
    for name, model, quant_ops in runs:
        start = time.perf_counter()
        exports[name] = tngraph.export_onnx(model, example, os.path.join(folder, f"{name.replace(', ', '-').replace(' ', '_')}-{args.dtype}.onnx"),
                                            force=True, dtype=args.dtype, quant_ops=quant_ops)
        e = exports[name]
        print(f"{name} ({args.dtype}): {e.bytes / 1e6:.2f} MB, max abs diff vs float32 PyTorch {e.max_abs_diff:.2e}"
              f"{' (emulated: onnxruntime has no ' + args.dtype + ' kernels here)' if e.emulated else ''}, "
              f"exported and checked in {time.perf_counter() - start:.1f} s")
    dense_fp32 = exports["dense"].bytes
    if args.dtype != "fp32":
        dense_fp32 = tngraph.export_onnx(dense, example, os.path.join(folder, "dense-fp32.onnx"), force=True).bytes
        print(f"compressed {args.dtype} / dense fp32 file: {exports['compressed'].bytes / dense_fp32:.3f} "
              f"({exports['compressed'].bytes / 1e6:.2f} vs {dense_fp32 / 1e6:.2f} MB)")
    result = {"threads": args.threads, "budget": args.budget, "artifact": args.artifact, "dtype": args.dtype,
              "bytes": {n: e.bytes for n, e in exports.items()}, "dense_fp32_bytes": dense_fp32,
              "size_ratio": exports["compressed"].bytes / exports["dense"].bytes,
              "max_abs_diff": {n: e.max_abs_diff for n, e in exports.items()}, "latency": []}
    print(f"file size compressed / dense: {result['size_ratio']:.3f} ({exports['compressed'].bytes / 1e6:.2f} vs {exports['dense'].bytes / 1e6:.2f} MB)")
    if any(e.emulated for e in exports.values()):
        print(f"latency not measured: onnxruntime's CPU provider has no {args.dtype} kernels")
        return _write(args.json, result)
    resident = {name: _peak_rss_mb(str(e.path), args.threads) for name, e in exports.items()}
    result["peak_resident_mb"] = {**resident, "onnxruntime imported only": _peak_rss_mb(None, args.threads)}
    sessions = {name: _session(e.path, ["CPUExecutionProvider"], threads=args.threads) for name, e in exports.items()}
    print(f"onnxruntime {__import__('onnxruntime').__version__}, CPU provider, {args.threads} threads, median of {args.repeats}")
    print("| batch | " + " | ".join(f"{n} ms (/dense)" for n in sessions) + " |")
    print("|---|" + "---|" * len(sessions))
    for rows, length in ((32, 128), (1, 128)):
        g = np.random.default_rng(rows)
        feeds = {"input_ids": g.integers(1000, 20000, (rows, length)).astype(np.int64),
                 "attention_mask": np.ones((rows, length), np.int64), "token_type_ids": np.zeros((rows, length), np.int64)}
        feeds = {n: feeds[n] for n in exports["dense"].inputs}
        times: dict[str, list[float]] = {n: [] for n in sessions}
        for s in sessions.values():
            for _ in range(3):
                s.run(None, feeds)
        for _ in range(args.repeats):  # interleaved, so that drifts of a shared machine hit all alike
            for n, s in sessions.items():
                start = time.perf_counter()
                s.run(None, feeds)
                times[n].append(time.perf_counter() - start)
        med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        result["latency"].append({"rows": rows, "length": length, "dense_ms": med["dense"], "compressed_ms": med["compressed"],
                                  "ratio": med["compressed"] / med["dense"], "ms": med})
        print(f"| {rows} x {length} | " + " | ".join(f"{med[n]:.2f} ({med[n] / med['dense']:.3f})" for n in sessions) + " |")
    print("| peak resident MB, load + one run (onnxruntime alone: %.0f) | " % result["peak_resident_mb"]["onnxruntime imported only"]
          + " | ".join(f"{resident[n]:.0f}" for n in sessions) + " |")
    print("| file MB | " + " | ".join(f"{exports[n].bytes / 1e6:.2f}" for n in sessions) + " |")
    return _write(args.json, result)


_PEAK = """
import sys
import numpy as np, onnxruntime as ort
if sys.argv[1] != "-":
    o = ort.SessionOptions()
    o.intra_op_num_threads = int(sys.argv[2])
    s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.full((1, 128), 2000, np.int64), "attention_mask": np.ones((1, 128), np.int64),
             "token_type_ids": np.zeros((1, 128), np.int64)}
    s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))  # kB; ru_maxrss keeps the forking parent's
"""


def _peak_rss_mb(path: str | None, threads: int) -> float:
    """Peak resident MB of a fresh process that loads `path` in onnxruntime and runs it once (None:
    that only imports onnxruntime)."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", _PEAK, path or "-", str(threads)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / 1024


def _write(path: str | None, result: dict) -> int:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
