"""lrbd: W (out x in) -> A·B + blockdiag(D_1..D_g), a rank-r product plus g dense diagonal blocks
(layer: tngraph/layers/lrbd.py).

The blocks are fitted in the same whitened norm as the product, ||(W - A B - D) S||_F with
X^T X = S S^T (SVD-LLM's measure of the output error on the calibration inputs), by alternating
exact minimisations: the whitened truncated SVD of W - D, then each block given the product,
D_k = (R G)[rows k, cols k] G_kk^-1 with R = W - A B and G = S S^T (the identity unwhitened), which
only reads G's columns of block k. Each step cannot raise the error; SWEEPS rounds are run.

The block count g is the largest divisor of gcd(out, in) up to MAX_BLOCKS (16): the blocks then
hold in/g of each output row, 1/16 of a square layer's weights. A layer whose sides share no
divisor of at least MIN_BLOCKS is refused (its blocks would be most of the layer).
"""
from __future__ import annotations

import math

import torch

from ..lowrank import decompose_lowrank
from ..whitening import Whitening

MAX_BLOCKS, MIN_BLOCKS = 16, 4
SWEEPS = 2  # product, blocks, product, blocks, product


def blocks(out_features: int, in_features: int, **_: object) -> int:
    common = math.gcd(out_features, in_features)
    g = max(d for d in range(1, MAX_BLOCKS + 1) if common % d == 0)
    if g < MIN_BLOCKS:
        raise ValueError(f"lrbd needs a layer whose sides share a divisor of at least {MIN_BLOCKS}; {out_features}x{in_features} "
                         f"shares {common}")
    return g


def params(out_features: int, in_features: int, rank: int, **_: object) -> int:
    return rank * (out_features + in_features) + out_features * in_features // blocks(out_features, in_features)


def max_rank(out_features: int, in_features: int, **_: object) -> int:
    return min(out_features, in_features)


def block_diagonal(d: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*d)


def fit_blocks(residual: torch.Tensor, gram: torch.Tensor | None, g: int) -> torch.Tensor:
    """The (g, out/g, in/g) blocks minimising ||(residual - blockdiag(D)) S||_F (gram = S S^T, None: S = I)."""
    out_features, in_features = residual.shape
    rows, cols = out_features // g, in_features // g
    d = residual.new_empty((g, rows, cols))
    for k in range(g):
        r, c = slice(k * rows, (k + 1) * rows), slice(k * cols, (k + 1) * cols)
        if gram is None:
            d[k] = residual[r, c]
        else:  # D_k G_kk = (R G)[r, c], G_kk symmetric positive definite (the Gram is damped)
            rhs = residual[r] @ gram[:, c]
            d[k] = torch.linalg.solve(gram[c, c], rhs.T).T
    return d


def decompose(weight: torch.Tensor, rank: int, whitening: Whitening | None = None) -> dict[str, torch.Tensor]:
    """{"a": out x r, "b": r x in, "d": g x out/g x in/g} in the weight's dtype."""
    from . import check_weight

    check_weight(weight, rank, max_rank)
    g = blocks(*weight.shape)
    w = weight.detach().to(torch.float64)
    gram = whitening.s @ whitening.s.T if whitening is not None else None
    d = torch.zeros((g, w.shape[0] // g, w.shape[1] // g), dtype=torch.float64)
    for _ in range(SWEEPS):
        a, b = decompose_lowrank(w - block_diagonal(d), rank, whitening)
        d = fit_blocks(w - a @ b, gram, g)
    a, b = decompose_lowrank(w - block_diagonal(d), rank, whitening)
    return {"a": a.to(weight.dtype).contiguous(), "b": b.to(weight.dtype).contiguous(), "d": d.to(weight.dtype).contiguous()}
