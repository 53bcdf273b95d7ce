"""The low-rank layer: y = act(x B^T A^T + bias), A (out x r) and B (r x in) the whitened truncated SVD.

`act` (none, gelu, silu, relu) is the layer's epilogue: the fuse pass folds an activation that
follows the layer into it. On the GPU the op runs the Triton kernels of tngraph/kernels/lowrank.py (or the
two-GEMM chain, or the dense product where allowed), chosen per shape by tngraph.ops.choose.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from .base import define


def reference(x: torch.Tensor, factors: list[torch.Tensor], bias: Optional[torch.Tensor], act: str = "none") -> torch.Tensor:
    a, b = factors
    return ops.lowrank_reference(x, b, a, bias, act)


def weight(factors: list[torch.Tensor], act: str = "none") -> torch.Tensor:
    a, b = factors
    return a @ b


def cuda(x: torch.Tensor, factors: list[torch.Tensor], bias: Optional[torch.Tensor], act: str = "none") -> torch.Tensor:
    a, b = factors
    return ops.lowrank_cuda(x, b, a, bias, act)


LOWRANK = define("lowrank", reference, ("a", "b"), statics={"act": (str, "none")}, weight=weight, cuda=cuda, epilogue="act",
                 summary="low rank, act(x·Bᵀ·Aᵀ + bias)")
