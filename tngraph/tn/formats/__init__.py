"""Tensor-network formats: each decomposes a weight at a rank into a TensorNetwork.

Every format states its closed-form parameter count and largest useful rank, so that the rank
meeting a parameter budget is found without decomposing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..network import TensorNetwork
from ..whitening import Whitening, kronecker_whitening, whitening_from_gram
from . import lowrank, tt, tucker


@dataclass(frozen=True)
class Format:
    name: str
    decompose: Callable[..., TensorNetwork]  # (weight, rank, whitening=None, **shape options)
    params: Callable[..., int]  # (out, in, rank, **shape options)
    max_rank: Callable[..., int]  # (out, in, **shape options)
    # (gram, out, in, damping, **shape options) -> the whitening decompose() takes: the shared step,
    # shaped to the format (one S for svd, one S_k per input axis for tt and tucker)
    whitening: Callable[..., object]


def _svd_whitening(gram: torch.Tensor, out_features: int, in_features: int, damping: float) -> Whitening:
    return whitening_from_gram(gram, damping)


def _per_axis_whitening(module) -> Callable[..., list[Whitening]]:
    """Whitening for formats whose cores each touch one factor of the input: one S_k per input axis."""

    def build(gram: torch.Tensor, out_features: int, in_features: int, damping: float, **options) -> list[Whitening]:
        return kronecker_whitening(gram, module.in_dims(out_features, in_features, **options), damping)

    return build


FORMATS: dict[str, Format] = {
    "svd": Format("svd", lowrank.decompose, lowrank.params, lowrank.max_rank, _svd_whitening),
    "tt": Format("tt", tt.decompose, tt.params, tt.max_rank, _per_axis_whitening(tt)),
    "tucker": Format("tucker", tucker.decompose, tucker.params, tucker.max_rank, _per_axis_whitening(tucker)),
}


def rank_for_params(fmt: Format, out_features: int, in_features: int, budget_params: float, **options) -> int:
    """Largest rank whose network has at most `budget_params` parameters (at least 1)."""
    # parameter counts are integers: a budget that equals one up to float rounding admits it
    limit = budget_params * (1 + 1e-12) + 1e-9
    lo, hi = 1, fmt.max_rank(out_features, in_features, **options)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fmt.params(out_features, in_features, mid, **options) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_weight(weight: torch.Tensor, rank: int, max_rank_of: Callable[[int, int], int]) -> None:
    """The argument checks every format shares; each raises a ValueError naming the fix."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out x in), got shape {tuple(weight.shape)}")
    max_rank = max_rank_of(*weight.shape)
    if not torch.isfinite(weight).all():
        raise ValueError("the weight holds NaN/Inf values; repair the model's weights first")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise ValueError(f"rank must be an integer in [1, {max_rank}] for a {tuple(weight.shape)} weight, got {rank!r}")


__all__ = ["FORMATS", "Format", "Whitening", "check_weight", "rank_for_params"]
