"""The compression report: a JSON-able dict and the table the CLI prints."""
from __future__ import annotations

from typing import Any


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB"


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.3f}" if before else "-"


def _variants(scores: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, label) of the compressed models scored in an agreement or perplexity block, in order."""
    labels = (("compressed", "tngraph" + (", healed" if "unhealed" in scores else "")), ("unhealed", "tngraph, before healing"),
              ("plain_svd", "plain SVD, uniform ranks"))
    return [(key, label) for key, label in labels if key in scores]


def heal_scope_words(heal: dict) -> str:
    """What follows a healing line's step count: ", per block, one block at a time" when it healed block
    by block, and ", on cuda:0" when its steps ran anywhere but the CPU."""
    device = heal.get("device", "cpu")
    return (", per block, one block at a time" if heal.get("scope") == "blocks" else "") + (f", on {device}" if device != "cpu" else "")


# The evaluation sets a report scores, side by side: its key suffix and the column's title.
SETS = (("", "held-out stdlib text"), ("_outside", "other domain: package docs"))


def _agreement_lines(report: dict[str, Any]) -> list[str]:
    """The embedding agreement block: mean cos, min cos and top-10 of each model, one group of
    columns per evaluation set (in the calibration's domain, then out of it)."""
    sets = [(report[f"agreement{suffix}"], title) for suffix, title in SETS if report.get(f"agreement{suffix}")]
    if not sets:
        return []
    counts = [agree["compressed"]["sentences"] for agree, _ in sets]
    if len(set(counts)) == 1:
        each = f"{counts[0]} held-out sentences" + (" each" if len(counts) > 1 else "")
    else:
        each = " and ".join(map(str, counts)) + " held-out sentences"
    lines = ["", f"embedding agreement with the dense model ({each}):",
             f"  {'':24}" + "".join(f"{title:>30}" for _, title in sets),
             f"  {'':24}" + f"{'mean cos':>10}{'min cos':>10}{'top-10':>10}" * len(sets)]
    for key, label in _variants(sets[0][0]):
        cells = "".join(f"{a[key]['mean_cos']:>10.4f}{a[key]['min_cos']:>10.4f}{a[key]['top10_overlap']:>10.4f}" for a, _ in sets if key in a)
        lines.append(f"  {label:24}{cells}")
    return lines


def _perplexity_lines(report: dict[str, Any]) -> list[str]:
    """The perplexity block: dense and each compressed model (and its ratio to dense), one column
    pair per evaluation set."""
    sets = [(report[f"perplexity{suffix}"], title) for suffix, title in SETS if report.get(f"perplexity{suffix}")]
    if not sets:
        return []
    tokens = " and ".join(f"{p['dense']['tokens']:,}" for p, _ in sets)
    lines = ["", f"perplexity on {tokens} held-out tokens (windows of {sets[0][0]['dense']['window']}, stride {sets[0][0]['dense']['stride']}):",
             f"  {'':26}" + "".join(f"{title:>30}" for _, title in sets)]
    lines.append(f"  {'dense':26}" + "".join(f"{p['dense']['perplexity']:>18.3f}{'':12}" for p, _ in sets))
    for key, label in _variants(sets[0][0]):
        cells = "".join(f"{p[key]['perplexity']:>18.3f}" + f"  ({p[key]['perplexity'] / p['dense']['perplexity']:.3f}x)".ljust(12)
                        for p, _ in sets if key in p)
        lines.append(f"  {label:26}{cells}")
    return lines


def format_table(report: dict[str, Any]) -> str:
    """Rows of (quantity, dense, compressed, ratio), then agreement and pass times."""
    rows: list[tuple[str, str, str, str]] = [("", "dense", "compressed", "ratio")]
    p = report["params"]
    rows.append(("parameters, targets", f"{p['targets_before']:,}", f"{p['targets_after']:,}", _ratio(p["targets_after"], p["targets_before"])))
    rows.append(("parameters, model", f"{p['model_before']:,}", f"{p['model_after']:,}", _ratio(p["model_after"], p["model_before"])))
    b = report["bytes"]
    rows.append(("weight bytes, targets", _mb(b["targets_before"]), _mb(b["targets_after"]), _ratio(b["targets_after"], b["targets_before"])))
    rows.append(("weight bytes, model", _mb(b["model_before"]), _mb(b["model_after"]), _ratio(b["model_after"], b["model_before"])))
    lat = report.get("latency")
    if lat:
        shape = f"{lat['batch']}x{lat['length']}, {lat['threads']} thr" if "length" in lat else f"{lat['batch']} samples, {lat['threads']} thr"
        rows.append((f"CPU latency ({shape})", f"{lat['dense_ms']:.1f} ms", f"{lat['compressed_ms']:.1f} ms", f"{lat['ratio']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    allocation = report.get("allocation", "uniform")
    if allocation == "budgeted":
        allocation += f" ({report.get('budget_kind', 'params')}, sensitivity {report.get('sensitivity')})"
    pruned = report.get("mlp_blocks_pruned")
    pruned = f", {pruned} MLP blocks pruned by neurons" if pruned else ""
    lines = [f"tngraph: {report['model']} at budget {report['budget']:g} ({report['targets']} targets, format {report['format']}, "
             f"allocation {allocation}{pruned})"]
    for i, r in enumerate(rows):
        lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
        if i == 0:
            lines.append("-" * (sum(widths) + 6))
    lines += _agreement_lines(report)
    outputs = report.get("outputs")
    if outputs:
        lines.append("")
        lines.append(f"outputs on {outputs['compressed']['samples']} held-out samples of {report['calibration']['origin']} "
                     "(relative error and top-1 agreement against the dense model" + (", accuracy against the labels" if "accuracy" in outputs["compressed"] else "") + "):")
        columns = [c for c in ("relative_error", "top1_agreement", "accuracy") if c in outputs["compressed"]]
        lines.append(f"  {'':24}" + "".join(f"{c.replace('_', ' ').replace('top1', 'top-1'):>16}" for c in columns))
        for key, label in [("dense", "dense")] + list(_variants(outputs)):
            lines.append(f"  {label:24}" + "".join(f"{outputs[key][c]:>16.4f}" for c in columns))
    lines += _perplexity_lines(report)
    guard = report.get("guard") or {}
    if guard.get("reverted"):
        lines.append("")
        lines.append(f"numerical guard: {len(guard['reverted'])} target(s) kept dense, their relative output error on the calibration "
                     f"data above {guard['tolerance']:g}: " + ", ".join(f"{n} ({e:.3g})" for n, e in guard["reverted"].items()))
    heal = report.get("heal")
    if heal:
        lines.append("")
        lines.append(f"healing: held-out {heal['metric']} {heal['start_loss']:.4f} -> {heal['best_loss']:.4f} "
                     f"(best at step {heal['best_step']} of {heal['steps']}{heal_scope_words(heal)}, {heal['seconds']:.0f}s)")
    per_target = report.get("per_target")
    if per_target:
        lines.append("")
        lines.append("per target (format, rank, output rows kept dense, precision, parameters kept, relative output error on the calibration data, "
                     "sensitivity: predicted error share at the uniform rank):")
        width = max(len(name) for name in per_target)
        for name, row in per_target.items():
            rank = "-" if row["rank"] is None else str(row["rank"])
            rows_dense = f"+{row['dense_rows']} rows" if row.get("dense_rows") else ""
            sens = row.get("sensitivity")
            score = f"{sens['kind']} {sens['score']:.3g}" if sens else ""
            error = "" if row.get("error") is None else f"err {row['error']:.3f}" + (" reverted" if row.get("guard_reverted") else "")
            q = row.get("precision")
            bits = "" if not q else (f"fp16" if q["bits"] == 16 else f"int{q['bits']} " + (f"g{q['group']}" if q["group"] else "ch"))
            lines.append(f"  {name:{width}}  {row['format']:8} {rank:>5} {rows_dense:>9} {bits:>9} {row['params_kept']:6.3f}  {error:>9}  {score}")
    lines.append("")
    lines.append("time per step: " + ", ".join(f"{k} {v:.1f}s" for k, v in report["timings"].items()))
    if report.get("out"):
        lines.append(f"artifact: {report['out']}")
    return "\n".join(lines)
