"""Activation whitening shared by every format: X^T X = S S^T, decompose W S, map back with S^-1.

Minimising ||(W - W') X^T||_F equals minimising ||(W - W') S||_F, so a format that is optimal in
the plain Frobenius norm becomes optimal on the calibration activations (SVD-LLM).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Whitening:
    """S with X^T X ~= S S^T; `lower` tells whether S is a Cholesky factor (triangular)."""

    s: torch.Tensor  # (in, in), float64
    lower: bool

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """W -> W S."""
        return weight.to(torch.float64) @ self.s

    def unapply(self, factor: torch.Tensor) -> torch.Tensor:
        """M -> M S^-1 (maps a factor of W S back to one of W)."""
        if self.lower:
            return torch.linalg.solve_triangular(self.s, factor, upper=False, left=False)
        return torch.linalg.solve(self.s.T, factor.T).T


def whitening_from_gram(gram: torch.Tensor, damping: float = 1e-4) -> Whitening:
    """Cholesky factor of the damped Gram matrix; an eigen-decomposition when that fails."""
    g = gram.to(torch.float64)
    n = g.shape[0]
    scale = torch.diagonal(g).mean().item()
    if not (scale > 0) or not torch.isfinite(g).all():
        log.warning("calibration Gram matrix is zero or not finite; decomposing without whitening")
        return Whitening(torch.eye(n, dtype=torch.float64), lower=True)
    eye = torch.eye(n, dtype=torch.float64)
    damped = g + damping * scale * eye
    chol, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        return Whitening(chol, lower=True)
    log.warning("damped Gram matrix is not positive definite; whitening through its eigen-decomposition")
    values, vectors = torch.linalg.eigh((damped + damped.T) / 2)
    values = values.clamp_min(max(damping, 1e-12) * scale)
    return Whitening(vectors * values.sqrt(), lower=False)
