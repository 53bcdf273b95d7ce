"""Einsum for ONNX runtimes that do not take it as it is: an equation as pairwise MatMuls (onnxscript).

ONNX's Einsum takes no bfloat16 and TensorRT's no ellipsis; the network layer's ONNX translation
(tngraph/layers/network.py) flattens the leading axes itself and, in bfloat16, writes the
contraction with `einsum_as_matmuls` along opt_einsum's path.
"""
from __future__ import annotations

from typing import Any

from ..errors import ExportError


def is_bfloat16(x: Any) -> bool:
    """Whether a network layer on x is written as MatMuls instead of one Einsum: ONNX's Einsum takes no bfloat16."""
    import onnx_ir as ir

    return getattr(x, "dtype", None) == ir.DataType.BFLOAT16


def einsum_as_matmuls(op: Any, equation: str, operands: list[Any], shapes: list[list[int | None]], rows_hint: int = 256) -> Any:
    """`equation` ("ab,bc->ac", no ellipsis) over ONNX values as pairwise MatMuls, in the order
    opt_einsum plans (a dynamic dim, None in `shapes`, counted as rows_hint). Each pair: labels only
    one side needs later are summed out (ReduceSum), both sides are transposed to (batch, kept,
    contracted) / (batch, contracted, kept), reshaped to 3-D, multiplied and reshaped back. At most
    one dim may be dynamic (the flattened rows); it becomes the -1 of each Reshape."""
    import opt_einsum as oe

    lhs, out = equation.split("->")
    terms = lhs.split(",")
    if len(terms) != len(operands) or len(shapes) != len(operands):
        raise ExportError(f"einsum {equation!r} has {len(terms)} operands, got {len(operands)}", "report this as a tngraph bug")
    size: dict[str, int | None] = {}
    for term, shape in zip(terms, shapes):
        if len(term) != len(shape) or len(set(term)) != len(term):
            raise ExportError(f"einsum term {term!r} of {equation!r} does not fit shape {shape} (or repeats a label)",
                              "report this as a tngraph bug")
        for label, d in zip(term, shape):
            size[label] = d
    if sum(d is None for d in size.values()) > 1:
        raise ExportError(f"einsum {equation!r} has more than one dynamic dim", "export with dynamic=False")
    hinted = [tuple(rows_hint if d is None else d for d in shape) for shape in shapes]
    path, _ = oe.contract_path(equation, *hinted, shapes=True, optimize="optimal" if len(terms) <= 6 else "greedy")

    def product(labels: str) -> int:
        total = 1
        for c in labels:
            if size[c] is None:
                return -1
            total *= size[c]
        return total

    def dims(labels: str) -> list[int]:
        return [-1 if size[c] is None else int(size[c]) for c in labels]

    def reshape(value: Any, target: list[int]) -> Any:
        return op.Reshape(value, op.Constant(value_ints=target))

    def arrange(value: Any, labels: str, order: str) -> Any:
        return value if labels == order else op.Transpose(value, perm=[labels.index(c) for c in order])

    def drop(value: Any, labels: str, needed: set[str]) -> tuple[Any, str]:
        gone = [i for i, c in enumerate(labels) if c not in needed]
        if not gone:
            return value, labels
        return op.ReduceSum(value, op.Constant(value_ints=gone), keepdims=0), "".join(c for c in labels if c in needed)

    values, labels_of = list(operands), list(terms)
    for step in path:
        picked = sorted(step, reverse=True)
        taken = [(values.pop(i), labels_of.pop(i)) for i in picked][::-1]
        later = set(out) | set("".join(labels_of))
        if len(taken) == 1:
            value, labels = drop(*taken[0], later)
        elif len(taken) == 2:
            (a, la), (b, lb) = taken
            a, la = drop(a, la, later | set(lb))
            b, lb = drop(b, lb, later | set(la))
            batch = "".join(c for c in la if c in lb and c in later)
            summed = "".join(c for c in la if c in lb and c not in later)
            a_only = "".join(c for c in la if c not in lb)
            b_only = "".join(c for c in lb if c not in la)
            a3 = reshape(arrange(a, la, batch + a_only + summed), [product(batch), product(a_only), product(summed)])
            b3 = reshape(arrange(b, lb, batch + summed + b_only), [product(batch), product(summed), product(b_only)])
            labels = batch + a_only + b_only
            value = reshape(op.MatMul(a3, b3), dims(labels))
        else:
            raise ExportError(f"opt_einsum planned a {len(taken)}-operand step for {equation!r}", "report this as a tngraph bug")
        values.append(value)
        labels_of.append(labels)
    (value,), (labels,) = values, labels_of
    value, labels = drop(value, labels, set(out))
    return arrange(value, labels, out)
