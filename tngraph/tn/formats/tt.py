"""tt: W (out x in) -> a tensor-train matrix (MPO) of `cores` cores, by TT-SVD.

out and in are each split into `cores` balanced factors (o_k, i_k); core k has shape
(r_{k-1}, o_k, i_k, r_k) with r_0 = r_d = 1 (squeezed), and every inner rank is at most `rank`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..network import TensorNetwork, balanced_factors, labels
from ..whitening import Whitening, unwhiten_input_axes, whiten_input_axes


def _dims(out_features: int, in_features: int, cores: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return balanced_factors(out_features, cores), balanced_factors(in_features, cores)


def _rank_caps(out_dims: tuple[int, ...], in_dims: tuple[int, ...]) -> list[int]:
    """The largest useful rank at each of the cores-1 bonds (the unfolding's smaller side)."""
    sizes = [o * i for o, i in zip(out_dims, in_dims)]
    return [min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)]


def _ranks(out_dims, in_dims, rank: int) -> list[int]:
    return [min(rank, cap) for cap in _rank_caps(out_dims, in_dims)]


def params(out_features: int, in_features: int, rank: int, cores: int = 2, **_: object) -> int:
    out_dims, in_dims = _dims(out_features, in_features, cores)
    bonds = [1, *_ranks(out_dims, in_dims, rank), 1]
    return sum(bonds[k] * o * i * bonds[k + 1] for k, (o, i) in enumerate(zip(out_dims, in_dims)))


def max_rank(out_features: int, in_features: int, cores: int = 2, **_: object) -> int:
    return max(_rank_caps(*_dims(out_features, in_features, cores)), default=1)


def in_dims(out_features: int, in_features: int, cores: int = 2, **_: object) -> tuple[int, ...]:
    """How the input is split across the cores (what a per-axis whitening must match)."""
    return _dims(out_features, in_features, cores)[1]


def decompose(
    weight: torch.Tensor, rank: int, whitening: Sequence[Whitening] | None = None, cores: int = 2,
    dims: tuple[Sequence[int], Sequence[int]] | None = None, format: str = "tt",
) -> TensorNetwork:
    """TT-SVD of W, or of W·(S_1 ⊗ ... ⊗ S_d) with each core's input axis mapped back by S_k^-1 when
    `whitening` gives one Whitening per input axis (see whitening.kronecker_whitening).
    `dims` = (out_dims, in_dims) overrides the balanced split (the kron format sets its own)."""
    from . import check_weight

    if cores < 2:
        raise ValueError(f"a tensor train needs at least 2 cores, got {cores}")
    check_weight(weight, rank, lambda o, i: max(_rank_caps(*(dims or _dims(o, i, cores))), default=1))
    out_dims, in_dims = (tuple(dims[0]), tuple(dims[1])) if dims is not None else _dims(*weight.shape, cores)
    ranks = _ranks(out_dims, in_dims, rank)
    w = weight.detach().to(torch.float64).reshape(*out_dims, *in_dims)
    if whitening is not None:
        w = whiten_input_axes(w, whitening, cores, format)
    order = [axis for k in range(cores) for axis in (k, cores + k)]  # (o1, i1, o2, i2, ...)
    rest = w.permute(order).reshape(-1)
    result, prev = [], 1
    for k in range(cores - 1):
        mat = rest.reshape(prev * out_dims[k] * in_dims[k], -1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        r = ranks[k]
        result.append(u[:, :r].reshape(prev, out_dims[k], in_dims[k], r))
        rest = s[:r, None] * vh[:r]
        prev = r
    result.append(rest.reshape(prev, out_dims[-1], in_dims[-1], 1))
    result[0], result[-1] = result[0][0], result[-1][..., 0]
    o_lab, i_lab = labels(cores), labels(cores, skip=labels(cores))
    r_lab = labels(cores - 1, skip=o_lab + i_lab)
    core_labels = []
    for k in range(cores):
        left = r_lab[k - 1] if k > 0 else ""
        right = r_lab[k] if k < cores - 1 else ""
        core_labels.append(left + o_lab[k] + i_lab[k] + right)
    if whitening is not None:
        result = unwhiten_input_axes(result, core_labels, i_lab, whitening)
    dtype = weight.dtype
    return TensorNetwork([c.to(dtype).contiguous() for c in result], core_labels, in_dims, out_dims, i_lab, o_lab, format=format)
