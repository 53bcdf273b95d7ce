"""Activation whitening shared by every format: X^T X = S S^T, decompose W S, map back with S^-1.

Minimising ||(W - W') X^T||_F equals minimising ||(W - W') S||_F, so a format that is optimal in
the plain Frobenius norm becomes optimal on the calibration activations (SVD-LLM).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

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
        return torch.linalg.solve(self.s.T, factor.mT).mT

    def apply_left(self, weight: torch.Tensor) -> torch.Tensor:
        """Output side, for a Gram matrix G = S S^T of output gradients: W -> S^T W."""
        return self.s.T @ weight.to(torch.float64)

    def times(self, m: torch.Tensor) -> torch.Tensor:
        """M -> S M."""
        return self.s @ m.to(torch.float64)

    def unapply_left(self, factor: torch.Tensor) -> torch.Tensor:
        """M -> S^-T M (maps a factor of S^T W back to one of W)."""
        if self.lower:
            return torch.linalg.solve_triangular(self.s.T, factor, upper=True)
        return torch.linalg.solve(self.s.T, factor)


@dataclass(frozen=True)
class DiagonalWhitening:
    """S = diag(d): the whitening of a diagonal Gram matrix (a memory plan's diagonal output-gradient
    statistics), applied by scaling instead of n x n products and solves."""

    d: torch.Tensor  # (n,), float64

    @property
    def s(self) -> torch.Tensor:
        return torch.diag(self.d)

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to(torch.float64) * self.d

    def unapply(self, factor: torch.Tensor) -> torch.Tensor:
        return factor / self.d

    def apply_left(self, weight: torch.Tensor) -> torch.Tensor:
        return self.d[:, None] * weight.to(torch.float64)

    times = apply_left  # S M = S^T M: S is diagonal

    def unapply_left(self, factor: torch.Tensor) -> torch.Tensor:
        return factor / self.d[:, None]


@dataclass(frozen=True)
class OutputGram:
    """An input whitening known through the target's outputs (calibration.OutputGramStats): C = W X^T X W^T
    and the damping λ (X^T X + λI = S S^T). Low rank needs no more: the whitened weight L^T W S has
    the left singular vectors and values of M = L^T (C + λ W W^T) L (out x out; L the output
    whitening, if any), and its best rank-r truncation is U_r U_r^T L^T W S."""

    c: torch.Tensor  # (out, out), float64, undamped
    damping: float  # λ, absolute

    def left_gram(self, weight: torch.Tensor, out_whitening=None) -> torch.Tensor:
        """M = L^T (C + λ W W^T) L, float64 (out x out)."""
        w = weight.detach().to(torch.float64)
        left = out_whitening
        sandwich = None if left is None else (lambda m: left.apply_left(left.apply_left(m).T))  # L^T (L^T M)^T = L^T M L
        return _damped_gram(self.c, w, self.damping, sandwich)

    def spectrum(self, weight: torch.Tensor, out_whitening=None) -> torch.Tensor:
        """The whitened weight's squared singular values, largest first."""
        return descending_eigenvalues(self.left_gram(weight, out_whitening))


@dataclass(frozen=True)
class ProjectedGradGram:
    """An output whitening known through the target's inputs (calibration.ProjectedGradStats):
    H = W^T G W and the damping μ (G + μI = L L^T). Low rank needs no more: the whitened weight
    L^T W S has the right singular vectors and values of N = S^T (H + μ W^T W) S (in x in; S the
    input whitening, if any), and its best rank-r truncation is L^T W S V_r V_r^T."""

    h: torch.Tensor  # (in, in), float64, undamped
    damping: float  # μ, absolute

    def right_gram(self, weight: torch.Tensor, whitening=None) -> torch.Tensor:
        """N = S^T (H + μ W^T W) S, float64 (in x in)."""
        w = weight.detach().to(torch.float64)
        sandwich = None if whitening is None else (lambda n: whitening.apply(whitening.apply(n).T))  # ((N S)^T S) = S^T N S
        return _damped_gram(self.h, w.T, self.damping, sandwich)

    def spectrum(self, weight: torch.Tensor, whitening=None) -> torch.Tensor:
        """The whitened weight's squared singular values, largest first."""
        return descending_eigenvalues(self.right_gram(weight, whitening))


def _damped_gram(gram: torch.Tensor, factor: torch.Tensor, damping: float, sandwich=None) -> torch.Tensor:
    """gram + damping * factor factor^T, between a whitening's two sides (`sandwich`, when given),
    symmetrised: the Gram matrix of a whitened weight's short side (float64)."""
    m = gram.to(factor.device).clone()
    if damping > 0:
        m.addmm_(factor, factor.T, alpha=damping)
    if sandwich is not None:
        m = sandwich(m)
    return (m + m.T) / 2


def descending_eigenvalues(gram: torch.Tensor) -> torch.Tensor:
    """A symmetric PSD matrix's eigenvalues, largest first, rounding below zero clipped."""
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def projected_gradient_whitening(h: torch.Tensor, scale: float, damping: float) -> ProjectedGradGram | None:
    """The ProjectedGradGram of a target's projected gradient statistics (`scale`: the mean of G's
    diagonal, as whitening_from_gram damps relative to); None when they are zero or not finite."""
    if not (scale > 0) or not torch.isfinite(h).all():
        log.warning("output gradients are zero or not finite; decomposing without output whitening")
        return None
    return ProjectedGradGram(h.to(torch.float64), damping * scale)


def output_gram_whitening(c: torch.Tensor | None, scale: float, damping: float = 1e-4) -> OutputGram | None:
    """The OutputGram of a target's output statistics (`scale`: the mean of X^T X's diagonal, as
    whitening_from_gram damps relative to); None when they are zero or not finite."""
    if c is None or not (scale > 0) or not torch.isfinite(c).all():
        log.warning("calibration outputs are zero or not finite; decomposing without whitening")
        return None
    return OutputGram(c.to(torch.float64), damping * scale)


