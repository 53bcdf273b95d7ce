"""The lrbd layer: low rank plus block diagonal, y = x B^T A^T + blockdiag(D_1..D_g) x + bias.

A (out x r) and B (r x in) are a low-rank product; D (g x out/g x in/g) holds g dense diagonal
blocks: output block k reads only input block k. The blocks keep what a low-rank product misses
worst, the local (near-diagonal) part of the weight; see tn/formats/lrbd.py for how they are fitted.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import define


def reference(x: torch.Tensor, factors: list[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    a, b, d = factors
    blocks, rows, cols = d.shape
    # (..., g*i) -> (g, n, i) @ (g, i, o) -> (..., g*o): one batched matmul, no Einsum for the exporters
    grouped = x.reshape(-1, blocks, cols).transpose(0, 1)
    diagonal = torch.bmm(grouped, d.transpose(1, 2)).transpose(0, 1).reshape(*x.shape[:-1], blocks * rows)
    y = F.linear(F.linear(x, b), a) + diagonal
    return y + bias if bias is not None else y


def weight(factors: list[torch.Tensor]) -> torch.Tensor:
    a, b, d = factors
    return a @ b + torch.block_diag(*d)


LRBD = define("lrbd", reference, ("a", "b", "d"), weight=weight, summary="low rank + block diagonal, A·B + diag(D_1..D_g)")
