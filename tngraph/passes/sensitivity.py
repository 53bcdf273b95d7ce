"""sensitivity: how much each target's compression costs, as a loss-versus-parameters curve.

For every target and every candidate rank of the low-rank format, the loss is the predicted squared
relative error of the model's output when only that target is compressed:

- "spectral": the whitened singular-value tail. With X^T X = S S^T, the rank-r whitened SVD leaves
  ||(W - W')X^T||^2 = sum_{i>r} s_i^2 of W·S, so tail(r) = sum_{i>r} s_i^2 / sum_i s_i^2 is the
  target's own relative output error, free once the Gram matrix is known. It ignores how the
  error travels to the model's output.
- "measured": the spectral curve rescaled per target by end-to-end measurements: at a few ranks
  the target is replaced by its whitened SVD, every other target held at an operating point (first
  the uniform ranks, then, for each further `sensitivity_rounds`, the allocation the previous curves
  give), and its share of the model's output error on calibration batches is measured; between the
  ranks the ratio share / tail is interpolated.

The curves go to ctx.curves for the budgeted allocator; node.meta["tngraph"].sensitivity holds a
summary (the loss at the uniform rank of the budget).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .. import meta
from ..progress import progress
from ..tn.formats import FORMATS, rank_for_params
from .base import PassContext, PassResult
from .targets import getattr_path

log = logging.getLogger(__name__)

GRID = (0.125, 0.25, 0.5, 0.75)  # kept fractions measured end to end ("measured")
MEASURE_BATCHES = 4


@dataclass
class Curve:
    """Candidates for one target, cheapest first: (rank or None for dense, parameters, loss)."""

    name: str
    ranks: list[int | None]
    params: list[int]
    loss: list[float]

    def at_rank(self, rank: int) -> float:
        return self.loss[self.ranks.index(rank)]


def sensitivity(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    cfg = ctx.config
    if cfg.allocation == "uniform":
        return PassResult(gm, modified=False, summary={"skipped": "uniform allocation"})
    nodes = [n for n in meta.targets(gm) if meta.info(n).target.kind == "linear"]
    fmt = FORMATS["svd"]
    spectra, whitenings = {}, {}  # whitenings: computed once, reused by every measurement round
    for node in progress(nodes, desc="spectra", enabled=cfg.progress, unit="layer"):
        t = meta.info(node).target
        w = getattr_path(gm, t.weight).detach().to(torch.float64)
        stats = ctx.stats.get(t.name)
        if cfg.whiten and stats is not None and getattr(stats, "rows", 0) > 0:
            whitenings[t.name] = fmt.whitening(stats.gram, t.out_features, t.in_features, cfg.damping)
            w = whitenings[t.name].apply(w)
        s2 = torch.linalg.svdvals(w) ** 2
        tail = (s2.sum() - torch.cumsum(s2, 0)) / s2.sum().clamp_min(1e-300)
        spectra[t.name] = torch.cat([torch.ones(1, dtype=torch.float64), tail]).clamp_min(0).tolist()  # tail[r], r = 0..n
    scale = {name: (lambda r: 1.0) for name in spectra}
    if cfg.sensitivity == "measured":
        scale = _measure(gm, ctx, nodes, spectra, whitenings)
    _build_curves(ctx, nodes, spectra, scale)
    for _ in range(cfg.sensitivity_rounds - 1 if cfg.sensitivity == "measured" else 0):
        # measure again around the allocation the last curves give: errors interact, so the shares
        # are best measured where the model will actually operate
        from .allocate import _budgeted

        plans = _budgeted(gm, ctx)
        ranks = {name: (p.rank if p.format != "dense" else None) for name, p in plans.items()}
        scale = _measure(gm, ctx, nodes, spectra, whitenings, ranks)
        _build_curves(ctx, nodes, spectra, scale)
    ctx.counters[f"sensitivity.{cfg.sensitivity}"] += len(nodes)
    log.info("sensitivity (%s): %d targets", cfg.sensitivity, len(nodes))
    return PassResult(gm, modified=bool(nodes), summary={"targets": len(nodes), "kind": cfg.sensitivity})


def _build_curves(ctx: PassContext, nodes: list[fx.Node], spectra: dict[str, list[float]], scale: dict[str, Any]) -> None:
    cfg = ctx.config
    fmt = FORMATS["svd"]
    for node in nodes:
        t = meta.info(node).target
        bias = t.out_features if t.bias else 0
        top = fmt.max_rank(t.out_features, t.in_features)
        step = max(1, top // 64)
        ranks: list[int | None] = list(range(step, top + 1, step))
        params = [fmt.params(t.out_features, t.in_features, r) + bias for r in ranks]
        loss = [spectra[t.name][r] * scale[t.name](r) for r in ranks]
        keep = [i for i, p in enumerate(params) if p < t.dense_params]
        curve = Curve(t.name, [ranks[i] for i in keep] + [None], [params[i] for i in keep] + [t.dense_params],
                      [loss[i] for i in keep] + [0.0])
        ctx.curves[t.name] = curve
        uniform = rank_for_params(fmt, t.out_features, t.in_features, cfg.budget * t.dense_params - bias)
        score = spectra[t.name][uniform] * scale[t.name](uniform)
        meta.update(node, sensitivity=meta.SensitivityInfo(cfg.sensitivity, score, uniform))


def _outputs(gm: fx.GraphModule, batches, objective=None) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for args, kwargs in batches:
            result = gm(*args, **kwargs)
            leaves = pytree.tree_leaves(objective(result, args, kwargs) if objective is not None else result)
            outs.append(torch.cat([x.detach().reshape(-1).to(torch.float64) for x in leaves if isinstance(x, torch.Tensor) and x.is_floating_point()]))
    return outs


def _measure(gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node], spectra: dict[str, list[float]],
             whitenings: dict[str, Any], operating_ranks: dict[str, int | None] | None = None) -> dict[str, Any]:
    """Per target, the end-to-end squared relative output error at the GRID ranks divided by its
    spectral tail there; returned as r -> interpolated ratio.

    Errors interact (a layer's error matters more when its inputs are already perturbed), so each
    target is measured at the operating point of the budget: every other target replaced by its
    uniform-rank approximation. The target's own share is the error at rank r minus the error
    with the target dense, everything else unchanged.
    """
    if not ctx.calibration:
        log.info("sensitivity: no calibration data to measure with; using the spectral curves")
        return {name: (lambda r: 1.0) for name in spectra}
    cfg = ctx.config
    fmt = FORMATS["svd"]
    count = len(ctx.calibration)  # batches spread over the calibration set (texts come sorted by length)
    batches = [ctx.calibration[(2 * k + 1) * count // (2 * MEASURE_BATCHES)] for k in range(min(MEASURE_BATCHES, count))]
    reference = _outputs(gm, batches, ctx.objective)
    ref_energy = max(sum(float((y**2).sum()) for y in reference), 1e-300)

    def error() -> float:
        outs = _outputs(gm, batches, ctx.objective)
        return sum(float(((a - b) ** 2).sum()) for a, b in zip(outs, reference)) / ref_energy

    params, originals = {}, {}
    for node in nodes:
        t = meta.info(node).target
        params[t.name] = getattr_path(gm, t.weight)
        originals[t.name] = params[t.name].detach().clone()

    def approx(t: meta.TargetInfo, rank: int) -> torch.Tensor:
        net = fmt.decompose(originals[t.name], rank, whitenings.get(t.name))
        return net.to_dense().to(originals[t.name].dtype)

    scales = {}
    with torch.no_grad():
        try:
            operating = {}
            for node in nodes:
                t = meta.info(node).target
                bias = t.out_features if t.bias else 0
                rank = rank_for_params(fmt, t.out_features, t.in_features, cfg.budget * t.dense_params - bias)
                if operating_ranks is not None:
                    rank = operating_ranks.get(t.name, rank)
                operating[t.name] = originals[t.name] if rank is None else approx(t, rank)
                params[t.name].copy_(operating[t.name])
            for node in progress(nodes, desc="measure", enabled=cfg.progress, unit="layer"):
                t = meta.info(node).target
                top = fmt.max_rank(t.out_features, t.in_features)
                params[t.name].copy_(originals[t.name])
                floor = error()
                points = []
                for kept in GRID:
                    rank = max(1, min(top, rank_for_params(fmt, t.out_features, t.in_features, kept * t.in_features * t.out_features)))
                    params[t.name].copy_(approx(t, rank))
                    share = max(error() - floor, 0.0)
                    tail = spectra[t.name][rank]
                    points.append((rank, share / tail if tail > 1e-12 else 1.0))
                params[t.name].copy_(operating[t.name])
                scales[t.name] = _interpolator(points)
        finally:
            for name, param in params.items():
                param.copy_(originals[name])
    return scales


def _interpolator(points: list[tuple[int, float]]):
    """Piecewise-linear in rank between the measured points (log of the ratio), flat outside."""
    points = sorted(set(points))
    ranks = [p[0] for p in points]
    logs = [math.log(max(p[1], 1e-12)) for p in points]

    def ratio(rank: int) -> float:
        if rank <= ranks[0]:
            return math.exp(logs[0])
        for (r0, l0), (r1, l1) in zip(zip(ranks, logs), zip(ranks[1:], logs[1:])):
            if rank <= r1:
                return math.exp(l0 + (l1 - l0) * (rank - r0) / max(r1 - r0, 1))
        return math.exp(logs[-1])

    return ratio
