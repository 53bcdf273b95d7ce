"""Tensor-network formats: each decomposes a weight at a rank into a TensorNetwork.

Every format states its closed-form parameter count and largest useful rank, so that the rank
meeting a parameter budget is found without decomposing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..network import TensorNetwork
from ..whitening import Whitening, block_whitening, kronecker_whitening, whitening_from_gram
from . import cp, kron, lowrank, lrbd, monarch, tr, tt, tucker


@dataclass(frozen=True)
class Format:
    name: str
    decompose: Callable[..., TensorNetwork]  # (weight, rank, whitening=None, **options); a layer format: the factors by key
    params: Callable[..., int]  # (out, in, rank, **options)
    max_rank: Callable[..., int]  # (out, in, **options)
    # how the shared whitening step is shaped for this format: "full" (one S), "axes" (one S_k per
    # input axis, from the nearest Kronecker product of X^T X), "blocks" (one S_p per input block)
    whitening_kind: str
    input_split: Callable[..., object] | None = None  # in_dims (axes) or the block count (blocks)
    config_keys: tuple[tuple[str, str], ...] = ()  # (decompose option, Config field)
    summary: str = ""
    layer: str | None = None  # a format of a defined layer (tngraph.layers): its name; None: a TensorNetwork

    def options(self, config: object) -> dict:
        """The decompose/params options a Config sets for this format."""
        return {opt: getattr(config, key) for opt, key in self.config_keys}

    def whitening(self, gram: torch.Tensor, out_features: int, in_features: int, damping: float, **options):
        """The shared whitening step (SVD-LLM: Cholesky of the damped X^T X), in this format's shape."""
        if self.whitening_kind == "full":
            return whitening_from_gram(gram, damping)
        if self.whitening_kind == "axes":
            return kronecker_whitening(gram, self.input_split(out_features, in_features, **options), damping)
        return block_whitening(gram, self.input_split(out_features, in_features, **options), damping)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("svd", lowrank.decompose, lowrank.params, lowrank.max_rank, "full", summary="truncated SVD, A·B"),
        Format("tucker", tucker.decompose, tucker.params, tucker.max_rank, "axes", tucker.in_dims,
               (("modes", "tucker_modes"), ("iters", "tucker_iters")), "HOSVD (+HOOI) of the reshaped weight"),
        Format("tt", tt.decompose, tt.params, tt.max_rank, "axes", tt.in_dims, (("cores", "tt_cores"),),
               "tensor-train matrix (MPO), TT-SVD"),
        Format("tr", tr.decompose, tr.params, tr.max_rank, "axes", tr.in_dims,
               (("cores", "tr_cores"), ("ring", "tr_ring"), ("als", "tr_als")), "tensor ring, TR-SVD (+ALS)"),
        Format("cp", cp.decompose, cp.params, cp.max_rank, "axes", cp.in_dims,
               (("modes", "cp_modes"), ("max_iter", "cp_max_iter"), ("tol", "cp_tol"), ("time_limit", "cp_time_limit")),
               "CP of the reshaped weight, ALS"),
        Format("kron", kron.decompose, kron.params, kron.max_rank, "axes", kron.in_dims, (("shape", "kron_shape"),),
               "sum of Kronecker products, rearrangement + SVD"),
        Format("monarch", monarch.decompose, monarch.params, monarch.max_rank, "blocks", monarch.input_blocks,
               (("blocks", "monarch_blocks"),), "block-diagonal · permutation · block-diagonal, rank per block"),
        Format("lrbd", lrbd.decompose, lrbd.params, lrbd.max_rank, "full", summary="low rank + block diagonal, A·B + diag(D_1..D_g)",
               layer="lrbd"),
    )
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
