"""The tensor-network layer: x's features unflattened to in_dims, contracted with the cores by an
einsum ("...<in>,<core>,...-><...out>"), flattened to out_features, + bias. Tucker, TT, TR, CP,
Kronecker and Monarch (tn/formats) all share it; their plan's network spec gives the statics.

On the GPU the op runs tngraph/kernels/tt.py for the two-mode layouts (tngraph.ops.network_cuda). Its ONNX
translation is written here rather than exported from the reference: TensorRT's Einsum takes no
ellipsis (the leading axes are flattened into one labelled axis) and ONNX's Einsum no bfloat16 (the
contraction becomes MatMuls along opt_einsum's path).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .. import ops
from ..lowering.einsum import einsum_as_matmuls, is_bfloat16
from .base import define


def reference(x: torch.Tensor, cores: list[torch.Tensor], bias: Optional[torch.Tensor], equation: str = "", in_dims: Sequence[int] = (),
              out_features: int = 0) -> torch.Tensor:
    return ops.network_reference(x, cores, equation, list(in_dims), out_features, bias)


def weight(cores: list[torch.Tensor], equation: str = "", in_dims: Sequence[int] = (), out_features: int = 0) -> torch.Tensor:
    return ops.network_matrix(cores, equation, out_features)  # uncached: the guard's one look


def cuda(x: torch.Tensor, cores: list[torch.Tensor], bias: Optional[torch.Tensor], equation: str = "", in_dims: Sequence[int] = (),
         out_features: int = 0) -> torch.Tensor:
    return ops.network_cuda(x, cores, equation, list(in_dims), out_features, bias)


def fake(x: torch.Tensor, cores: list[torch.Tensor], bias: Optional[torch.Tensor], equation: str = "", in_dims: Sequence[int] = (),
         out_features: int = 0) -> torch.Tensor:
    """The output's shape alone: running einsum on symbolic shapes plans a contraction for nothing."""
    size = 1
    for d in in_dims:
        size *= d
    torch._check(x.shape[-1] == size, lambda: f"tngraph::network: x has {x.shape[-1]} features, the network takes {size}")
    return x.new_empty((*x.shape[:-1], out_features))


def statics_of(plan) -> dict[str, Any]:
    net = plan.tensor_network()
    return {"equation": equation_of(net), "in_dims": [int(d) for d in net.in_dims], "out_features": int(net.out_features)}


def equation_of(net) -> str:
    """The layer's einsum for a TensorNetwork: "...<in>,<core>,...->...<out>"."""
    return "..." + net.in_labels + "," + ",".join(net.core_labels) + "->..." + net.out_labels


def onnx(x, cores, bias, equation: str, in_dims: Sequence[int], out_features: int):
    """ONNX: Reshape -> Einsum without an ellipsis (MatMuls in bfloat16) -> Reshape (+ Add)."""
    from onnxscript import opset18 as op

    x_labels, core_labels, out = ops.parse_equation(equation)
    row = next(c for c in "zyxwvutsrqponmlkjihgfedcba" if c not in equation)
    flat = f"{row}{x_labels}," + ",".join(core_labels) + f"->{row}{out}"
    lead = op.Shape(x, start=0, end=-1)
    rows = op.Reshape(x, op.Constant(value_ints=[-1, *[int(d) for d in in_dims]]))
    if is_bfloat16(x):
        shapes = [[None, *[int(d) for d in in_dims]], *[[int(d) for d in c.shape] for c in cores]]
        y = einsum_as_matmuls(op, flat, [rows, *cores], shapes)
    else:
        y = op.Einsum(rows, *cores, equation=flat)
    y = op.Reshape(y, op.Concat(lead, op.Constant(value_ints=[int(out_features)]), axis=0))
    return op.Add(y, bias) if bias is not None else y


NETWORK = define("network", reference, statics={"equation": (str, ""), "in_dims": (list[int], []), "out_features": (int, 0)},
                 statics_of=statics_of, weight=weight, cuda=cuda, fake=fake, onnx=onnx,
                 summary="tensor network, einsum of cores (Tucker, TT, TR, CP, Kronecker, Monarch)")
