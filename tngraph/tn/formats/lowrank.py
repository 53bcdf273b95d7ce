"""svd: W (out x in) -> A (out x r) · B (r x in), the (whitened) truncated SVD, as a TensorNetwork."""
from __future__ import annotations

import torch

from ..lowrank import decompose_lowrank
from ..network import TensorNetwork
from ..whitening import Whitening


def params(out_features: int, in_features: int, rank: int, **_: object) -> int:
    return rank * (out_features + in_features)


def max_rank(out_features: int, in_features: int, **_: object) -> int:
    return min(out_features, in_features)


def network(a: torch.Tensor, b: torch.Tensor) -> TensorNetwork:
    return TensorNetwork([b, a], ["ri", "or"], (b.shape[1],), (a.shape[0],), "i", "o", format="svd")


def decompose(weight: torch.Tensor, rank: int, whitening: Whitening | None = None,
              out_whitening: Whitening | None = None) -> TensorNetwork:
    from . import check_weight

    check_weight(weight, rank, max_rank)
    a, b = decompose_lowrank(weight, rank, whitening, out_whitening)
    return network(a, b)
