"""Graph dumps: one folder per pass that changed the graph (and one for a pass that failed), each
with the graph as a table, its diff against the previous dump, the drawing, a GraphML copy, the
generated code and the pass's counters and time; a structured-trace artifact for tlparse."""
from __future__ import annotations

import difflib
import json
import logging
import pathlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .. import meta
from ..ownership import mark

log = logging.getLogger(__name__)

TABLE = "graph.txt"
DIFF = "graph.diff"
PASS_INFO = "pass.json"


def _shape_dtype(node: fx.Node) -> tuple[str, str]:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return "x".join(str(d) for d in val.shape) or "scalar", str(val.dtype).replace("torch.", "")
    if isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return ", ".join("x".join(str(d) for d in v.shape) for v in val), str(val[0].dtype).replace("torch.", "")
    return "", ""


def target_name(node: fx.Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target)) if not isinstance(node.target, torch._ops.OpOverload) else str(node.target)
    return str(node.target)


def _numel(shape: Any) -> int | None:
    try:
        total = 1
        for d in shape:
            total *= int(d)
        return total
    except (TypeError, ValueError, RuntimeError):  # symbolic sizes without a hint
        return None


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def node_flops(node: fx.Node) -> int | None:
    """Multiply-adds x 2 of the matrix products (linear, mm, bmm, matmul, einsum, the tngraph ops), else None."""
    if node.op != "call_function":
        return None
    out = _val(node)
    if not isinstance(out, torch.Tensor):
        return None
    name = target_name(node)
    args = node.args
    try:
        if name in ("aten.linear.default", "aten.matmul.default", "aten.bmm.default", "aten.mm.default"):
            x = _val(args[0])
            return 2 * _numel(out.shape) * int(x.shape[-1])
        if name == "aten.addmm.default":
            return 2 * _numel(out.shape) * int(_val(args[1]).shape[-1])
        if name == "tngraph.lowrank.default":
            x, b, a = (_val(v) for v in args[:3])
            rows = _numel(x.shape[:-1])
            return 2 * rows * (int(b.shape[0]) * int(b.shape[1]) + int(a.shape[0]) * int(a.shape[1]))
        if name in ("aten.einsum.default", "tngraph.network.default"):
            import opt_einsum as oe

            if name == "aten.einsum.default":
                equation = args[0]
                shapes = [tuple(int(d) for d in _val(v).shape) for v in args[1]]
            else:
                x, equation, in_dims = _val(args[0]), args[2], args[3]
                shapes = [(*(int(d) for d in x.shape[:-1]), *in_dims), *(tuple(int(d) for d in _val(c).shape) for c in args[1])]
            return int(oe.contract_path(equation, *shapes, shapes=True, optimize="auto")[1].opt_cost)
    except (TypeError, ValueError, RuntimeError, AttributeError, IndexError):
        return None
    return None


def graph_rows(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """Per node: name, op, target, shape, dtype, parameters read, FLOPs, tngraph annotations, module path."""
    rows = []
    for node in gm.graph.nodes:
        shape, dtype = _shape_dtype(node)
        params: int | None = None
        if node.op == "get_attr":
            try:
                value = _attr(gm, str(node.target))
                params = value.numel() if isinstance(value, torch.Tensor) else None
            except AttributeError:
                params = None
        stack = node.meta.get("nn_module_stack") or {}
        module = next(reversed(stack.values()))[0] if stack else ""
        rows.append({"node": node.name, "op": node.op, "target": target_name(node), "shape": shape, "dtype": dtype,
                     "params": params, "flops": node_flops(node), "tngraph": meta.info(node).summary(), "module": module,
                     "inputs": [a.name for a in node.all_input_nodes]})
    return rows


def diff_lines(gm: fx.GraphModule, rows: list[dict[str, Any]] | None = None) -> str:
    """The table without padding, so that a diff shows the nodes that changed, not the columns that widened."""
    return "".join(" | ".join(str(r[k]) if r[k] is not None else "" for k in ("node", "op", "target", "shape", "dtype", "params", "flops", "tngraph"))
                   + "\n" for r in (rows if rows is not None else graph_rows(gm)))


def graph_table(gm: fx.GraphModule, rows: list[dict[str, Any]] | None = None) -> str:
    """One line per node: name, op, target, shape, dtype, parameters read, FLOPs, tngraph annotations."""
    header = ("node", "op", "target", "shape", "dtype", "params", "flops", "tngraph")
    table = [header]
    for r in rows if rows is not None else graph_rows(gm):
        table.append((r["node"], r["op"], r["target"], r["shape"], r["dtype"], "" if r["params"] is None else str(r["params"]),
                      "" if r["flops"] is None else f"{r['flops']:,}", r["tngraph"]))
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in table]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _attr(gm: fx.GraphModule, path: str) -> Any:
    obj: Any = gm
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class DumpState:
    """Numbering and the previous table of one dump folder, kept across run_passes calls."""

    root: pathlib.Path
    next_index: int = 0
    previous: str | None = None
    previous_name: str | None = None
    folders: list[pathlib.Path] = field(default_factory=list)
    base: int = 0  # folder number of the pass before the current run_passes call's first
    extra: dict[str, Any] = field(default_factory=dict)  # what the report gathers on the way (spectra, measurements)


