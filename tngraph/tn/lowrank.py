"""Low-rank format: W (out x in) -> A (out x r) @ B (r x in), by truncated (whitened) SVD."""
from __future__ import annotations

import math

import torch

from .whitening import OutputGram, ProjectedGradGram, Whitening, descending_eigenvalues


def lowrank_params(out_features: int, in_features: int, rank: int) -> int:
    return rank * (out_features + in_features)


def rank_for_budget(out_features: int, in_features: int, budget: float, bias: bool = False) -> int:
    """Largest rank whose factors plus the (kept) bias stay within `budget` of the dense parameters."""
    bias_params = out_features if bias else 0
    dense = out_features * in_features + bias_params
    rank = math.floor((budget * dense - bias_params) / (out_features + in_features) + 1e-9)
    return max(1, min(rank, min(out_features, in_features)))


def decompose_rows_weighted(
    weight: torch.Tensor, rank: int, row_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) minimising sum_v w_v ||W_v - (A B)_v||^2: the truncated SVD of diag(sqrt w) W, mapped back.

    For embedding tables, with w_v how often row (token) v was looked up: frequent rows are kept
    more exactly. Rows may not have zero weight (smooth the counts first).
    """
    if row_weights is None:
        return decompose_lowrank(weight, rank)
    root = row_weights.to(torch.float64).clamp_min(1e-12).sqrt()[:, None]
    a, b = decompose_lowrank(weight.detach().to(torch.float64) * root, rank)
    return (a / root).to(weight.dtype).contiguous(), b.to(weight.dtype).contiguous()


def _short_side(target: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(target or its transpose, whichever has no more rows than columns; whether it is target itself)."""
    wide = target.shape[0] < target.shape[1]
    return (target if wide else target.T), wide


def squared_singular_values(target: torch.Tensor) -> torch.Tensor:
    """The squared singular values of `target`, largest first: the eigenvalues of its smaller Gram
    matrix, several times faster than an SVD of a tall or wide matrix and exact to rounding relative
    to the largest (all an energy tail reads)."""
    m, _ = _short_side(target)
    return descending_eigenvalues(m @ m.T)


def _top_singular(target: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top `rank` singular triplets from the eigen-decomposition of the smaller Gram matrix: a
    fraction of the full SVD's work memory for tall or wide matrices (float64, top components only)."""
    m, wide = _short_side(target)  # rows <= columns
    values, vectors = torch.linalg.eigh(m @ m.T)
    values, vectors = values.flip(0)[:rank].clamp_min(0), vectors.flip(1)[:, :rank]
    s = values.sqrt()
    other = (vectors.T @ m) / s.clamp_min(torch.finfo(s.dtype).tiny)[:, None]
    return (vectors, s, other) if wide else (other.T, s, vectors.T)


def decompose_lowrank(
    weight: torch.Tensor, rank: int, whitening: Whitening | None = None, out_whitening: Whitening | None = None, *,
    lean: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (A, B) with A @ B the best rank-`rank` approximation of W (in the whitened norm if given).

    `whitening` (inputs, X^T X = S S^T) and `out_whitening` (output gradients, G = L L^T) make it the
    best in ||L^T (W - A B) S||_F, the Gauss-Newton (K-FAC) estimate of the model's output error.

    Computed in float64 whatever the weight's dtype; the factors come back in the weight's dtype,
    with the singular values split evenly between them. `lean` takes the top singular vectors from
    the eigen-decomposition of the smaller Gram matrix instead of a full SVD (less work memory).
    """
    out_features, in_features = weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank {rank} out of range [1, {min(out_features, in_features)}] for a {tuple(weight.shape)} weight")
    if isinstance(whitening, OutputGram):
        a, b, _ = lowrank_from_outputs(weight, rank, whitening, out_whitening)
        return a, b
    if isinstance(out_whitening, ProjectedGradGram):
        return lowrank_from_gradients(weight, rank, whitening, out_whitening)
    target = weight.detach().to(torch.float64)
    target = whitening.apply(target) if whitening is not None else target  # no second float64 copy kept (wide layers)
    target = out_whitening.apply_left(target) if out_whitening is not None else target
    if lean:  # block-by-block compression: memory before the last digits of the small singular values
        u, s, vh = _top_singular(target, rank)
    else:
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
    root = s[:rank].sqrt()
    a = u[:, :rank] * root
    b = root[:, None] * vh[:rank]
    if whitening is not None:
        b = whitening.unapply(b)
    if out_whitening is not None:
        a = out_whitening.unapply_left(a)
    return a.to(weight.dtype).contiguous(), b.to(weight.dtype).contiguous()


def lowrank_from_outputs(weight: torch.Tensor, rank: int, whitening: OutputGram, out_whitening=None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """decompose_lowrank through the target's output statistics: (A, B, Q) with A B = Q W.

    With T = L^T W S = U Σ V^T (whitening.left_gram is T T^T), the factors decompose_lowrank makes
    from T are A = L^-T U_r Σ_r^1/2 and B = Σ_r^1/2 V_r^T S^-1 = Σ_r^-1/2 U_r^T L^T W: S is never
    needed. Q = A Σ_r^-1/2 U_r^T L^T (out x out, float64) is what the guard measures the error by.
    Directions the weight does not reach (singular values at rounding level) get zero factors."""
    w = weight.detach().to(torch.float64)
    values, vectors = torch.linalg.eigh(whitening.left_gram(w, out_whitening))
    root, inverse = _balanced_roots(values, rank, max(w.shape))
    u = vectors.flip(1)[:, :rank]
    a = u * root
    r = (out_whitening.times(u * inverse) if out_whitening is not None else u * inverse).T  # Σ^-1/2 U^T L^T
    b = r @ w
    if out_whitening is not None:
        a = out_whitening.unapply_left(a)
    return a.to(weight.dtype).contiguous(), b.to(weight.dtype).contiguous(), a @ r


def _balanced_roots(values: torch.Tensor, rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_r^1/2, Σ_r^-1/2) of the top `rank` of a Gram matrix's ascending eigenvalues, with zero for
    directions the weight does not reach (singular values at rounding level of the largest)."""
    s = values.flip(0)[:rank].clamp_min(0).sqrt()
    reached = s > s[0] * size * torch.finfo(torch.float64).eps
    root = torch.where(reached, s.sqrt(), torch.zeros_like(s))
    return root, torch.where(reached, 1 / root.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(root))


def lowrank_from_gradients(weight: torch.Tensor, rank: int, whitening, out_whitening: ProjectedGradGram
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """decompose_lowrank with the output whitening known through the inputs (a wide target's
    ProjectedGradGram): with T = L^T W S = U Σ V^T (out_whitening.right_gram is T^T T), the factors
    decompose_lowrank makes from T are A = L^-T U_r Σ_r^1/2 = W S V_r Σ_r^-1/2 and
    B = Σ_r^1/2 V_r^T S^-1: L is never needed."""
    w = weight.detach().to(torch.float64)
    values, vectors = torch.linalg.eigh(out_whitening.right_gram(w, whitening))
    root, inverse = _balanced_roots(values, rank, max(w.shape))
    v = vectors.flip(1)[:, :rank]
    a = (whitening.apply(w) if whitening is not None else w) @ (v * inverse)
    b = (v * root).T
    if whitening is not None:
        b = whitening.unapply(b)
    return a.to(weight.dtype).contiguous(), b.to(weight.dtype).contiguous()
