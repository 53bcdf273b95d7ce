#!/usr/bin/env python
"""Every tensor-network format side by side, at 25 % and 50 % of the parameters kept.

Per format and kept fraction, from one run:
- MiniLM: parameters kept, mean relative whitened output error ||(W - W') X^T|| / ||W X^T|| over
  the 36 encoder linears (X: the calibration activations reaching each layer), end-to-end sentence
  embedding agreement (mean cos, top-10 overlap) on held-out sentences, and the compress time;
- random matrices of real LLM shapes (Qwen3-32B: 5120 -> 5120 and 5120 -> 25600): CPU time of
  `contract(x)` against the dense matmul for m rows, as a ratio (values do not matter for speed, so
  the networks are built with random cores of the shapes each format chooses);
- tensorly-torch's FactorizedLinear (tucker, cp, blocktt) at equal parameters, when installed
  (`pip install tensorly tensorly-torch`; see tools/tltorch_baseline.py).

  python tools/bench_formats.py [--eval-samples 500] [--shapes 5120x5120 5120x25600] [--rows 1 32 4096]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.utils import benchmark  # noqa: E402

import tngraph  # noqa: E402
from tngraph.data import sentence_sets  # noqa: E402
from tngraph.evaluate import agreement, sentence_embeddings  # noqa: E402
from tngraph.models import MINILM_INCLUDE, ModelSource, load_model  # noqa: E402
from tngraph.tn.formats import FORMATS, rank_for_params  # noqa: E402
from tngraph.layers import LAYERS  # noqa: E402
from tngraph.tn.network import TensorNetwork, labels  # noqa: E402

# name shown -> (Config options, FORMATS key, decompose options)
VARIANTS = {
    "svd": ({"format": "lowrank"}, "svd", {}),
    "svd uniform": ({"format": "lowrank", "allocation": "uniform"}, "svd", {}),  # the allocation the other formats get by default
    "tucker-2x2": ({"format": "tucker"}, "tucker", {"modes": 2}),
    "tucker-2x2 hooi-2": ({"format": "tucker", "tucker_iters": 2}, "tucker", {"modes": 2, "iters": 2}),
    "tt-2": ({"format": "tt"}, "tt", {"cores": 2}),
    "tt-3": ({"format": "tt", "tt_cores": 3}, "tt", {"cores": 3}),
    "tr-3": ({"format": "tr"}, "tr", {"cores": 3, "ring": 2}),
    "tr-3 als-3": ({"format": "tr", "tr_als": 3}, "tr", {"cores": 3, "ring": 2, "als": 3}),
    "cp-2x2": ({"format": "cp"}, "cp", {"modes": 2}),
    "kron": ({"format": "kron"}, "kron", {}),
    "monarch": ({"format": "monarch"}, "monarch", {}),
    "lrbd": ({"format": "lrbd"}, "lrbd", {}),  # a defined layer (tngraph.layers), not a tensor network
}
TLTORCH_KINDS = ("tucker", "cp", "blocktt")


def layer_errors(result, model) -> float:
    """The mean over the factorized targets of ||(W - W')X^T|| / ||W X^T|| on the calibration data: what
    the numerical guard recorded for each (compress releases the Grams once the passes have run)."""
    errors = result.context.analysis.get("guard", {})
    measured = [errors[name] for name in result.context.plan if name in errors]
    return sum(measured) / len(measured)


@contextlib.contextmanager
def random_svd():
    """torch.linalg.svd returning random factors of the right shapes: the network a format builds
    at a rank has the same shapes whatever the weight, and speed does not depend on values."""
    real = torch.linalg.svd

    def fake(a, full_matrices=True, **_):
        *batch, m, n = a.shape
        k = min(m, n)
        return (torch.randn(*batch, m, k, dtype=a.dtype) / m**0.5, torch.ones(*batch, k, dtype=a.dtype),
                torch.randn(*batch, k, n, dtype=a.dtype) / n**0.5)

    torch.linalg.svd = fake
    try:
        yield
    finally:
        torch.linalg.svd = real


class LayerTiming:
    """A defined layer's factors with the three things the timing table reads of a network."""

    def __init__(self, key: str, factors: dict, in_features: int):
        self.layer, self.factors = LAYERS[FORMATS[key].layer], [factors[k] for k in LAYERS[FORMATS[key].layer].factors]
        self.num_params = sum(t.numel() for t in self.factors)
        self.in_features = in_features

    def contract(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.reference(x, self.factors, None)

    def flops(self, rows: int) -> int:
        return 2 * rows * self.num_params  # every factor entry is one multiply-add per input row


def timing_network(key: str, w: torch.Tensor, rank: int, options: dict) -> TensorNetwork | LayerTiming:
    if key == "cp":  # ALS at these ranks would take hours; the factors' shapes are what timing needs
        from tngraph.tn.formats.cp import _dims

        out_dims, in_dims = _dims(*w.shape, options.get("modes", 2))
        sizes = [*out_dims, *in_dims]
        modes, r = labels(len(sizes)), labels(1, skip=labels(len(sizes)))
        cores = [torch.randn(n, rank) / n**0.5 for n in sizes]
        return TensorNetwork(cores, [m + r for m in modes], in_dims, out_dims, modes[len(out_dims):], modes[: len(out_dims)], format="cp")
    timing_options = {k: v for k, v in options.items() if k != "als"}
    with random_svd():
        made = FORMATS[key].decompose(w, rank, None, **timing_options)
    return LayerTiming(key, made, w.shape[1]) if FORMATS[key].layer is not None else made


def median_time(stmt: str, env: dict, min_run_time: float) -> float:
    return benchmark.Timer(stmt, globals=env).blocked_autorange(min_run_time=min_run_time).median


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kept", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--calibration-samples", type=int, default=512)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--shapes", nargs="+", default=["5120x5120", "5120x25600"], help="IN x OUT random matrices for timing")
    p.add_argument("--rows", nargs="+", type=int, default=[1, 32, 4096])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-run-time", type=float, default=0.3)
    p.add_argument("--max-flop-ratio", type=float, default=8.0,
                   help="a cell planning more than this multiple of dense FLOPs and, at dense's FLOP rate, more "
                        "than --max-seconds per call shows 'fl Nx' (its FLOP ratio) instead of a time")
    p.add_argument("--max-seconds", type=float, default=3.0)
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--no-tltorch", action="store_true", help="leave out tensorly-torch even when installed")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tl = None
    if not args.no_tltorch:
        import tltorch_baseline

        tl = tltorch_baseline if tltorch_baseline.available() else None
        if tl is None:
            print("tensorly-torch not installed: its rows are left out (pip install tensorly tensorly-torch)")
    if not args.skip_minilm:
        model, tokenizer = load_model(ModelSource("minilm"))
        sets = sentence_sets(args.calibration_samples, args.eval_samples)
        ref = sentence_embeddings(model, tokenizer, sets.evaluation)
        print(f"MiniLM, {args.calibration_samples} calibration / {args.eval_samples} held-out sentences, {torch.get_num_threads()} threads, whitened")
        print(f"{'format':>22} {'kept':>5} {'params kept':>11} {'layer err':>9} {'mean cos':>9} {'min cos':>8} {'top-10':>7} {'seconds':>8}")
        for label in args.variants:
            options = VARIANTS[label][0]
            for kept in args.kept:
                config = tngraph.Config(budget=kept, include=MINILM_INCLUDE, heal_steps=0, progress=False, calibration_samples=args.calibration_samples,
                                        **{"mlp": "lowrank", **options})  # the formats compared on every target, blocks included
                start = time.perf_counter()
                try:
                    result = tngraph.compress_with_result(model, calibration=sets.calibration, tokenizer=tokenizer, config=config)
                except tngraph.TngraphError as exc:
                    print(f"{label:>22} {kept:>5.2f} failed: {exc}", flush=True)
                    continue
                seconds = time.perf_counter() - start
                before = sum(pl.params_before for pl in result.context.plan.values())
                after = sum(pl.params_after for pl in result.context.plan.values())
                agree = agreement(ref, sentence_embeddings(result.module, tokenizer, sets.evaluation))
                print(f"{label:>22} {kept:>5.2f} {after / before:>11.3f} {layer_errors(result, model):>9.4f} {agree.mean_cos:>9.4f} "
                      f"{agree.min_cos:>8.4f} {agree.top10_overlap:>7.4f} {seconds:>8.1f}", flush=True)
        if tl is not None:
            for kind in TLTORCH_KINDS:
                for kept in args.kept:
                    start = time.perf_counter()
                    compressed, before, after = tl.factorize_model(model, MINILM_INCLUDE[0], kind, kept)
                    seconds = time.perf_counter() - start
                    agree = agreement(ref, sentence_embeddings(compressed, tokenizer, sets.evaluation))
                    print(f"{'tltorch ' + kind:>22} {kept:>5.2f} {after / before:>11.3f} {'-':>9} {agree.mean_cos:>9.4f} "
                          f"{agree.min_cos:>8.4f} {agree.top10_overlap:>7.4f} {seconds:>8.1f}", flush=True)
        print()
    if args.skip_timing:
        return 0
    print(f"contract(x) vs dense x @ W.T, random weights, CPU fp32, {torch.get_num_threads()} threads: time ratio (format / dense)")
    print(f"{'shape in x out':>14} {'format':>22} {'kept':>5} {'params':>7} " + " ".join(f"{'m=' + str(m):>9}" for m in args.rows))
    for shape in args.shapes:
        in_f, out_f = (int(v) for v in shape.lower().split("x"))
        w = torch.randn(out_f, in_f) / in_f**0.5
        dense = {m: median_time("x @ w.T", {"x": torch.randn(m, in_f), "w": w}, args.min_run_time) for m in args.rows}
        rate = max(2 * m * in_f * out_f / dense[m] for m in args.rows)  # FLOP/s the dense matmul reached
        print(f"{shape:>14} {'dense (ms)':>22} {'':>5} {'':>7} " + " ".join(f"{dense[m] * 1e3:>9.2f}" for m in args.rows), flush=True)
        for label in args.variants:
            _, key, options = VARIANTS[label]
            if "als" in options or "iters" in options:  # same shapes as the variant without refinement
                continue
            fmt = FORMATS[key]
            for kept in args.kept:
                rank = rank_for_params(fmt, out_f, in_f, kept * out_f * in_f, **options)
                net = timing_network(key, w, rank, options)
                cells = []
                for m in args.rows:
                    flop_ratio = net.flops(m) / (2 * m * in_f * out_f)
                    if flop_ratio > args.max_flop_ratio and net.flops(m) / rate > args.max_seconds:
                        cells.append(f"{'fl ' + format(flop_ratio, '.0f') + 'x':>9}")  # certain to lose, minutes to time
                        continue
                    t = median_time("net.contract(x)", {"x": torch.randn(m, in_f), "net": net}, args.min_run_time)
                    cells.append(f"{t / dense[m]:>9.3f}")
                print(f"{shape:>14} {label:>22} {kept:>5.2f} {net.num_params / w.numel():>7.3f} " + " ".join(cells), flush=True)
        if tl is not None:
            for kind in TLTORCH_KINDS:
                for kept in args.kept:
                    if kind == "cp" and w.numel() > 2**24:
                        print(f"{shape:>14} {'tltorch ' + kind:>22} {kept:>5.2f}  not run: its forward allocates tens of GB at this size", flush=True)
                        continue
                    layer = tl.factorized_linear(w, kind, kept)
                    params = sum(v.numel() for n, v in layer.named_parameters() if "bias" not in n)
                    cells, slow = [], False
                    with torch.no_grad():
                        for m in args.rows:
                            if slow:  # slower than max-flop-ratio x dense at fewer rows: not timed at more
                                cells.append(f"{'>' + format(args.max_flop_ratio, 'g') + 'x':>9}")
                                continue
                            ratio = median_time("layer(x)", {"x": torch.randn(m, in_f), "layer": layer}, args.min_run_time) / dense[m]
                            slow = ratio > args.max_flop_ratio
                            cells.append(f"{ratio:>9.3f}")
                    print(f"{shape:>14} {'tltorch ' + kind:>22} {kept:>5.2f} {params / w.numel():>7.3f} " + " ".join(cells), flush=True)
        del w
    return 0


if __name__ == "__main__":
    sys.exit(main())
