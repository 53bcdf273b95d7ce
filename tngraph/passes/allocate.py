"""allocate: choose format and rank per target so that `budget` of its parameters is kept.

This first allocator is uniform: every target keeps the same fraction, at the largest rank whose
closed-form parameter count fits. A target whose factorization would not be smaller than the dense
layer stays dense.
"""
from __future__ import annotations

import logging

import torch.fx as fx

from .. import meta
from ..tn.formats import FORMATS, Format, rank_for_params
from .base import PassContext, PassResult

log = logging.getLogger(__name__)


def configured_format(config) -> Format:
    """The Format of Config.format (the lowrank rewrite uses the svd format's counts and rank rule)."""
    return FORMATS["svd" if config.format == "lowrank" else config.format]


def format_options(ctx: PassContext) -> dict:
    """Options of the configured format (the same for allocation and decomposition)."""
    return configured_format(ctx.config).options(ctx.config)


def allocate(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    budget = ctx.config.budget
    fmt = configured_format(ctx.config)
    options = format_options(ctx)
    chosen = 0
    for node in meta.targets(gm):
        t = meta.info(node).target
        bias = t.out_features if t.bias else 0
        rank = rank_for_params(fmt, t.out_features, t.in_features, budget * t.dense_params - bias, **options)
        after = fmt.params(t.out_features, t.in_features, rank, **options) + bias
        if after >= t.dense_params:
            plan = meta.PlanInfo("dense", None, t.dense_params, t.dense_params, reason="factorization not smaller")
            ctx.counters["allocate.dense.not_smaller"] += 1
        else:
            plan = meta.PlanInfo(ctx.config.format, rank, t.dense_params, after)
            ctx.counters[f"allocate.{ctx.config.format}"] += 1
            chosen += 1
        meta.update(node, plan=plan)
    log.info("allocate: %d targets factorized at budget %.3g", chosen, budget)
    return PassResult(gm, modified=chosen > 0, summary={"factorized": chosen})
