#!/usr/bin/env python
"""Quality, bytes and CPU latency of tngraph's allocated plans (structure x precision under one byte
budget) beside every single-method baseline, in one run (issue 25's Pareto bench).

MiniLM (its 36 encoder linears): mean cosine and top-10 neighbour overlap of the sentence embeddings
against the dense model's, on held-out standard-library sentences (the calibration domain) and on
third-party package docstrings (`tngraph.data.outside_sentences`, the part set aside for reports, never calibrated on). The trained
tiny LM (`tngraph.tinylm`, its decoder linears): held-out perplexity. Bytes: everything stored for
the target layers (codes, fp16 scales, zero points, factors, biases) over their fp32 weights and
biases.

Baselines: fp16; int8 per channel (round to nearest); int4 round to nearest in groups of 32 and
128; int4 GPTQ-style error feedback in groups of 128 (tngraph.tn.quant.gptq); torch.ao dynamic int8
(`quantize_dynamic`: activations quantized per tensor too); torchao's int8 dynamic-activation and
int8 weight-only configs (`quantize_`) when torchao is installed; HQQ when `hqq` is installed;
whitened low rank alone (tngraph's pipeline without --bits, byte budget). tngraph: `compress(...,
bits=(16, 8, 4, 2), budget=B)` at each budget (the byte budget, sensitivity as --sensitivity), and at
the largest budget and at torch.ao's own bytes also with bits=(8,), act_bits=8 (every layer runs int8 x int8).

Latency (MiniLM, CPU, --threads): median forward time at 32 x 128 and 1 x 128 tokens, torch.compile'd
(Inductor) for dense, torchao and tngraph (with `tngraph.compile_options(model)`, as the tngraph backend
compiles), eager for torch.ao (its quantized kernels are its own), same run.

  python tools/bench_pareto.py [--budgets 0.25,0.125,0.0625] [--sensitivity measured] [--refine 0] [--equal-bytes]
                               [--png docs/pareto.png]
                               [--skip-latency | --latency-only] [--skip-lm] [--lm-preset default]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, ".")

import torch  # noqa: E402

import tngraph  # noqa: E402
from tngraph.data import lm_documents, outside_sentences, passages, sentence_sets  # noqa: E402
from tngraph.evaluate import agreement, count_params, latency, latency_inputs, sentence_embeddings  # noqa: E402
from tngraph.models import MINILM_INCLUDE, ModelSource, load_model  # noqa: E402
from tngraph.tn.quant import QuantSpec, gptq, rtn  # noqa: E402

BASELINES = {  # name -> (spec, method); applied to every target weight in place (simulated: weights dequantized)
    "fp16": (QuantSpec(16), "rtn"),
    "int8 rtn per channel": (QuantSpec(8), "rtn"),
    "int4 rtn g32": (QuantSpec(4, 32), "rtn"),
    "int4 rtn g128": (QuantSpec(4, 128), "rtn"),
    "int4 gptq g128": (QuantSpec(4, 128), "gptq"),
}


def linears(model: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, torch.nn.Linear)}


@torch.no_grad()
def grams(model: torch.nn.Module, prefix: str, batches: list[dict]) -> dict[str, torch.Tensor]:
    """X^T X of the inputs reaching each target linear over the calibration batches (padding rows included)."""
    out, hooks = {}, []
    for name, m in linears(model, prefix).items():
        out[name] = torch.zeros(m.in_features, m.in_features, dtype=torch.float64)

        def hook(module, args, result, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            out[name] += x.T @ x
        hooks.append(m.register_forward_hook(hook))
    for batch in batches:
        model(**batch)
    for h in hooks:
        h.remove()
    return out


def baseline(model: torch.nn.Module, prefix: str, stats: dict, spec: QuantSpec, method: str) -> tuple[torch.nn.Module, int]:
    """A copy of `model` with every target weight quantized and dequantized in place, and the bytes
    that storing it takes (fp16 biases)."""
    trial, stored = copy.deepcopy(model), 0
    with torch.no_grad():
        for name, m in linears(trial, prefix).items():
            if spec.group and m.in_features % spec.group:  # a group wider than the layer (the small tiny LM): per channel
                spec = QuantSpec(spec.bits)
            q = gptq(m.weight, spec, stats[name]) if method == "gptq" else rtn(m.weight, spec)
            m.weight.copy_(q.dequantize())
            stored += q.nbytes() + 2 * (m.bias.numel() if m.bias is not None else 0)
    return trial, stored


def hqq_model(model: torch.nn.Module, prefix: str) -> tuple[torch.nn.Module, int] | None:
    """HQQ int4 g64 (half-quadratic, calibration-free) when the `hqq` package is installed."""
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    except ImportError:
        return None
    trial, stored = copy.deepcopy(model), 0
    config = BaseQuantizeConfig(nbits=4, group_size=64)
    for name, m in linears(trial, prefix).items():
        layer = HQQLinear(m, config, compute_dtype=torch.float32, device="cpu")
        parent, _, child = name.rpartition(".")
        setattr(trial.get_submodule(parent), child, layer)
        stored += m.weight.numel() // 2 + 4 * m.out_features * (m.in_features // 64) + 2 * m.out_features
    return trial, stored


def target_bytes(module: torch.nn.Module, names: list[str]) -> int:
    return count_params(module, tuple(names))[1]


EQUAL_BYTES = ("int4 gptq g128",)  # baselines tngraph is also allocated at the bytes of, with --equal-bytes


def minilm_rows(args, budgets: list[float]) -> tuple[list[dict], dict]:
    model, tok = load_model(ModelSource("minilm"))
    model.eval()
    sets = sentence_sets(calibration=args.calibration, evaluation=args.eval, seed=0)
    held = {"in": sets.evaluation, "out": outside_sentences(args.eval, seed=0)}
    dense = {k: sentence_embeddings(model, tok, v) for k, v in held.items()}
    names = list(linears(model, "encoder."))
    fp32 = target_bytes(model, names)
    calib = [tok(sets.calibration[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
             for i in range(0, len(sets.calibration), 32)]
    stats = grams(model, "encoder.", calib)
    models: dict[str, tuple[torch.nn.Module, float]] = {}
    for name, (spec, method) in BASELINES.items():
        trial, stored = baseline(model, "encoder.", stats, spec, method)
        models[name] = (trial, stored / fp32)
    for name, (m, stored) in int8_ecosystem(model, "encoder.").items():
        models[name] = (m, stored / fp32)
    hqq = hqq_model(model, "encoder.")
    if hqq is not None:
        models["hqq int4 g64"] = (hqq[0], hqq[1] / fp32)
    common = dict(calibration=sets.calibration, tokenizer=tok, source=ModelSource("minilm"))
    for budget in budgets:
        cfg = tngraph.Config(budget=budget, budget_kind="bytes", include=MINILM_INCLUDE, sensitivity=args.sensitivity, heal_steps=0,
                             progress=False, mlp="lowrank")  # low rank on every target, the feed-forward blocks too
        low = tngraph.compress(model, config=cfg, **common)
        models[f"low rank alone @{budget:g}"] = (low, target_bytes(low, names) / fp32)
    for budget, name in plan_budgets(budgets, models, args):
        cfg = tngraph.Config(budget=budget, bits=(16, 8, 4, 2), include=MINILM_INCLUDE, sensitivity=args.sensitivity, refine=args.refine,
                             heal_steps=0, progress=False)
        t0 = time.perf_counter()
        plan = tngraph.compress(model, config=cfg, **common)
        models[name] = (plan, target_bytes(plan, names) / fp32)
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    cfg = tngraph.Config(budget=max(budgets), bits=(16, 8, 4, 2), include=MINILM_INCLUDE, sensitivity=args.sensitivity,
                         refine=args.refine, heal_steps=0, progress=False)
    for name, fast in int8_plans(model, cfg, models["torch.ao dynamic int8"][1], common).items():
        models[name] = (fast, target_bytes(fast, names) / fp32)
    rows = []
    for name, (m, frac) in models.items():
        scores = {k: agreement(dense[k], sentence_embeddings(m, tok, v)) for k, v in held.items()}
        rows.append({"method": name, "bytes": frac, **{f"{k}_cos": s.mean_cos for k, s in scores.items()},
                     **{f"{k}_top10": s.top10_overlap for k, s in scores.items()}})
        print(f"  {name}: {frac:.4f} of the bytes, out-of-domain cos {rows[-1]['out_cos']:.4f}", file=sys.stderr, flush=True)
    timed = {} if args.skip_latency else minilm_latency(model, models, tok, args)
    return rows, timed


def plan_budgets(budgets: list[float], models: dict[str, tuple[torch.nn.Module, float]], args) -> list[tuple[float, str]]:
    """tngraph's byte budgets and the names of its plans there: each of `budgets`, and with
    --equal-bytes also each of EQUAL_BYTES' baselines' own bytes (the same bytes as the baseline, for
    a comparison that does not depend on where the budgets fall)."""
    out = [(b, f"tngraph @{b:g}") for b in budgets]
    for baseline_name in EQUAL_BYTES if args.equal_bytes else ():
        frac = models[baseline_name][1]
        out.append((frac, f"tngraph @{frac:.4f} ({baseline_name}'s bytes)"))
    return out


def int8_ecosystem(model: torch.nn.Module, prefix: str) -> dict[str, tuple[torch.nn.Module, int]]:
    """What a user tries first, with the bytes it stores for the target linears: torch.ao's dynamic
    int8 (`quantize_dynamic`, per-tensor activations; int8 weights, fp32 scale and zero point per
    channel, fp32 bias), and torchao's int8 dynamic-activation / int8 weight-only configs when torchao
    is installed (int8 weights, an fp32 scale per channel, fp32 bias)."""
    targets = linears(model, prefix).values()
    per_channel = sum(m.weight.numel() + 4 * m.out_features + 4 * (m.bias.numel() if m.bias is not None else 0) for m in targets)
    out = {"torch.ao dynamic int8": (torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8),
                                     per_channel + 4 * sum(m.out_features for m in targets))}
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return out
    for name, config in (("torchao int8 dynamic", Int8DynamicActivationInt8WeightConfig()), ("torchao int8 weight-only", Int8WeightOnlyConfig())):
        trial = copy.deepcopy(model)
        quantize_(trial.get_submodule(prefix.rstrip(".")), config)
        out[name] = (trial, per_channel)
    return out


def int8_plans(model: torch.nn.Module, cfg: tngraph.Config, ao_bytes: float, common: dict) -> dict[str, torch.nn.Module]:
    """tngraph's plans that run every layer as int8 x int8 (`--bits 8 --act-bits 8`: 8-bit codes, and
    8-bit quantized factors where the budget is below a layer's own int8 bytes): at the largest budget,
    and at torch.ao's own bytes (equal bytes)."""
    cfg = cfg.replace(bits=(8,), act_bits=8)
    plans = {f"tngraph @{cfg.budget:g}, --bits 8 --act-bits 8": tngraph.compress(model, config=cfg, **common)}
    if ao_bytes > cfg.budget:
        plans[f"tngraph @{ao_bytes:.4f} (torch.ao's bytes), --bits 8 --act-bits 8"] = tngraph.compress(model, config=cfg.replace(budget=ao_bytes),
                                                                                                      **common)
    return plans


