"""The report of a compression: sizes and the allocation per target, agreement (an encoder) or
perplexity (a causal LM) of the dense, compressed, unhealed and plain-SVD models, and CPU latency."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

from ..config import Config
from ..data import OUTSIDE_PACKAGES, set_record

LATENCY_BATCH, LATENCY_LENGTH = 32, 128  # the report's latency shape (the length at most max_length)


def per_target(result: Any) -> dict[str, dict[str, Any]]:
    """Per target: its sensitivity (when measured), the chosen format and rank, parameters kept."""
    from .. import meta

    rows = {}
    errors = result.context.analysis.get("guard", {})
    for node in meta.targets(result.graph):
        node_info = meta.info(node)
        t, plan, sens = node_info.target, node_info.plan, node_info.sensitivity
        decided = result.context.plan.get(t.name)
        rows[t.name] = {
            "error": errors.get(t.name),  # relative output error on the calibration data (the guard's)
            "guard_reverted": bool(plan and plan.reason == "guard"),
            "format": plan.format if plan else "dense",
            "rank": plan.rank if plan else None,
            "dense_rows": plan.dense_rows if plan else 0,
            "params_kept": (plan.params_after / plan.params_before) if plan else 1.0,
            "precision": dict(plan.quant) if plan is not None and plan.quant else None,  # bits, group (0: per channel), act_bits
            "bytes": decided.bytes_after() if decided is not None else None,  # what its factors (and bias) store
            "sensitivity": None if sens is None else {"kind": sens.kind, "score": sens.score},
        }
    return rows


@contextlib.contextmanager
def unhealed(result: Any) -> Iterator[Any]:
    """The compressed model as it was before healing (its trained parameters swapped back) for the duration."""
    import torch

    params = dict(result.module.named_parameters())
    healed = {n: params[n].detach().clone() for n in result.unhealed}
    with torch.no_grad():
        for n, v in result.unhealed.items():
            params[n].copy_(v)
    try:
        yield result.module
    finally:
        with torch.no_grad():
            for n, v in healed.items():
                params[n].copy_(v)


def model_inputs(model: Any, vocab_size: int, batch: int, length: int, seed: int) -> dict[str, Any]:
    """Random token inputs of those the model's forward names (a causal LM takes no token_type_ids)."""
    from ..evaluate import latency_inputs
    from ..models import accepted_only, forward_names

    return accepted_only(latency_inputs(vocab_size, batch, length, seed), forward_names(model))


def size_report(spec: str, model: Any, result: Any, config: Config) -> dict[str, Any]:
    """What the compression did, without running the models: sizes, allocation, counters, timings."""
    from ..evaluate import count_params

    rows = per_target(result)
    names = tuple(rows)  # every target, the ones kept dense included
    tb, tbb = count_params(model, names)
    ta, tab = count_params(result.module, names)
    mb, mbb = count_params(model)
    ma, mab = count_params(result.module)
    report: dict[str, Any] = {
        "model": spec,
        "budget": config.budget,
        "format": config.format,
        "whiten": config.whiten,
        "targets": len(names),
        "params": {"targets_before": tb, "targets_after": ta, "model_before": mb, "model_after": ma, "targets_kept": ta / tb if tb else None},
        "bytes": {"targets_before": tbb, "targets_after": tab, "model_before": mbb, "model_after": mab},
        "allocation": config.allocation_kind,
        "mlp_blocks_pruned": int(result.context.counters.get("allocate.pruned_blocks", 0)),
        "budget_kind": config.budget_kind,
        "sensitivity": _sensitivity(config, result.context) if config.allocation_kind == "budgeted" else None,
        "output_whiten": config.output_whiten,
        "ranks": {t["name"]: t["rank"] for t in result.recipe["targets"]},
        "per_target": rows,
        "counters": dict(result.context.counters),
        "guard": {"tolerance": config.guard_tolerance, "reverted": dict(result.context.analysis.get("guard_reverted", {}))},
        "timings": dict(result.timings),
    }
    if result.heal is not None:
        report["heal"] = result.heal.to_json()
    return report


