#!/usr/bin/env python
"""Quality against stored bytes of the MiniLM's 36 encoder linears, every method in one run: the
first half of issue 25's Pareto bench (quality only; allocation, execution and latency come later).

Each method replaces every encoder linear's weight by its approximation W' (simulated: the weights
are dequantized in place), and the sentence embeddings are compared with the dense model's on
held-out text from the standard library (the calibration domain, other sentences) and from the
docstrings of third-party packages (another domain: tngraph.data.outside_sentences). Bytes are
everything stored for the 36 layers (codes, fp16 scales and zero points, fp16 factors, fp16
biases) as a fraction of their fp32 bytes (weights + biases x 4), as EVALUATION.md counts them.

Methods: fp16; int8 per channel and int4 (groups of 32 and 128) by round to nearest; GPTQ-style
error feedback (tngraph.tn.quant.gptq, on the calibration Gram); whitened low rank alone (fp16
factors); low-rank-compensated quantization (W ~= Q(W - L) + L, tngraph.tn.quant.compensated);
torch.ao dynamic int8 (`quantize_dynamic`, activations quantized too); and allocated plans at 25 %,
12.5 % and 6.25 % of the bytes, each layer choosing its bits, group and compensating rank from
CANDIDATES so that the summed output error ||(W - W') S||^2 of the layers is least within the bytes
(tngraph.passes.allocate.solve_budget): the allocation over format x rank x bits of issue 25, tried
here before it enters the passes.

  python tools/bench_quant.py [--calibration 256] [--eval 1000]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, ".")

import torch  # noqa: E402

from tngraph.data import outside_sentences, sentence_sets  # noqa: E402
from tngraph.evaluate import agreement, sentence_embeddings  # noqa: E402
from tngraph.models import ModelSource, load_model  # noqa: E402
from tngraph.tn import decompose_lowrank  # noqa: E402
from tngraph.tn.quant import QuantSpec, compensated, gptq, rtn  # noqa: E402
from tngraph.tn.whitening import whitening_from_gram  # noqa: E402


def encoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if n.startswith("encoder.") and isinstance(m, torch.nn.Linear)}


@torch.no_grad()
def grams(model: torch.nn.Module, tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """X^T X of the real (unpadded) tokens reaching each encoder linear."""
    out, hooks = {}, []
    for name, m in encoder_linears(model).items():
        out[name] = torch.zeros(m.in_features, m.in_features, dtype=torch.float64)

        def hook(module, args, result, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            out[name] += x.T @ x
        hooks.append(m.register_forward_hook(hook))
    for text in texts:  # one sentence at a time: no padding rows
        model(**tokenizer(text, return_tensors="pt", truncation=True, max_length=128))
    for h in hooks:
        h.remove()
    return out


def lowrank_rank(out: int, inp: int, fraction: float, bias: int) -> int:
    """The largest rank whose fp16 factors and fp16 bias fit `fraction` of the fp32 bytes."""
    budget = fraction * 4 * (out * inp + bias)
    return max(1, int((budget - 2 * bias) // (2 * (out + inp))))


def methods(fraction_points: list[float]) -> dict[str, callable]:
    """name -> (layer path, weight, gram, bias size) -> (W', stored bytes)."""
    def q(spec, method):
        def run(path, w, g, nb):
            qt = gptq(w, spec, g) if method == "gptq" else rtn(w, spec)
            return qt.dequantize(), qt.nbytes() + 2 * nb
        return run

    def lowrank(frac):
        def run(path, w, g, nb):
            r = lowrank_rank(*w.shape, frac, nb)
            a, b = decompose_lowrank(w, r, whitening_from_gram(g))
            return (a.half().float() @ b.half().float()), 2 * (a.numel() + b.numel()) + 2 * nb
        return run

    def comp(spec, frac):
        def run(path, w, g, nb):
            base = rtn(w, spec).nbytes() + 2 * nb
            room = frac * 4 * (w.numel() + nb) - base
            r = max(1, int(room // (2 * sum(w.shape))))
            c = compensated(w, spec, r, g)
            return c.dequantize(), c.nbytes() + 2 * nb
        return run

    table = {
        "fp16": lambda path, w, g, nb: (w.half().float(), 2 * w.numel() + 2 * nb),
        "int8 rtn per channel": q(QuantSpec(8), "rtn"),
        "int8 gptq per channel": q(QuantSpec(8), "gptq"),
        "int4 rtn g32": q(QuantSpec(4, 32), "rtn"),
        "int4 rtn g128": q(QuantSpec(4, 128), "rtn"),
        "int4 gptq g128": q(QuantSpec(4, 128), "gptq"),
        "int4 gptq g32": q(QuantSpec(4, 32), "gptq"),
        "int3 gptq g32": q(QuantSpec(3, 32), "gptq"),
        "int2 gptq g32": q(QuantSpec(2, 32), "gptq"),
    }
    for frac in fraction_points:
        table[f"lowrank fp16 @{frac:.4g}"] = lowrank(frac)
    table["int4 g128 + lowrank @0.17"] = comp(QuantSpec(4, 128), 0.17)
    table["int3 g128 + lowrank @0.125"] = comp(QuantSpec(3, 128), 0.125)
    table["int2 g64 + lowrank @0.0938"] = comp(QuantSpec(2, 64), 0.09375)
    return table


# the candidates each layer chooses from in the allocated plans: (bits, group, compensating rank)
CANDIDATES = [(8, None, 0), (4, 32, 0), (4, 64, 0), (4, 128, 0), (3, 32, 0), (3, 64, 0), (3, 128, 0), (2, 32, 0), (2, 64, 0),
              (4, 128, 8), (3, 128, 8), (3, 128, 16)]


def candidate(w: torch.Tensor, gram: torch.Tensor, bits: int, group: int | None, rank: int) -> tuple[torch.Tensor, int]:
    """W' and its stored bytes (bias aside) for one candidate: GPTQ, compensated by `rank` when > 0."""
    spec = QuantSpec(bits, group)
    if rank:
        c = compensated(w, spec, rank, gram)
        return c.dequantize(), c.nbytes()
    q = gptq(w, spec, gram)
    return q.dequantize(), q.nbytes()


def allocated(model: torch.nn.Module, stats: dict[str, torch.Tensor], fractions: list[float]) -> dict[str, dict[str, int]]:
    """Per byte fraction, each layer's candidate index: the summed output error
    ||(W - W') S||^2 (S S^T the layer's Gram, in the units of its own inputs) least with the bytes
    within the fraction of the fp32 bytes (tngraph.passes.allocate.solve_budget)."""
    from tngraph.passes.allocate import solve_budget

    names, costs, losses = [], [], []
    for name, m in encoder_linears(model).items():
        w, g = m.weight.detach(), stats[name]
        row_cost, row_loss = [], []
        for bits, group, rank in CANDIDATES:
            approx, nbytes = candidate(w, g, bits, group, rank)
            d = (w.double() - approx.double())
            row_cost.append(nbytes + 2 * m.bias.numel())
            row_loss.append(float(torch.einsum("oi,ij,oj->", d, g, d)))
        names.append(name)
        costs.append(row_cost)
        losses.append(row_loss)
    fp32 = sum(4 * (m.weight.numel() + m.bias.numel()) for m in encoder_linears(model).values())
    return {f"{frac:.4g}": dict(zip(names, solve_budget(costs, losses, frac * fp32))) for frac in fractions}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibration", type=int, default=256, help="calibration sentences (standard library; default 256)")
    p.add_argument("--eval", type=int, default=1000, help="held-out sentences per domain (default 1000)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated method names to run (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = load_model(ModelSource("minilm"))
    model.eval()
    sets = sentence_sets(calibration=args.calibration, evaluation=args.eval, seed=0)
    held = {"stdlib (in domain)": sets.evaluation, "packages (out of domain)": outside_sentences(args.eval, seed=0)}
    stats = grams(model, tokenizer, sets.calibration)
    dense = {k: sentence_embeddings(model, tokenizer, v) for k, v in held.items()}
    linears = encoder_linears(model)
    fp32_bytes = sum(4 * (m.weight.numel() + m.bias.numel()) for m in linears.values())
    table = methods([0.25, 0.125, 0.0625])
    for frac, choice in allocated(model, stats, [0.25, 0.125, 0.0625]).items():
        def plan(path, w, g, nb, choice=choice):
            approx, nbytes = candidate(w, g, *CANDIDATES[choice[path]])
            return approx, nbytes + 2 * nb
        mix = sorted({CANDIDATES[i] for i in choice.values()})
        table[f"allocated @{frac}"] = plan
        print(f"  allocated @{frac}: " + ", ".join(f"{b}-bit g{g or 'ch'}{f' +r{r}' if r else ''} x{sum(1 for i in choice.values() if CANDIDATES[i] == (b, g, r))}"
                                                  for b, g, r in mix), file=sys.stderr, flush=True)
    chosen = [n.strip() for n in args.only.split(",") if n.strip()] or list(table)
    rows = []
    for name in chosen:
        t0 = time.perf_counter()
        trial, stored = copy.deepcopy(model), 0
        with torch.no_grad():
            for path, m in encoder_linears(trial).items():
                approx, nbytes = table[name](path, m.weight.detach(), stats[path], m.bias.numel())
                m.weight.copy_(approx.to(m.weight.dtype))
                stored += nbytes
        scores = [agreement(dense[k], sentence_embeddings(trial, tokenizer, v)) for k, v in held.items()]
        rows.append((name, stored / fp32_bytes, scores, time.perf_counter() - t0))
        print(f"  {name}: {stored / fp32_bytes:.4f} of the bytes ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    # torch.ao dynamic int8: activations quantized per batch too, weights int8 per channel
    if not args.only:
        t0 = time.perf_counter()
        qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        scores = [agreement(dense[k], sentence_embeddings(qmodel, tokenizer, v)) for k, v in held.items()]
        # int8 codes + fp32 bias + one fp32 scale per output channel (torch.ao's default keeps one per tensor: a bound)
        stored = sum(m.weight.numel() + 4 * (m.out_features + m.out_features) for m in linears.values())
        rows.append(("torch.ao dynamic int8", stored / fp32_bytes, scores, time.perf_counter() - t0))
    print(f"\nMiniLM, 36 encoder linears ({fp32_bytes / 2**20:.1f} MiB fp32); calibration {len(sets.calibration)} stdlib sentences; "
          f"held out {args.eval} per domain; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{time.perf_counter() - started:.0f} s in all\n")
    domains = list(held)
    print("| method | bytes of fp32 | " + " | ".join(f"{d}: mean cos | top-10" for d in domains) + " |")
    print("|---|---|" + "---|---|" * len(domains))
    for name, frac, scores, _ in sorted(rows, key=lambda r: -r[1]):
        print(f"| {name} | {frac:.4f} | " + " | ".join(f"{s.mean_cos:.4f} | {s.top10_overlap:.3f}" for s in scores) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