def diagonal_whitening(diagonal: torch.Tensor, damping: float = 1e-4) -> DiagonalWhitening:
    """whitening_from_gram of diag(`diagonal`), in O(n): the square roots of the damped diagonal."""
    g = diagonal.to(torch.float64)
    scale = g.mean().item() if g.numel() else 0.0
    if not (scale > 0) or not torch.isfinite(g).all():
        log.warning("calibration Gram matrix is zero or not finite; decomposing without whitening")
        return DiagonalWhitening(torch.ones_like(g))
    return DiagonalWhitening((g.clamp_min(0) + damping * scale).sqrt())


def whitening_from_gram(gram: torch.Tensor, damping: float = 1e-4) -> Whitening:
    """Cholesky factor of the damped Gram matrix; an eigen-decomposition when that fails."""
    g = gram.to(torch.float64)
    n = g.shape[0]
    scale = torch.diagonal(g).mean().item()
    if not (scale > 0) or not torch.isfinite(g).all():
        log.warning("calibration Gram matrix is zero or not finite; decomposing without whitening")
        return Whitening(torch.eye(n, dtype=torch.float64), lower=True)
    damped = g.clone()  # + damping * scale * I, without an identity matrix in memory (wide layers: tens of MB)
    damped.diagonal().add_(damping * scale)
    # factored in place: one n x n float64 matrix less at the peak (the same bits as out of place)
    chol, info = torch.linalg.cholesky_ex(damped, out=(damped, torch.empty((), dtype=torch.int32)))
    if int(info) == 0:
        return Whitening(chol, lower=True)
    log.warning("damped Gram matrix is not positive definite; whitening through its eigen-decomposition")
    damped = g.clone()  # the failed factorization overwrote it
    damped.diagonal().add_(damping * scale)
    values, vectors = torch.linalg.eigh((damped + damped.T) / 2)
    values = values.clamp_min(max(damping, 1e-12) * scale)
    return Whitening(vectors * values.sqrt(), lower=False)


def kronecker_whitening(gram: torch.Tensor, dims: tuple[int, ...], damping: float = 1e-4) -> list[Whitening]:
    """One whitening per input axis, from the nearest Kronecker product G ~= G_1 ⊗ G_2 ⊗ ... (Van Loan).

    For formats whose cores each touch one factor i_k of the input (tensor trains, Kronecker sums),
    W·(S_1 ⊗ S_2 ⊗ ...) is decomposed and every core's i_k axis is mapped back by S_k^-1, so the
    whitening stays inside the cores instead of adding a dense in x in matrix.
    """
    g = gram.to(torch.float64)
    factors: list[torch.Tensor] = []
    for k, n1 in enumerate(dims[:-1]):
        n2 = g.shape[0] // n1
        rearranged = g.reshape(n1, n2, n1, n2).permute(0, 2, 1, 3).reshape(n1 * n1, n2 * n2)
        u, s, vh = torch.linalg.svd(rearranged, full_matrices=False)
        g1 = (u[:, 0] * s[0].sqrt()).reshape(n1, n1)
        g2 = (vh[0] * s[0].sqrt()).reshape(n2, n2)
        if torch.trace(g1) < 0:  # the singular pair's sign is arbitrary; Gram factors are PSD
            g1, g2 = -g1, -g2
        factors.append((g1 + g1.T) / 2)
        g = (g2 + g2.T) / 2
    factors.append(g)
    return [whitening_from_gram(f, damping) for f in factors]


def whiten_input_axes(t: torch.Tensor, whitening: Sequence[Whitening], first_axis: int, fmt: str) -> torch.Tensor:
    """Multiply each input axis of the reshaped weight `t` (axes first_axis, first_axis+1, ...) by its S_k,
    after checking that there is one whitening per input axis."""
    axes = list(t.shape[first_axis:])
    if [w.s.shape[0] for w in whitening] != axes:
        raise ValueError(f"the {fmt} format needs one whitening per input axis {tuple(axes)}, got {len(whitening)}")
    for k, white in enumerate(whitening):
        axis = first_axis + k
        t = torch.movedim(torch.movedim(t, axis, -1) @ white.s, -1, axis)
    return t


def block_whitening(gram: torch.Tensor, blocks: int, damping: float = 1e-4) -> list[Whitening]:
    """One whitening per diagonal block of the Gram matrix (`blocks` equal blocks of the input).

    For block-diagonal formats (monarch) whose first factor mixes features only inside a block of
    the input: cross-block correlations are left out, each block is whitened exactly.
    """
    g = gram.to(torch.float64)
    width = g.shape[0] // blocks
    return [whitening_from_gram(g[b * width : (b + 1) * width, b * width : (b + 1) * width], damping) for b in range(blocks)]


def unwhiten_input_axes(cores: list[torch.Tensor], core_labels: Sequence[str], in_labels: str,
                        whitening: Sequence[Whitening]) -> list[torch.Tensor]:
    """Map cores found for W·(S_1 ⊗ ... ⊗ S_d) back to W: the core holding input label k gets S_k^-1
    on that axis. Every input label must belong to exactly one core."""
    cores = list(cores)
    for label, white in zip(in_labels, whitening):
        owners = [j for j, labs in enumerate(core_labels) if label in labs]
        if len(owners) != 1:
            raise ValueError(f"input label {label!r} belongs to {len(owners)} cores; per-axis whitening needs exactly one")
        j = owners[0]
        axis = core_labels[j].index(label)
        cores[j] = torch.movedim(white.unapply(torch.movedim(cores[j], axis, -1)), -1, axis)
    return cores
