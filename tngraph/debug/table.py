"""The node table of a graph: per node its op, target, shape, dtype, parameters read, FLOPs and
tngraph annotations; as aligned text (graph.txt), diffable lines, and rows for drawings and reports."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .. import meta
from ..layers import OPS


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
    """Multiply-adds x 2 of the matrix products (linear, mm, bmm, matmul, einsum, the layers' ops), else None."""
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
        if node.target in OPS:  # a layer's op: what its reference computes
            layer = OPS[node.target]
            traced = layer.trace_nodes(args[0], list(args[1]), args[2], layer.op_statics(node))
            return sum(node_flops(n) or 0 for n in traced.graph.nodes) if traced is not None else None
        if name == "aten.einsum.default":
            import opt_einsum as oe

            shapes = [tuple(int(d) for d in _val(v).shape) for v in args[1]]
            return int(oe.contract_path(args[0], *shapes, shapes=True, optimize="auto")[1].opt_cost)
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
                value = attr(gm, str(node.target))
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


def attr(gm: fx.GraphModule, path: str) -> Any:
    obj: Any = gm
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
