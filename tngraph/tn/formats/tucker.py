"""tucker: W (out x in) reshaped to an (o_1..o_k, i_1..i_k) tensor -> core x_n U_n, by truncated HOSVD (+ optional HOOI).

Every mode keeps min(rank, n) leading singular vectors of its unfolding, so the subspaces grow
nested with the rank and the error never grows with it. With a per-input-axis whitening
(S_1 ⊗ ... ⊗ S_k) the HOSVD runs on W·S and each input factor is mapped back by S_j^-1.
"""
from __future__ import annotations

import math
from typing import Sequence

import opt_einsum as oe
import torch

from ..network import TensorNetwork, balanced_factors, labels
from ..whitening import Whitening, unwhiten_input_axes, whiten_input_axes


def _dims(out_features: int, in_features: int, modes: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return balanced_factors(out_features, modes), balanced_factors(in_features, modes)


def in_dims(out_features: int, in_features: int, modes: int = 2, **_: object) -> tuple[int, ...]:
    return _dims(out_features, in_features, modes)[1]


def params(out_features: int, in_features: int, rank: int, modes: int = 2, **_: object) -> int:
    sizes = [*_dims(out_features, in_features, modes)[0], *_dims(out_features, in_features, modes)[1]]
    ranks = [min(rank, n) for n in sizes]
    return sum(n * r for n, r in zip(sizes, ranks)) + math.prod(ranks)


def max_rank(out_features: int, in_features: int, modes: int = 2, **_: object) -> int:
    out_dims, in_dims_ = _dims(out_features, in_features, modes)
    return max(*out_dims, *in_dims_)


def _leading(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """The k leading left singular vectors of a wide matrix, from the eigenvectors of M M^T (n x n)."""
    values, vectors = torch.linalg.eigh(matrix @ matrix.T)
    return vectors.flip(-1)[:, :k]


def decompose(
    weight: torch.Tensor, rank: int, whitening: Sequence[Whitening] | None = None, modes: int = 2, iters: int = 0
) -> TensorNetwork:
    """Truncated HOSVD, then `iters` sweeps of HOOI (higher-order orthogonal iteration), which never
    raise the error of the HOSVD start."""
    from . import check_weight

    if modes < 1:
        raise ValueError(f"tucker needs at least one mode per side, got {modes}")
    check_weight(weight, rank, lambda o, i: max_rank(o, i, modes))
    out_dims, in_dims_ = _dims(*weight.shape, modes)
    sizes = [*out_dims, *in_dims_]
    t = weight.detach().to(torch.float64).reshape(*sizes)
    if whitening is not None:
        t = whiten_input_axes(t, whitening, modes, "tucker")
    factors = [_leading(torch.movedim(t, axis, 0).reshape(n, -1), min(rank, n)) for axis, n in enumerate(sizes)]
    mode_labels = labels(2 * modes)
    rank_labels = labels(2 * modes, skip=mode_labels)
    for _ in range(iters):  # HOOI: each factor from the tensor projected on all the other factors
        for axis, n in enumerate(sizes):
            others = [j for j in range(len(sizes)) if j != axis]
            out = mode_labels[axis] + "".join(rank_labels[j] for j in others)
            projected = oe.contract(
                mode_labels + "," + ",".join(mode_labels[j] + rank_labels[j] for j in others) + "->" + out,
                t, *(factors[j] for j in others), backend="torch",
            )
            factors[axis] = _leading(projected.reshape(n, -1), factors[axis].shape[1])
    core = oe.contract(
        mode_labels + "," + ",".join(m + r for m, r in zip(mode_labels, rank_labels)) + "->" + rank_labels,
        t, *factors, backend="torch",
    )
    o_lab, i_lab = mode_labels[:modes], mode_labels[modes:]
    cores = [core, *factors]
    core_labels = [rank_labels, *(m + r for m, r in zip(mode_labels, rank_labels))]
    if whitening is not None:  # input factor U_j (i_j x r) -> S_j^-T U_j
        cores = unwhiten_input_axes(cores, core_labels, i_lab, whitening)
    dtype = weight.dtype
    return TensorNetwork([c.to(dtype).contiguous() for c in cores], core_labels, in_dims_, out_dims, i_lab, o_lab, format="tucker")