def scorer(model: Any, tokenizer: Any, evaluation: Any, config: Config) -> tuple[str, Callable[[Any], Any]]:
    """(report key, score): perplexity on held-out text for a causal LM, else the embedding agreement
    with `model` on the evaluation sentences (its embeddings computed once, here)."""
    from ..evaluate import agreement, sentence_embeddings
    from ..lm import is_causal_lm, perplexity

    show = config.progress
    if is_causal_lm(model):
        return "perplexity", lambda m: perplexity(m, tokenizer, evaluation, show=show)
    ref = sentence_embeddings(model, tokenizer, evaluation, max_length=config.max_length, show=show)
    return "agreement", lambda m: agreement(ref, sentence_embeddings(m, tokenizer, evaluation, max_length=config.max_length, show=show))


def plain_svd(model: Any, tokenizer: Any, config: Config, example_inputs: Any = None) -> Any:
    """The data-free baseline: plain truncated SVD at the budget's uniform ranks (a second compression),
    captured on `example_inputs` (default: random tokens)."""
    from ..api import compress_with_result

    baseline = config.replace(whiten=False, allocation="uniform", budget_kind="params", dense_rows=False, mixture=(), bits=(), act_bits=0, heal_steps=0,
                              dump_dir=None, mlp="lowrank")  # plain SVD everywhere: pruned blocks need calibration data
    example = example_inputs if example_inputs is not None else model_inputs(model, tokenizer.vocab_size, 2, 16, 0)
    return compress_with_result(model, example_inputs=example, config=baseline).module


def score_report(model: Any, tokenizer: Any, result: Any, sets: dict[str, Any], config: Config, *, baseline: bool = True) -> tuple[str, dict]:
    """(key, {set name: scores}): on each evaluation set of `sets` (name -> sentences or text; None
    skipped), the scores of the compressed model, before healing when it healed, and of the
    plain-SVD baseline (whitened low-rank runs, `baseline`); a causal LM's dense perplexity too.
    Each model is built once and scored on every set."""
    from ..lm import is_causal_lm

    key, scored = "", {}
    for name, texts in sets.items():
        if texts:
            key, score = scorer(model, tokenizer, texts, config)
            scored[name] = (score, {"dense": score(model).to_json()} if is_causal_lm(model) else {})

    def run(variant: str, module: Any) -> None:
        for score, out in scored.values():
            out[variant] = score(module).to_json()

    run("compressed", result.module)
    if result.unhealed is not None:
        with unhealed(result) as before:
            run("unhealed", before)
    if baseline and config.whiten and config.format == "lowrank":
        run("plain_svd", plain_svd(model, tokenizer, config))
    return key, {name: out for name, (_, out) in scored.items()}


def latency_report(model: Any, tokenizer: Any, compressed: Any, config: Config) -> dict[str, Any]:
    """CPU latency of the dense and the compressed model at 32 x 128 tokens (interleaved runs)."""
    import torch

    from ..evaluate import latency

    batch, length = LATENCY_BATCH, min(LATENCY_LENGTH, config.max_length)
    times = latency({"dense": model, "compressed": compressed}, model_inputs(model, tokenizer.vocab_size, batch, length, config.seed))
    return {"batch": batch, "length": length, "threads": torch.get_num_threads(), "dense_ms": times["dense"] * 1e3,
            "compressed_ms": times["compressed"] * 1e3, "ratio": times["compressed"] / times["dense"]}


def build_report(spec: str, model: Any, tokenizer: Any, result: Any, evaluation: Any, config: Config, *,
                 evaluate: bool = True, baseline: bool = True, outside: Any = None) -> dict[str, Any]:
    """The report.json of `tngraph compress`: size_report, then (`evaluate`) add_scores."""
    report = size_report(spec, model, result, config)
    if evaluate:
        add_scores(report, model, tokenizer, result, evaluation, config, baseline=baseline, outside=outside)
    return report


