"""monarch: W (out x in) -> two block-diagonal factors with a permutation between them (Dao et al. 2022),
generalised with a rank per block pair.

The input is split into `p` blocks of width q (in = p·q) and the output into k groups of s (out = k·s):

    y[p, k, r] = Σ_q R[p, k, r, q] x[p, q]        (block-diagonal over the input blocks p)
    out[k, s]  = Σ_{p, r} L[k, s, p, r] y[p, k, r] (block-diagonal over the output groups k)

so the (k, p) block of W (s x q) is the rank-r product L[k, :, p, :] · R[p, k, :, :]. The closest such
W is found block by block with a truncated SVD; whitened, each input block p uses its own S_p from the
diagonal block of X^T X (block-diagonal whitening: correlations across input blocks are left out).
Parameters: r · p · k · (q + s); at r = min(q, s) the factorisation is exact.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..network import TensorNetwork, balanced_factors
from ..whitening import Whitening


def _split(n: int, blocks: int | None) -> tuple[int, int]:
    """(number of blocks, block width); by default the smaller balanced factor is the block count.
    `blocks` sets the input's block count p; the output's group count k is always the default."""
    if blocks is None:
        big, small = balanced_factors(n, 2)
        return small, big
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1 or n % blocks:
        raise ValueError(f"monarch blocks must be a positive divisor of {n}, got {blocks!r}")
    return blocks, n // blocks


def input_blocks(out_features: int, in_features: int, blocks: int | None = None, **_: object) -> int:
    return _split(in_features, blocks)[0]


def params(out_features: int, in_features: int, rank: int, blocks: int | None = None, **_: object) -> int:
    p, q = _split(in_features, blocks)
    k, s = _split(out_features, None)
    return rank * p * k * (q + s)


def max_rank(out_features: int, in_features: int, blocks: int | None = None, **_: object) -> int:
    q = _split(in_features, blocks)[1]
    s = _split(out_features, None)[1]
    return min(q, s)


def decompose(
    weight: torch.Tensor, rank: int, whitening: Sequence[Whitening] | None = None, blocks: int | None = None
) -> TensorNetwork:
    from . import check_weight

    check_weight(weight, rank, lambda o, i: max_rank(o, i, blocks))
    out_features, in_features = weight.shape
    p, q = _split(in_features, blocks)
    k, s = _split(out_features, None)
    w = weight.detach().to(torch.float64).reshape(k, s, p, q).permute(0, 2, 1, 3)  # (k, p, s, q) blocks
    if whitening is not None:
        if len(whitening) != p or any(white.s.shape[0] != q for white in whitening):
            raise ValueError(f"the monarch format needs one whitening per input block ({p} blocks of {q})")
        w = torch.stack([w[:, j] @ whitening[j].s for j in range(p)], dim=1)
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)  # batched over (k, p)
    left = u[..., :rank] * sv[..., None, :rank]  # (k, p, s, r)
    right = vh[..., :rank, :]  # (k, p, r, q)
    if whitening is not None:
        right = torch.stack([whitening[j].unapply(right[:, j]) for j in range(p)], dim=1)
    l_core = left.permute(0, 2, 1, 3)  # L[k, s, p, r]
    r_core = right.permute(1, 0, 2, 3)  # R[p, k, r, q]
    dtype = weight.dtype
    return TensorNetwork(
        [r_core.to(dtype).contiguous(), l_core.to(dtype).contiguous()], ["pkrq", "kspr"], (p, q), (k, s), "pq", "ks",
        format="monarch",
    )