def unified_diff(before: str, after: str, a: str, b: str) -> str:
    return "".join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True), fromfile=a, tofile=b, n=2))


def write_pass_dump(state: DumpState | str | pathlib.Path, index: int | None, name: str, gm: fx.GraphModule, info: dict[str, Any],
                    failed: bool = False) -> pathlib.Path:
    """Write the dump of `gm` after pass `name` as folder NN_name (NN_name.failed for a failure)."""
    from .draw import write_drawings

    if not isinstance(state, DumpState):
        state = DumpState(pathlib.Path(state), next_index=index or 0)
    number = state.next_index if index is None else index
    state.next_index = number + 1
    folder = state.root / f"{number:02d}_{name}{'.failed' if failed else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = graph_rows(gm)  # once: the table, the diff lines and the drawings all read it
    table = graph_table(gm, rows)
    (folder / TABLE).write_text(table, encoding="utf-8")
    lines = diff_lines(gm, rows)
    if state.previous is not None:
        (folder / DIFF).write_text(unified_diff(state.previous, lines, state.previous_name or "", folder.name), encoding="utf-8")
    (folder / "code.py").write_text(gm.code, encoding="utf-8")
    info = {**info, "nodes": len(gm.graph.nodes), "failed": failed}
    info["drawing"] = write_drawings(gm, folder, rows)
    (folder / PASS_INFO).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    _trace(folder.name, table, info)
    (folder / "graph.lines").write_text(lines, encoding="utf-8")  # what `tngraph dump --diff` compares
    state.previous, state.previous_name = lines, folder.name
    state.folders.append(folder)
    mark(state.root, "dump", [folder.name], add=True)  # the folder is tngraph's: a later `tngraph dump --force` may replace it
    return folder


def trace_pass(name: str, gm: fx.GraphModule, info: dict[str, Any]) -> None:
    """Without a dump folder: only the structured-trace artifacts of a pass (when TORCH_TRACE is set)."""
    import os

    if os.environ.get("TORCH_TRACE"):
        _trace(name, graph_table(gm), info)


def _trace(name: str, table: str, info: dict[str, Any]) -> None:
    """Structured-trace artifacts (TORCH_TRACE=dir; tlparse lists them beside dynamo's own)."""
    try:
        from torch._logging import trace_structured
    except ImportError:
        return
    trace_structured("artifact", metadata_fn=lambda: {"name": f"tngraph_{name}", "encoding": "string"}, payload_fn=lambda: table)
    trace_structured("artifact", metadata_fn=lambda: {"name": f"tngraph_{name}_pass", "encoding": "json"},
                     payload_fn=lambda: json.dumps(info, default=str))


def compare_dumps(a: str | pathlib.Path, b: str | pathlib.Path) -> str:
    """The unified diff of two pass folders' tables (or two table files)."""
    from ..errors import DataError

    texts = []
    for path in (pathlib.Path(a), pathlib.Path(b)):
        table = path / "graph.lines" if path.is_dir() else path
        if not table.is_file():
            raise DataError(f"{str(path)!r} is not a pass folder of a dump (no graph.lines)", "pass two NN_pass folders written by `tngraph dump`")
        texts.append(table.read_text(encoding="utf-8"))
    return unified_diff(texts[0], texts[1], str(a), str(b))