def minilm_latency(model, models, tok, args) -> dict:
    """Median ms per forward at 32 x 128 and 1 x 128: dense (compiled and eager), torchao's and
    tngraph's models torch.compile'd, torch.ao eager."""
    chosen = {"dense": model, "dense, eager": model, **{k: m for k, (m, _) in models.items() if k.startswith(("torch.ao", "torchao", "tngraph"))}}
    compiled = {k: (m if k.startswith(("torch.ao", "dense, eager")) else torch.compile(m, options=tngraph.compile_options(m)))
                for k, m in chosen.items()}
    # every model here shares BertModel.forward's code: past dynamo's recompile limit (8 by default)
    # the last ones would fall back to eager for their second shape
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(compiled))
    out = {}
    with torch.no_grad():
        for batch in (32, 1):
            inputs = latency_inputs(tok.vocab_size, batch, 128, seed=0)
            for m in compiled.values():  # compile (and warm) outside the timing
                m(**inputs)
            seconds = latency(compiled, inputs, repeats=args.repeats)
            out[f"{batch}x128"] = {k: 1e3 * v for k, v in seconds.items()}
    return out


def latency_only(args, top: float) -> dict:
    """Only the timings: dense, torch.ao dynamic int8 and tngraph's plans at `top` (weight-only and
    with int8 activations), without the quality runs (for a quiet machine after them)."""
    model, tok = load_model(ModelSource("minilm"))
    model.eval()
    sets = sentence_sets(calibration=args.calibration, evaluation=8, seed=0)
    common = dict(calibration=sets.calibration, tokenizer=tok, source=ModelSource("minilm"))
    cfg = tngraph.Config(budget=top, bits=(16, 8, 4, 2), include=MINILM_INCLUDE, sensitivity=args.sensitivity, refine=args.refine,
                         heal_steps=0, progress=False)
    fp32 = target_bytes(model, list(linears(model, "encoder.")))
    models = {name: (m, stored / fp32) for name, (m, stored) in int8_ecosystem(model, "encoder.").items()}
    models[f"tngraph @{top:g}"] = (tngraph.compress(model, config=cfg, **common), 0.0)
    for name, fast in int8_plans(model, cfg, models["torch.ao dynamic int8"][1], common).items():
        models[name] = (fast, 0.0)
    return minilm_latency(model, models, tok, args)