def add_scores(report: dict[str, Any], model: Any, tokenizer: Any, result: Any, evaluation: Any, config: Config, *,
               baseline: bool = True, outside: Any = None) -> None:
    """The scores and latency of a size_report, timed, added in place. The scores on the `evaluation`
    set go under "agreement" / "perplexity", those on the out-of-domain set `outside` (when given)
    under "agreement_outside" / "perplexity_outside"."""
    start = time.perf_counter()
    key, scored = score_report(model, tokenizer, result, {"": evaluation, "_outside": outside}, config, baseline=baseline)
    for suffix, scores in scored.items():
        report[key + suffix] = scores
    report["evaluation_sets"] = {name: set_record(texts, OUTSIDE_PACKAGES if name else ())
                                 for name, texts in (("", evaluation), ("_outside", outside)) if texts}
    report["timings"]["evaluate"] = time.perf_counter() - start
    start = time.perf_counter()
    report["latency"] = latency_report(model, tokenizer, result.module, config)
    report["timings"]["latency"] = time.perf_counter() - start


def main_output(outputs: Any) -> Any:
    """What a model of tensor inputs is judged by: its logits, else its last hidden state."""
    logits = getattr(outputs, "logits", None)
    return logits if logits is not None else getattr(outputs, "last_hidden_state", outputs[0] if isinstance(outputs, tuple) else outputs)


def tensor_scorer(model: Any, held: Any, config: Config) -> Callable[[Any], dict[str, float]]:
    """Scores on held-out tensor samples (tngraph.samples.TensorSamples): the relative error of the
    main output against `model`'s; of a classifier (2-D logits) the top-1 agreement with `model` and,
    when the samples carry labels, the accuracy."""
    import torch

    batches = held.batches(config.batch_size)

    def outputs(m: Any) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([main_output(m(**b)).float() for b in batches])

    ref = outputs(model)

    def score(m: Any) -> dict[str, float]:
        out = ref if m is model else outputs(m)
        entry = {"relative_error": float((out - ref).norm() / ref.norm().clamp_min(1e-12)), "samples": len(held)}
        if out.dim() == 2:
            entry["top1_agreement"] = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
            if held.labels is not None:
                entry["accuracy"] = float((out.argmax(-1) == held.labels).float().mean())
        return entry

    return score


def tensor_report(model: Any, result: Any, held: Any, config: Config, *, baseline: bool = True) -> dict[str, Any]:
    """The scores of a run calibrated on tensors: dense, compressed, unhealed and plain SVD on the held-out samples."""
    score = tensor_scorer(model, held, config)
    scores = {"dense": score(model), "compressed": score(result.module)}
    if result.unhealed is not None:
        with unhealed(result) as before:
            scores["unhealed"] = score(before)
    if baseline and config.whiten and config.format == "lowrank":
        scores["plain_svd"] = score(plain_svd(model, None, config, held.rows(slice(0, 2))))
    return scores


def tensor_latency(model: Any, compressed: Any, samples: Any) -> dict[str, Any]:
    """CPU latency of the dense and the compressed model on (up to) 32 of the samples at once."""
    import torch

    from ..evaluate import latency

    inputs = samples.rows(slice(0, LATENCY_BATCH))
    with torch.no_grad():
        times = latency({"dense": model, "compressed": compressed}, inputs)
    return {"batch": next(iter(inputs.values())).shape[0], "threads": torch.get_num_threads(), "dense_ms": times["dense"] * 1e3,
            "compressed_ms": times["compressed"] * 1e3, "ratio": times["compressed"] / times["dense"]}


def _sensitivity(config, ctx) -> str:
    """The sensitivity the allocation used: the one asked for, or what replaced it (--time-budget)."""
    fallback = ctx.analysis.get("sensitivity_fallback")
    if not fallback:
        return config.sensitivity
    return f"{fallback['used']} (measured would take about {fallback['predicted_seconds']:.0f} s, over --time-budget)"

