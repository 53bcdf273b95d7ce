"""The dump's index.html: one page (no network, pictures inline) that navigates the passes
(table, diff, drawing, counters, time) and shows per-layer sensitivity, the chosen format and rank,
singular-value spectra and parameters / FLOPs / latency before and after (matplotlib)."""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import pathlib
from typing import Any

import torch
import torch.fx as fx

from .. import meta
from ..ownership import mark
from .dump import DIFF, PASS_INFO, TABLE, DumpState
from .table import attr

log = logging.getLogger(__name__)

TARGETS_JSON = "targets.json"
SUMMARY_JSON = "summary.json"
INDEX = "index.html"
SPECTRUM_POINTS = 256


def collect_spectra(state: DumpState, gm: fx.GraphModule) -> None:
    """Singular values (normalised to the largest) of every target's dense weight still in the graph."""
    spectra = state.extra.setdefault("spectra", {})
    for node in meta.targets(gm):
        t = meta.info(node).target
        if t is None or t.name in spectra:
            continue
        try:
            weight = attr(gm, t.weight)
        except AttributeError:
            continue
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        with torch.no_grad():
            s = torch.linalg.svdvals(weight.detach().float().cpu())
        s = s / s[0].clamp_min(1e-30)
        step = max(1, len(s) // SPECTRUM_POINTS)
        spectra[t.name] = [round(float(v), 6) for v in s[::step]]


def target_rows(gm: fx.GraphModule) -> list[dict[str, Any]]:
    rows = []
    for node in meta.targets(gm):
        i = meta.info(node)
        t, plan, sens = i.target, i.plan, i.sensitivity
        rows.append({
            "name": t.name, "kind": t.kind, "in_features": t.in_features, "out_features": t.out_features,
            "format": plan.format if plan else "dense", "rank": plan.rank if plan else None,
            "params_before": plan.params_before if plan else t.dense_params, "params_after": plan.params_after if plan else t.dense_params,
            "sensitivity": None if sens is None else {"kind": sens.kind, "score": sens.score},
        })
    return rows


def _incomplete(part: str, exc: Exception) -> str:
    """Log (with the traceback) and return the line the page shows for a part of the report that failed."""
    line = f"{part} left out: {type(exc).__name__}: {exc}"
    log.warning("tngraph dump: index.html: %s", line, exc_info=True)
    return line


def write_report(state: DumpState, gm: fx.GraphModule, ctx: Any = None, measurements: dict[str, Any] | None = None) -> pathlib.Path:
    """targets.json, summary.json and index.html in the dump's root.

    Also written after a pass failed, on whatever graph it failed on: a part that cannot be made
    (the targets table, the pictures) is left out with a warning and a line on the page naming the
    problem, rather than losing the page and the passes it navigates."""
    root = state.root
    if measurements:
        state.extra.setdefault("measurements", {}).update(measurements)
    problems: list[str] = []
    try:
        rows = target_rows(gm)
    except Exception as exc:  # a tngraph bug, but the page still shows the passes
        rows = []
        problems.append(_incomplete("the targets table", exc))
    spectra = state.extra.get("spectra", {})
    (root / TARGETS_JSON).write_text(json.dumps({"targets": rows, "spectra": spectra}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    passes = [_read_pass(f) for f in state.folders if f.is_dir()]
    summary = {"passes": [{k: p[k] for k in ("folder", "pass", "seconds", "counters", "failed")} for p in passes],
               "timings": dict(getattr(ctx, "timings", {}) or {}), "measurements": state.extra.get("measurements", {}),
               "flops": _flops(passes)}
    (root / SUMMARY_JSON).write_text(json.dumps(summary, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
    (root / INDEX).write_text(render(passes, rows, spectra, summary, problems), encoding="utf-8")
    mark(root, "dump", (TARGETS_JSON, SUMMARY_JSON, INDEX), add=True)  # a later `tngraph dump --force` may replace them
    return root / INDEX


def _read_pass(folder: pathlib.Path) -> dict[str, Any]:
    try:
        info = json.loads((folder / PASS_INFO).read_text(encoding="utf-8")) if (folder / PASS_INFO).is_file() else {}
    except (OSError, ValueError) as exc:  # a pass.json cut short (the run was killed while writing it)
        log.warning("tngraph dump: %s unreadable: %s", folder / PASS_INFO, exc)
        info = {}
    table = (folder / TABLE).read_text(encoding="utf-8") if (folder / TABLE).is_file() else ""
    diff = (folder / DIFF).read_text(encoding="utf-8") if (folder / DIFF).is_file() else None
    return {"folder": folder.name, "pass": info.get("pass", folder.name), "seconds": info.get("seconds"), "counters": info.get("counters", {}),
            "summary": info.get("summary"), "error": info.get("error"), "failed": folder.name.endswith(".failed"), "nodes": info.get("nodes"),
            "table": table, "diff": diff, "svg": (folder / "graph.svg").is_file(), "drawing": info.get("drawing", {})}


def _flops(passes: list[dict[str, Any]]) -> dict[str, int]:
    """Total FLOPs in the first and the last dumped graph (the FLOPs column of their tables)."""
    def total(table: str) -> int:
        header = table.splitlines()[0] if table else ""
        start = header.find("flops")
        if start < 0:
            return 0
        count = 0
        for line in table.splitlines()[1:]:
            cell = line[start:].split("  ")[0].strip().replace(",", "")
            count += int(cell) if cell.isdigit() else 0
        return count

    ok = [p for p in passes if p["table"] and not p["failed"]]
    return {"first": total(ok[0]["table"]), "last": total(ok[-1]["table"])} if ok else {}


# --- pictures ---------------------------------------------------------------------------------------


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _split(name: str) -> tuple[str, str]:
    """(block, role): 'encoder.layer.3.attention.self.query' -> ('3', 'attention.self.query'); 'layers.0' -> ('0', 'layers')."""
    parts = name.split(".")
    i = next((k for k, part in enumerate(parts) if part.isdigit()), None)
    if i is None:
        return "", name
    return parts[i], ".".join(parts[i + 1:]) or ".".join(parts[:i])


def pictures(rows: list[dict[str, Any]], spectra: dict[str, list[float]], summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(title, note, data URL) of each picture; an empty list without matplotlib (said in the log)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("index.html without pictures: matplotlib is not installed (pip install matplotlib)")
        return []
    out = []
    scored = [r for r in rows if r["sensitivity"]]
    if scored:
        blocks = sorted({_split(r["name"])[0] for r in scored}, key=lambda b: (len(b), b))
        roles = list(dict.fromkeys(_split(r["name"])[1] for r in scored))
        grid = torch.full((len(blocks), len(roles)), float("nan"))
        for r in scored:
            b, role = _split(r["name"])
            grid[blocks.index(b), roles.index(role)] = max(r["sensitivity"]["score"], 1e-12)
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(roles), 0.8 + 0.45 * len(blocks)))
        image = ax.imshow(grid.log10().numpy(), cmap="magma_r", aspect="auto")
        ax.set_xticks(range(len(roles)), roles, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(blocks)), [f"block {b}" if b else "-" for b in blocks], fontsize=8)
        fig.colorbar(image, ax=ax, label="log10 sensitivity")
        ax.set_title(f"per-layer sensitivity ({scored[0]['sensitivity']['kind']})", fontsize=10)
        out.append(("Sensitivity per layer", "predicted share of the model's output error at the budget's uniform rank", _png(fig)))
    if rows:
        fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(rows)), 3.2))
        formats = sorted({r["format"] for r in rows})
        colours = dict(zip(formats, plt.cm.tab10.colors))
        kept = [r["params_after"] / max(r["params_before"], 1) for r in rows]
        ax.bar(range(len(rows)), kept, color=[colours[r["format"]] for r in rows])
        for i, r in enumerate(rows):
            if r["rank"]:
                ax.text(i, kept[i] + 0.02, str(r["rank"]), ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=90, fontsize=6)
        ax.set_ylabel("fraction of parameters kept")
        ax.set_ylim(0, 1.25)
        ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[f]) for f in formats], labels=formats, fontsize=7, loc="upper right")
        ax.set_title("chosen format and rank (number above the bar) per layer", fontsize=10)
        out.append(("Format and rank per layer", "", _png(fig)))
    if spectra:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        ranks = {r["name"]: r["rank"] for r in rows}
        for name, values in spectra.items():
            xs = [i / max(len(values) - 1, 1) for i in range(len(values))]
            ax.plot(xs, values, linewidth=0.8, alpha=0.6, label=name if len(spectra) <= 8 else None)
        ax.set_yscale("log")
        ax.set_xlabel("singular value index / min(out, in)")
        ax.set_ylabel("sigma_i / sigma_0")
        if len(spectra) <= 8:
            ax.legend(fontsize=6)
        kept = [r for r in rows if r["rank"]]
        note = f"{len(spectra)} dense weights; chosen ranks span {min(ranks[r['name']] for r in kept)}-{max(ranks[r['name']] for r in kept)}" if kept else ""
        ax.set_title("singular-value spectra of the dense weights", fontsize=10)
        out.append(("Singular-value spectra", note, _png(fig)))
    before = sum(r["params_before"] for r in rows)
    after = sum(r["params_after"] for r in rows)
    bars = [("target params (M)", before / 1e6, after / 1e6)]
    flops = summary.get("flops") or {}
    if flops.get("first"):
        bars.append(("graph GFLOPs (example)", flops["first"] / 1e9, flops["last"] / 1e9))
    m = summary.get("measurements") or {}
    if m.get("dense_ms") and m.get("compressed_ms"):
        bars.append((f"latency ms ({m.get('shape', '')})", m["dense_ms"], m["compressed_ms"]))
    if rows:
        fig, axes = plt.subplots(1, len(bars), figsize=(3 * len(bars), 3))
        for ax, (label, b, a) in zip(axes if len(bars) > 1 else [axes], bars):
            ax.bar(["before", "after"], [b, a], color=["#999999", "#3c78d8"])
            ax.set_title(label, fontsize=9)
            ax.text(1, a, f"{a / b:.2f}x" if b else "", ha="center", va="bottom", fontsize=8)
        fig.tight_layout()
        out.append(("Before and after", "FLOPs of the dumped graphs at the example's shapes; latency measured by `tngraph dump`", _png(fig)))
    return out


