"""Readable graph dumps: one folder per pass that changed the graph, and one for a pass that failed."""
from __future__ import annotations

import json
import pathlib
from typing import Any

import torch
import torch.fx as fx

from .. import meta


def _shape_dtype(node: fx.Node) -> tuple[str, str]:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return "x".join(str(d) for d in val.shape) or "scalar", str(val.dtype).replace("torch.", "")
    if isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return ", ".join("x".join(str(d) for d in v.shape) for v in val), str(val[0].dtype).replace("torch.", "")
    return "", ""


def _target(node: fx.Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target)) if not isinstance(node.target, torch._ops.OpOverload) else str(node.target)
    return str(node.target)


def graph_table(gm: fx.GraphModule) -> str:
    """One line per node: name, op, target, shape, dtype, parameters read, tngraph annotations."""
    rows = [("node", "op", "target", "shape", "dtype", "params", "tngraph")]
    for node in gm.graph.nodes:
        shape, dtype = _shape_dtype(node)
        params = ""
        if node.op == "get_attr":
            try:
                params = str(_attr(gm, str(node.target)).numel())
            except AttributeError:
                params = "?"
        rows.append((node.name, node.op, _target(node), shape, dtype, params, meta.info(node).summary()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _attr(gm: fx.GraphModule, path: str) -> torch.Tensor:
    obj: Any = gm
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def write_pass_dump(
    root: str | pathlib.Path, index: int, name: str, gm: fx.GraphModule, info: dict[str, Any], failed: bool = False
) -> pathlib.Path:
    folder = pathlib.Path(root) / f"{index:02d}_{name}{'.failed' if failed else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "graph.txt").write_text(graph_table(gm), encoding="utf-8")
    (folder / "code.py").write_text(gm.code, encoding="utf-8")
    (folder / "pass.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return folder
