"""cp: W (out x in) reshaped to an (o_1..o_k, i_1..i_k) tensor -> a sum of `rank` outer products
(CANDECOMP/PARAFAC), fitted by ALS.

One factor matrix (n x rank) per mode, all sharing the rank label. The fit starts from the leading
singular vectors of each unfolding (seeded random columns beyond them) and runs ALS sweeps until the
relative error improves by less than `tol` over a sweep; `max_iter` sweeps or `time_limit` seconds
without that raise a CPConvergenceError that says what was reached and what to change. At
rank >= max_rank the exact decomposition (one component per entry of the smaller modes) is built
directly. With a per-input-axis whitening the fit is to W·(S_1 ⊗ ... ⊗ S_k).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ...errors import TngraphError
from ..als import als
from ..network import TensorNetwork, balanced_factors, labels
from ..whitening import Whitening, unwhiten_input_axes, whiten_input_axes


class CPConvergenceError(TngraphError, ValueError):
    """CP-ALS stopped at its iteration or time limit before the error settled."""


def _dims(out_features: int, in_features: int, modes: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return balanced_factors(out_features, modes), balanced_factors(in_features, modes)


def in_dims(out_features: int, in_features: int, modes: int = 2, **_: object) -> tuple[int, ...]:
    return _dims(out_features, in_features, modes)[1]


def params(out_features: int, in_features: int, rank: int, modes: int = 2, **_: object) -> int:
    out_dims, in_dims_ = _dims(out_features, in_features, modes)
    return rank * (sum(out_dims) + sum(in_dims_))


def max_rank(out_features: int, in_features: int, modes: int = 2, **_: object) -> int:
    """Every tensor has an exact CP of rank prod(sizes) / max(sizes): one component per index of the other modes."""
    sizes = [*_dims(out_features, in_features, modes)[0], *_dims(out_features, in_features, modes)[1]]
    return math.prod(sizes) // max(sizes)


def decompose(
    weight: torch.Tensor,
    rank: int,
    whitening: Sequence[Whitening] | None = None,
    modes: int = 2,
    max_iter: int = 200,
    tol: float = 1e-2,
    time_limit: float | None = 120.0,
    seed: int = 0,
) -> TensorNetwork:
    from . import check_weight

    if modes < 1:
        raise ValueError(f"cp needs at least one mode per side, got {modes}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"cp max_iter must be a positive integer, got {max_iter!r}")
    check_weight(weight, rank, lambda o, i: max_rank(o, i, modes))
    out_dims, in_dims_ = _dims(*weight.shape, modes)
    sizes = [*out_dims, *in_dims_]
    t = weight.detach().to(torch.float64).reshape(*sizes)
    if whitening is not None:
        t = whiten_input_axes(t, whitening, modes, "cp")
    mode_labels = labels(2 * modes)
    r_label = labels(1, skip=mode_labels)
    core_labels = [m + r_label for m in mode_labels]
    o_lab, i_lab = mode_labels[:modes], mode_labels[modes:]
    if rank >= max_rank(*weight.shape, modes):
        factors = exact_factors(t, rank)
    else:
        factors = initial_factors(t, rank, seed)
        net = TensorNetwork(factors, core_labels, in_dims_, out_dims, i_lab, o_lab, format="cp")
        fit = als(net, t, sweeps=max_iter, tol=tol, time_limit=time_limit)
        if not fit.converged:
            last = fit.errors[-1]
            change = (fit.errors[-2] - last) / max(fit.errors[-2], 1e-300) if len(fit.errors) > 1 else float("nan")
            raise CPConvergenceError(
                f"CP-ALS at rank {rank} for a {tuple(weight.shape)} weight did not converge: after {fit.sweeps} sweeps "
                f"({fit.seconds:.1f} s) the relative error is {last:.4g}, still improving by {change:.2g} per sweep "
                f"(tol {tol:g})",
                "raise cp_max_iter or cp_time_limit, loosen cp_tol, or choose another format",
            )
        factors = fit.network.cores
    if whitening is not None:
        factors = unwhiten_input_axes(factors, core_labels, i_lab, whitening)
    dtype = weight.dtype
    return TensorNetwork([f.to(dtype).contiguous() for f in factors], core_labels, in_dims_, out_dims, i_lab, o_lab, format="cp")


def initial_factors(t: torch.Tensor, rank: int, seed: int) -> list[torch.Tensor]:
    """Leading left singular vectors of each unfolding, seeded Gaussian columns where a mode is too small;
    the first factor carries the tensor's scale."""
    gen = torch.Generator().manual_seed(seed)
    factors = []
    for axis, n in enumerate(t.shape):
        u, _, _ = torch.linalg.svd(torch.movedim(t, axis, 0).reshape(n, -1), full_matrices=False)
        k = min(rank, u.shape[1])
        extra = torch.randn(n, rank - k, generator=gen, dtype=torch.float64) / math.sqrt(n)
        factors.append(torch.cat([u[:, :k], extra], dim=1))
    factors[0] = factors[0] * (torch.linalg.norm(t) / math.sqrt(rank))
    return factors


def exact_factors(t: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """An exact CP: the largest mode's factor holds the tensor's fibres, the others one-hot indicators;
    columns beyond prod(other sizes) are zero."""
    sizes = list(t.shape)
    big = max(range(len(sizes)), key=lambda a: (sizes[a], -a))
    rest = [n for a, n in enumerate(sizes) if a != big]
    count = math.prod(rest)
    fibres = torch.movedim(t, big, -1).reshape(count, sizes[big]).T  # (n_big, count)
    factors = []
    index = torch.arange(count)
    for a, n in enumerate(sizes):
        f = torch.zeros(n, rank, dtype=torch.float64)
        if a == big:
            f[:, :count] = fibres
        else:
            pos = [b for b in range(len(sizes)) if b != big].index(a)
            stride = math.prod(rest[pos + 1 :])
            f[(index // stride) % n, index] = 1.0
        factors.append(f)
    return factors
