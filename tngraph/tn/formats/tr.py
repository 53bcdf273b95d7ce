"""tr: W (out x in) -> a tensor ring of `cores` cores, by TR-SVD with optional ALS refinement.

out and in are split into `cores` balanced factors; core k has shape (r_{k-1}, o_k, i_k, r_k) and the
ring closes with r_d = r_0 = `ring`. TR-SVD (Zhao et al. 2016) truncates the first unfolding to
r_0 · r_1 and splits that bond into the closing and the first inner bond, then continues as TT-SVD;
every inner bond is at most `rank`. `ring` = 1 is a tensor train. `als` sweeps of alternating least
squares (on the whitened weight when whitened) then refine all cores together.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..als import als as run_als
from ..network import TensorNetwork, balanced_factors, labels
from ..whitening import Whitening, unwhiten_input_axes, whiten_input_axes


def _dims(out_features: int, in_features: int, cores: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return balanced_factors(out_features, cores), balanced_factors(in_features, cores)


def in_dims(out_features: int, in_features: int, cores: int = 3, **_: object) -> tuple[int, ...]:
    return _dims(out_features, in_features, cores)[1]


def _bonds(out_features: int, in_features: int, rank: int, cores: int, ring: int) -> list[int]:
    """[r_0, r_1, ..., r_{d-1}, r_0]: the ranks TR-SVD reaches at inner-bond cap `rank`."""
    out_dims, in_dims_ = _dims(out_features, in_features, cores)
    n = [o * i for o, i in zip(out_dims, in_dims_)]
    total = math.prod(n)
    r0 = max(1, min(ring, n[0], total // n[0]))
    bonds = [r0, max(1, min(rank, -(-min(n[0], total // n[0]) // r0)))]
    for k in range(1, cores - 1):
        rows = bonds[-1] * n[k]
        cols = math.prod(n[k + 1 :]) * r0
        bonds.append(max(1, min(rank, rows, cols)))
    return [*bonds, r0]


def params(out_features: int, in_features: int, rank: int, cores: int = 3, ring: int = 2, **_: object) -> int:
    out_dims, in_dims_ = _dims(out_features, in_features, cores)
    b = _bonds(out_features, in_features, rank, cores, ring)
    return sum(b[k] * o * i * b[k + 1] for k, (o, i) in enumerate(zip(out_dims, in_dims_)))


def max_rank(out_features: int, in_features: int, cores: int = 3, ring: int = 2, **_: object) -> int:
    """The smallest inner-bond cap at which TR-SVD is exact (larger caps change nothing)."""
    out_dims, in_dims_ = _dims(out_features, in_features, cores)
    n = [o * i for o, i in zip(out_dims, in_dims_)]
    r0 = max(1, min(ring, n[0], math.prod(n[1:])))
    caps = [-(-min(n[0], math.prod(n[1:])) // r0)]
    rk = caps[0]
    for k in range(1, cores - 1):
        rk = min(rk * n[k], math.prod(n[k + 1 :]) * r0)
        caps.append(rk)
    return max(1, max(caps))


def decompose(
    weight: torch.Tensor,
    rank: int,
    whitening: Sequence[Whitening] | None = None,
    cores: int = 3,
    ring: int = 2,
    als: int = 0,
    als_tol: float = 1e-4,
) -> TensorNetwork:
    from . import check_weight

    if cores < 2:
        raise ValueError(f"a tensor ring needs at least 2 cores, got {cores}")
    if isinstance(ring, bool) or not isinstance(ring, int) or ring < 1:
        raise ValueError(f"the ring rank must be a positive integer, got {ring!r}")
    check_weight(weight, rank, lambda o, i: max_rank(o, i, cores, ring))
    out_features, in_features = weight.shape
    out_dims, in_dims_ = _dims(out_features, in_features, cores)
    bonds = _bonds(out_features, in_features, rank, cores, ring)
    w = weight.detach().to(torch.float64).reshape(*out_dims, *in_dims_)
    if whitening is not None:
        w = whiten_input_axes(w, whitening, cores, "tr")
    order = [axis for k in range(cores) for axis in (k, cores + k)]  # (o1, i1, o2, i2, ...)
    n = [o * i for o, i in zip(out_dims, in_dims_)]
    full = w.permute(order).reshape(n)
    # first unfolding: rank r0 * r1, split into the closing bond and the first inner bond
    r0, r1 = bonds[0], bonds[1]
    u, s, vh = torch.linalg.svd(full.reshape(n[0], -1), full_matrices=False)
    k0 = r0 * r1
    u, s, vh = _pad(u[:, :k0], s[:k0], vh[:k0], k0)
    result = [u.reshape(n[0], r0, r1).permute(1, 0, 2)]  # (r0, n0, r1)
    rest = (s[:, None] * vh).reshape(r0, r1, -1).permute(1, 2, 0)  # (r1, n1...n_{d-1}, r0)
    prev = r1
    for k in range(1, cores - 1):
        mat = rest.reshape(prev * n[k], -1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        r = bonds[k + 1]
        u, s, vh = _pad(u[:, :r], s[:r], vh[:r], r)
        result.append(u.reshape(prev, n[k], r))
        rest = s[:, None] * vh
        prev = r
    result.append(rest.reshape(prev, n[-1], r0))
    result = [c.reshape(c.shape[0], o, i, c.shape[-1]) for c, o, i in zip(result, out_dims, in_dims_)]
    o_lab, i_lab = labels(cores), labels(cores, skip=labels(cores))
    r_lab = labels(cores, skip=o_lab + i_lab)
    core_labels = [r_lab[k] + o_lab[k] + i_lab[k] + r_lab[(k + 1) % cores] for k in range(cores)]
    net = TensorNetwork(result, core_labels, in_dims_, out_dims, i_lab, o_lab, format="tr")
    if als > 0:
        net = run_als(net, w, sweeps=als, tol=als_tol).network
    result = net.cores
    if whitening is not None:
        result = unwhiten_input_axes(result, core_labels, i_lab, whitening)
    dtype = weight.dtype
    return TensorNetwork([c.to(dtype).contiguous() for c in result], core_labels, in_dims_, out_dims, i_lab, o_lab, format="tr")


def _pad(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int):
    """Zero-pad a truncated SVD to exactly k terms (the bond sizes are fixed by the parameter count)."""
    missing = k - s.shape[0]
    if missing <= 0:
        return u, s, vh
    return (torch.cat([u, u.new_zeros(u.shape[0], missing)], 1), torch.cat([s, s.new_zeros(missing)]),
            torch.cat([vh, vh.new_zeros(missing, vh.shape[1])], 0))