def lm_rows(args, budgets: list[float]) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tngraph import tinylm
    from tngraph.lm import perplexity

    folder = tinylm.cached(args.lm_preset)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    text = lm_documents()
    heldout = "\n\n".join(text.heldout)
    calib_texts = passages(text.train)[: args.calibration]
    window = tinylm.spec_for(args.lm_preset).context
    names = list(linears(model, "model.layers."))
    fp32 = target_bytes(model, names)
    calib = [tok(calib_texts[i : i + 16], padding=True, truncation=True, max_length=window, return_tensors="pt")
             for i in range(0, len(calib_texts), 16)]
    stats = grams(model, "model.layers.", [{"input_ids": b["input_ids"]} for b in calib])
    models = {"dense": (model, 1.0)}
    for name, (spec, method) in BASELINES.items():
        trial, stored = baseline(model, "model.layers.", stats, spec, method)
        models[name] = (trial, stored / fp32)
    include = (r"model\.layers\.",)
    for budget in budgets:
        cfg = tngraph.Config(budget=budget, budget_kind="bytes", include=include, sensitivity=args.sensitivity, heal_steps=0,
                             progress=False, max_length=window)
        low = tngraph.compress(model, calibration=calib_texts, tokenizer=tok, config=cfg)
        models[f"low rank alone @{budget:g}"] = (low, target_bytes(low, names) / fp32)
    for budget, name in plan_budgets(budgets, models, args):
        cfg = tngraph.Config(budget=budget, bits=(16, 8, 4, 2), include=include, sensitivity=args.sensitivity, refine=args.refine,
                             heal_steps=0, progress=False, max_length=window)
        plan = tngraph.compress(model, calibration=calib_texts, tokenizer=tok, config=cfg)
        models[name] = (plan, target_bytes(plan, names) / fp32)
    rows = []
    for name, (m, frac) in models.items():
        ppl = perplexity(m, tok, heldout, window=window)
        rows.append({"method": name, "bytes": frac, "perplexity": ppl.perplexity})
        print(f"  tiny LM {name}: {frac:.4f} of the bytes, perplexity {ppl.perplexity:.3f}", file=sys.stderr, flush=True)
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group, style in (("tngraph", "o-"), ("low rank alone", "s--")):
        pts = sorted((r["bytes"], r["out_cos"]) for r in rows if r["method"].startswith(group) and "activations" not in r["method"])
        if pts:
            ax.plot(*zip(*pts), style, label=group)
    for r in rows:
        if not r["method"].startswith(("tngraph", "low rank alone")):
            ax.plot(r["bytes"], r["out_cos"], "x", color="gray")
            ax.annotate(r["method"], (r["bytes"], r["out_cos"]), fontsize=7, xytext=(3, -3), textcoords="offset points")
    ax.set_xlabel("stored bytes of the 36 encoder linears (fraction of fp32)")
    ax.set_ylabel("mean cosine to the dense model (out of domain)")
    ax.set_title("MiniLM: quality against bytes")
    ax.set_ylim(max(0.0, min(r["out_cos"] for r in rows) - 0.02), 1.005)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="0.25,0.125,0.0625", help="byte budgets (fractions of the fp32 bytes)")
    p.add_argument("--calibration", type=int, default=256, help="calibration samples (default 256)")
    p.add_argument("--eval", type=int, default=1000, help="held-out sentences per domain (default 1000)")
    p.add_argument("--sensitivity", default="measured", help="tngraph's sensitivity for its plans (default measured)")
    p.add_argument("--refine", type=int, default=0, help="tngraph's Config.refine for its plans (default 0)")
    p.add_argument("--equal-bytes", action="store_true", help="also allocate tngraph at the bytes of " + ", ".join(EQUAL_BYTES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10, help="timed forwards per model and shape (median)")
    p.add_argument("--lm-preset", default="default", help="tiny LM preset (default: the 'default' one, trained once and cached)")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-lm", action="store_true")
    p.add_argument("--latency-only", action="store_true", help="only the CPU timings (dense, torch.ao, tngraph at the largest budget)")
    p.add_argument("--png", default=None, help="write the MiniLM frontier here (matplotlib)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    budgets = [float(b) for b in args.budgets.split(",")]
    if args.latency_only:
        print_minilm(args, [], latency_only(args, max(budgets)), started)
        return 0
    rows, timed = minilm_rows(args, budgets)
    print_minilm(args, rows, timed, started)
    if args.png:
        plot(rows, args.png)
        print(f"\nfrontier: {args.png}")
    lm = [] if args.skip_lm else lm_rows(args, budgets)
    if lm:
        print(f"\ntiny LM ({args.lm_preset} preset), decoder linears, held-out perplexity\n")
        print("| method | bytes of fp32 | perplexity |")
        print("|---|---|---|")
        for r in sorted(lm, key=lambda r: -r["bytes"]):
            print(f"| {r['method']} | {r['bytes']:.4f} | {r['perplexity']:.3f} |")
    return 0


def print_minilm(args, rows: list[dict], timed: dict, started: float) -> None:
    print(f"\nMiniLM, 36 encoder linears; calibration {args.calibration} stdlib sentences; held out {args.eval} per domain; "
          f"sensitivity {args.sensitivity}, refine {args.refine}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{time.perf_counter() - started:.0f} s in all\n")
    print("| method | bytes of fp32 | in domain: mean cos | top-10 | out of domain: mean cos | top-10 |")
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["bytes"]):
        print(f"| {r['method']} | {r['bytes']:.4f} | {r['in_cos']:.4f} | {r['in_top10']:.3f} | {r['out_cos']:.4f} | {r['out_top10']:.3f} |")
    if timed:
        print("\n| CPU latency, ms (ratio to dense) | " + " | ".join(timed) + " |")
        print("|---|" + "---|" * len(timed))
        for name in timed["32x128"]:
            print(f"| {name} | " + " | ".join(f"{t[name]:.1f} ({t[name] / t['dense']:.2f}x)" for t in timed.values()) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
