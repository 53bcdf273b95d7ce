"""kron: W (out x in) -> a sum of `rank` Kronecker products A_r ⊗ B_r, by rearrangement and SVD
(Van Loan and Pitsianis 1993).

W[(a, b), (c, d)] = Σ_r A_r[a, c] B_r[b, d] with A_r of shape (o1 x i1) and B_r of (out/o1 x in/i1):
rearranging W so that each (a, c) block becomes a row turns the sum into a rank-`rank` matrix, whose
truncated SVD is the best such sum. As a network this is a two-core tensor train over the split
(o1, o2) x (i1, i2), so it shares TT-SVD and the per-axis whitening; what kron adds is the choice of
the factor shape: `shape` = (o1, i1) of A, balanced by default.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..network import TensorNetwork, balanced_factors
from ..whitening import Whitening
from . import tt


def dims(out_features: int, in_features: int, shape: Sequence[int] | None = None, **_: object):
    """((o1, o2), (i1, i2)): A is o1 x i1, B is o2 x i2."""
    if shape is None:
        return balanced_factors(out_features, 2), balanced_factors(in_features, 2)
    if len(shape) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape):
        raise ValueError(f"kron shape must be two positive integers (rows, cols of A), got {shape!r}")
    o1, i1 = shape
    if out_features % o1 or in_features % i1:
        raise ValueError(f"kron shape {o1}x{i1} must divide the weight's {out_features}x{in_features}")
    return (o1, out_features // o1), (i1, in_features // i1)


def in_dims(out_features: int, in_features: int, shape: Sequence[int] | None = None, **_: object) -> tuple[int, ...]:
    return dims(out_features, in_features, shape)[1]


def params(out_features: int, in_features: int, rank: int, shape: Sequence[int] | None = None, **_: object) -> int:
    (o1, o2), (i1, i2) = dims(out_features, in_features, shape)
    return min(rank, max_rank(out_features, in_features, shape)) * (o1 * i1 + o2 * i2)


def max_rank(out_features: int, in_features: int, shape: Sequence[int] | None = None, **_: object) -> int:
    (o1, o2), (i1, i2) = dims(out_features, in_features, shape)
    return min(o1 * i1, o2 * i2)


def decompose(
    weight: torch.Tensor, rank: int, whitening: Sequence[Whitening] | None = None, shape: Sequence[int] | None = None
) -> TensorNetwork:
    from . import check_weight

    check_weight(weight, rank, lambda o, i: max_rank(o, i, shape))
    return tt.decompose(weight, rank, whitening, cores=2, dims=dims(*weight.shape, shape), format="kron")
