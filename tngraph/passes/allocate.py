"""allocate: choose format and rank per target so that `budget` of its parameters is kept.

This first allocator is uniform: every target keeps the same fraction, at the largest rank whose
closed-form parameter count fits. A target whose factorization would not be smaller than the dense
layer stays dense (and is not counted as factorized); a budget below the smallest factorization of a
target is refused with an error, never exceeded. Embedding tables always take the low-rank format.
"""
from __future__ import annotations

import logging

import torch.fx as fx

from .. import meta
from ..errors import ConfigError
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
    chosen = 0
    for node in meta.targets(gm):
        t = meta.info(node).target
        # embedding tables are gathered row by row: they always take the low-rank format
        fmt = configured_format(ctx.config) if t.kind == "linear" else FORMATS["svd"]
        options = format_options(ctx) if t.kind == "linear" else {}
        chosen_format = ctx.config.format if t.kind == "linear" else "lowrank"
        bias = t.out_features if t.bias else 0
        rank = rank_for_params(fmt, t.out_features, t.in_features, budget * t.dense_params - bias, **options)
        after = fmt.params(t.out_features, t.in_features, rank, **options) + bias
        if after >= t.dense_params:
            plan = meta.PlanInfo("dense", None, t.dense_params, t.dense_params, reason="factorization not smaller")
            ctx.counters["allocate.dense.not_smaller"] += 1
        elif after > budget * t.dense_params * (1 + 1e-12) + 1e-9:
            raise ConfigError(
                f"budget {budget:g} is too small for {t.name} ({t.out_features}x{t.in_features}): the smallest "
                f"{fmt.name} factorization keeps {after / t.dense_params:.3f} of its parameters",
                "raise the budget, choose another format, or leave the layer out with Config(exclude=...)",
            )
        else:
            plan = meta.PlanInfo(chosen_format, rank, t.dense_params, after)
            ctx.counters[f"allocate.{chosen_format}"] += 1
            chosen += 1
        meta.update(node, plan=plan)
    log.info("allocate: %d targets factorized at budget %.3g", chosen, budget)
    return PassResult(gm, modified=chosen > 0, summary={"factorized": chosen})
