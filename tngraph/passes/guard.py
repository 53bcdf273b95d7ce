"""The numerical guard of factorize: every substitution is checked against the dense layer on the
calibration data before it enters the graph.

A target's error is its relative output error on the calibration inputs,
sqrt(tr(ΔW G ΔWᵀ) / tr(W G Wᵀ)) with G = Xᵀ X the inputs' Gram matrix (row frequencies for an
embedding table; plain Frobenius norms without calibration data; for a target calibrated through
its outputs, the same from C = W G Wᵀ). One above
`Config.guard_tolerance`, or not finite, is reverted: the target stays dense, and the revert is
logged, counted and listed in the report; with `Config.strict` it is an error instead.
"""
from __future__ import annotations

import logging
import math

import torch

from .. import meta
from ..calibration import OutputGramStats
from ..errors import PassError
from .base import PassContext

log = logging.getLogger(__name__)


def relative_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor | None = None,
                   row_weights: torch.Tensor | None = None) -> float:
    """sqrt(tr(ΔW G ΔWᵀ) / tr(W G Wᵀ)) (linear: weight out x in, G in x in), or the row-weighted
    Frobenius ratio (embedding: weight rows x width), or the plain one."""
    if gram is not None:
        return _gram_error(weight, approx, gram)
    w = weight.detach().to(torch.float64)
    d = approx.detach().to(torch.float64, copy=False).to(w.device) - w
    if row_weights is not None:
        rw = row_weights.to(w.device, torch.float64)[:, None]
        num, den = float((rw * d * d).sum()), float((rw * w * w).sum())
    else:
        num, den = float((d * d).sum()), float((w * w).sum())
    return _ratio(num, den)


GUARD_ROWS = 256  # output rows per step of the Gram-weighted error: its float64 work memory stays a few row blocks


def _gram_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """sqrt(tr(ΔW G ΔWᵀ) / tr(W G Wᵀ)), summed over blocks of GUARD_ROWS output rows."""
    g = gram.to(weight.device, torch.float64)
    num = den = 0.0
    for start in range(0, weight.shape[0], GUARD_ROWS):
        w = weight[start : start + GUARD_ROWS].detach().to(torch.float64)
        d = approx[start : start + GUARD_ROWS].detach().to(w.device, torch.float64) - w
        num += float(((d @ g) * d).sum())
        den += float(((w @ g) * w).sum())
    return _ratio(num, den)


def whitened_error(weight: torch.Tensor, approx: torch.Tensor, whitening) -> float:
    """||ΔW S|| / ||W S|| with S Sᵀ the damped Gram: the Gram-weighted error up to the damping.
    In float32 (each row block's sums in float64): a ratio checked against a tolerance needs no
    more digits, and the products take half the time of float64 ones (block by block, per target)."""
    s = whitening.s.to(weight.device, torch.float32)
    num = den = 0.0
    for start in range(0, weight.shape[0], GUARD_ROWS):
        w = weight[start : start + GUARD_ROWS].detach().to(torch.float32)
        d = approx[start : start + GUARD_ROWS].detach().to(w.device, torch.float32) - w
        num += float((d @ s).pow(2).sum(dtype=torch.float64))
        den += float((w @ s).pow(2).sum(dtype=torch.float64))
    return _ratio(num, den)


def _ratio(num: float, den: float) -> float:
    if not math.isfinite(num):
        return math.inf
    if den <= 0:  # an all-zero layer (or inputs): exact iff the approximation is zero too
        return 0.0 if num <= 0 else math.inf
    return math.sqrt(max(num, 0.0) / den)


def output_error(c: torch.Tensor, left: torch.Tensor) -> float:
    """relative_error's sqrt(tr(ΔW G ΔWᵀ) / tr(W G Wᵀ)) for an approximation Q W, from C = W G Wᵀ
    alone: ΔW = (Q - I) W makes the numerator tr((Q - I) C (Q - I)ᵀ)."""
    d = left.to(torch.float64).clone()
    d.diagonal().sub_(1.0)
    return _ratio(float(((d @ c) * d).sum()), float(torch.trace(c)))


def accept(ctx: PassContext, node, weight: torch.Tensor, approx: torch.Tensor, left: torch.Tensor | None = None) -> bool:
    """Record the target's error; False (and the target planned dense) when it fails the guard.
    A target calibrated through its outputs (OutputGramStats) needs `left`: the Q of approx = Q W."""
    t = meta.info(node).target
    stats = ctx.stats.get(t.name)
    gram = row_weights = None
    if isinstance(stats, OutputGramStats) and stats.rows > 0:
        if left is None:
            raise PassError(f"{t.name} was calibrated through its outputs; its guard needs the approximation as Q W",
                            "report this: calibrate.output_side should have kept its input Gram")
        return _judge(ctx, node, output_error(stats.output_gram, left))
    if stats is not None and getattr(stats, "rows", 0) > 0:
        if t.kind == "embedding":
            row_weights = stats.row_weights()
        else:
            gram = stats.gram
    if gram is None and getattr(stats, "whitening", None) is not None:  # the Gram was traded for its (damped) Cholesky factor
        error = whitened_error(weight, approx, stats.whitening)
    else:
        error = relative_error(weight, approx, gram, row_weights)
    return _judge(ctx, node, error)


def _judge(ctx: PassContext, node, error: float) -> bool:
    t = meta.info(node).target
    ctx.analysis.setdefault("guard", {})[t.name] = error
    tolerance = ctx.config.guard_tolerance
    if tolerance is None or error <= tolerance:
        return True
    plan = meta.info(node).plan
    what = f"{t.name}: relative output error {error:.3g} on the calibration data exceeds guard_tolerance {tolerance:g}"
    if ctx.config.strict:
        raise PassError(f"{what} ({plan.format}, rank {plan.rank})",
                        "raise the budget or guard_tolerance, exclude the layer, or drop strict=True to keep it dense")
    log.warning("guard: %s; kept dense", what)
    ctx.counters["guard.reverted"] += 1
    ctx.analysis.setdefault("guard_reverted", {})[t.name] = error
    meta.update(node, plan=meta.PlanInfo("dense", None, plan.params_before, plan.params_before, reason="guard"))
    return False
