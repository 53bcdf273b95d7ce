"""The report of a compression: sizes and the allocation per target, agreement (an encoder) or
perplexity (a causal LM) of the dense, compressed, unhealed and plain-SVD models, and CPU latency."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

from ..config import Config

LATENCY_BATCH, LATENCY_LENGTH = 32, 128  # the report's latency shape (the length at most max_length)


def per_target(result: Any) -> dict[str, dict[str, Any]]:
    """Per target: its sensitivity (when measured), the chosen format and rank, parameters kept."""
    from .. import meta

    rows = {}
    errors = result.context.analysis.get("guard", {})
    for node in meta.targets(result.graph):
        node_info = meta.info(node)
        t, plan, sens = node_info.target, node_info.plan, node_info.sensitivity
        rows[t.name] = {
            "error": errors.get(t.name),  # relative output error on the calibration data (the guard's)
            "guard_reverted": bool(plan and plan.reason == "guard"),
            "format": plan.format if plan else "dense",
            "rank": plan.rank if plan else None,
            "dense_rows": plan.dense_rows if plan else 0,
            "params_kept": (plan.params_after / plan.params_before) if plan else 1.0,
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
        "budget_kind": config.budget_kind,
        "sensitivity": config.sensitivity if config.allocation_kind == "budgeted" else None,
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


def plain_svd(model: Any, tokenizer: Any, config: Config) -> Any:
    """The data-free baseline: plain truncated SVD at the budget's uniform ranks (a second compression)."""
    from ..api import compress_with_result

    baseline = config.replace(whiten=False, allocation="uniform", budget_kind="params", dense_rows=False, heal_steps=0, dump_dir=None)
    return compress_with_result(model, example_inputs=model_inputs(model, tokenizer.vocab_size, 2, 16, 0), config=baseline).module


def score_report(model: Any, tokenizer: Any, result: Any, evaluation: Any, config: Config, *, baseline: bool = True) -> tuple[str, dict]:
    """(key, scores) of the compressed model, before healing when it healed, and the plain-SVD
    baseline (whitened low-rank runs, `baseline`); a causal LM's dense perplexity too."""
    from ..lm import is_causal_lm

    key, score = scorer(model, tokenizer, evaluation, config)
    scores = {"dense": score(model).to_json()} if is_causal_lm(model) else {}
    scores["compressed"] = score(result.module).to_json()
    if result.unhealed is not None:
        with unhealed(result) as before:
            scores["unhealed"] = score(before).to_json()
    if baseline and config.whiten and config.format == "lowrank":
        scores["plain_svd"] = score(plain_svd(model, tokenizer, config)).to_json()
    return key, scores


def latency_report(model: Any, tokenizer: Any, compressed: Any, config: Config) -> dict[str, Any]:
    """CPU latency of the dense and the compressed model at 32 x 128 tokens (interleaved runs)."""
    import torch

    from ..evaluate import latency

    batch, length = LATENCY_BATCH, min(LATENCY_LENGTH, config.max_length)
    times = latency({"dense": model, "compressed": compressed}, model_inputs(model, tokenizer.vocab_size, batch, length, config.seed))
    return {"batch": batch, "length": length, "threads": torch.get_num_threads(), "dense_ms": times["dense"] * 1e3,
            "compressed_ms": times["compressed"] * 1e3, "ratio": times["compressed"] / times["dense"]}


def build_report(spec: str, model: Any, tokenizer: Any, result: Any, evaluation: Any, config: Config, *,
                 evaluate: bool = True, baseline: bool = True) -> dict[str, Any]:
    """The report.json of `tngraph compress`: size_report, then (`evaluate`) the scores and latency, timed."""
    report = size_report(spec, model, result, config)
    if not evaluate:
        return report
    start = time.perf_counter()
    key, report[key] = score_report(model, tokenizer, result, evaluation, config, baseline=baseline)
    report["timings"]["evaluate"] = time.perf_counter() - start
    start = time.perf_counter()
    report["latency"] = latency_report(model, tokenizer, result.module, config)
    report["timings"]["latency"] = time.perf_counter() - start
    return report