# --- the page ---------------------------------------------------------------------------------------

_CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:0;display:flex;color:#222}
nav{width:230px;min-width:230px;background:#f3f3f3;height:100vh;overflow:auto;position:sticky;top:0;padding:10px;box-sizing:border-box;font-size:13px}
nav a{display:block;padding:3px 0;color:#1a4f9c;text-decoration:none} nav a.failed{color:#b00}
main{padding:16px 24px;overflow:auto;flex:1} h1{font-size:20px} h2{font-size:16px;border-bottom:1px solid #ddd;padding-bottom:4px}
pre{background:#fafafa;border:1px solid #e3e3e3;padding:8px;overflow:auto;max-height:480px;font-size:11px}
.add{color:#0a7a0a}.del{color:#b00}.hunk{color:#777} table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ddd;padding:2px 8px;text-align:left} .pic{margin:12px 0} .pic img{max-width:100%;border:1px solid #eee}
.drawing{max-height:600px;overflow:auto;border:1px solid #eee} .error{color:#b00;font-weight:bold}
"""


def _diff_html(diff: str) -> str:
    lines = []
    for line in diff.splitlines():
        cls = "add" if line.startswith("+") and not line.startswith("+++") else "del" if line.startswith("-") and not line.startswith("---") else "hunk" if line.startswith("@@") else ""
        lines.append(f'<span class="{cls}">{html.escape(line)}</span>' if cls else html.escape(line))
    return "\n".join(lines)


def render(passes: list[dict[str, Any]], rows: list[dict[str, Any]], spectra: dict[str, list[float]], summary: dict[str, Any],
           problems: list[str] | None = None) -> str:
    e = html.escape
    problems = list(problems or [])
    try:
        pics = pictures(rows, spectra, summary)
    except Exception as exc:  # matplotlib or a row it cannot draw: the page goes without pictures
        pics = []
        problems.append(_incomplete("the pictures", exc))
    nav = ['<nav><b>tngraph dump</b><a href="#overview">overview</a>', '<a href="#targets">targets</a>']
    nav += [f'<a class="{"failed" if p["failed"] else ""}" href="#{e(p["folder"])}">{e(p["folder"])}</a>' for p in passes]
    nav.append("</nav>")
    body = ['<main><h1 id="overview">tngraph dump</h1>']
    failed = [p for p in passes if p["failed"]]
    if failed:
        body.append(f'<p class="error">pass {e(failed[0]["pass"])} failed: {e(str(failed[0]["error"]))}; its input graph is in '
                    f'<a href="#{e(failed[0]["folder"])}">{e(failed[0]["folder"])}</a></p>')
    for line in problems:
        body.append(f'<p class="error">report incomplete: {e(line)}</p>')
    body.append("<table><tr><th>folder</th><th>pass</th><th>seconds</th><th>nodes</th><th>counters</th></tr>")
    for p in passes:
        counters = ", ".join(f"{k} {v}" for k, v in (p["counters"] or {}).items())
        seconds = "" if p["seconds"] is None else f"{p['seconds']:.3f}"
        body.append(f'<tr><td><a href="#{e(p["folder"])}">{e(p["folder"])}</a></td><td>{e(str(p["pass"]))}</td><td>{seconds}</td>'
                    f'<td>{p["nodes"] or ""}</td><td>{e(counters)}</td></tr>')
    body.append("</table>")
    for title, note, url in pics:
        body.append(f'<div class="pic"><h2>{e(title)}</h2><p>{e(note)}</p><img alt="{e(title)}" src="{url}"></div>')
    body.append('<h2 id="targets">Targets</h2><table><tr><th>target</th><th>shape</th><th>format</th><th>rank</th><th>kept</th><th>sensitivity</th></tr>')
    for r in rows:
        sens = "" if not r["sensitivity"] else f"{r['sensitivity']['kind']} {r['sensitivity']['score']:.3g}"
        kept = r["params_after"] / max(r["params_before"], 1)
        body.append(f"<tr><td>{e(r['name'])}</td><td>{r['out_features']}x{r['in_features']}</td><td>{e(r['format'])}</td>"
                    f"<td>{r['rank'] or ''}</td><td>{kept:.3f}</td><td>{e(sens)}</td></tr>")
    body.append("</table>")
    for p in passes:
        body.append(f'<h2 id="{e(p["folder"])}">{e(p["folder"])}</h2>')
        if p["error"]:
            body.append(f'<p class="error">{e(str(p["error"]))}</p>')
        if p["summary"]:
            body.append(f"<p>{e(json.dumps(p['summary'], default=str))}</p>")
        if p["diff"] is not None:
            body.append(f"<details open><summary>diff against the previous dump ({p['diff'].count(chr(10))} lines)</summary>"
                        f"<pre>{_diff_html(p['diff']) or '(no change in the table)'}</pre></details>")
        body.append(f"<details><summary>graph table</summary><pre>{e(p['table'])}</pre></details>")
        if p["svg"]:
            body.append(f'<details><summary>drawing (<a href="{e(p["folder"])}/graph.svg">graph.svg</a>)</summary>'
                        f'<div class="drawing"><img loading="lazy" alt="graph" src="{e(p["folder"])}/graph.svg"></div></details>')
        elif p["drawing"].get("reason"):
            body.append(f"<p>no drawing: {e(str(p['drawing']['reason']))}</p>")
    body.append("</main>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>tngraph dump</title>"
            f"<style>{_CSS}</style></head><body>" + "".join(nav) + "\n".join(body) + "</body></html>\n")
