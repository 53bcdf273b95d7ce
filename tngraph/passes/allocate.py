"""allocate: choose format and rank per target so that `budget` of its parameters is kept.

This first allocator is uniform: every target keeps the same fraction, at the largest rank whose
closed-form parameter count fits. A target whose factorization would not be smaller than the dense
layer stays dense (and is not counted as factorized); a budget below the smallest factorization of a
target is refused with an error, never exceeded. Embedding tables always take the low-rank format.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch.fx as fx

from .. import meta
from ..errors import ConfigError
from ..tn import conv as conv_formats
from ..tn.formats import FORMATS, Format, rank_for_params
from .base import PassContext, PassResult, declare
from .mlp import block_params, marked_pairs, require_calibration

log = logging.getLogger(__name__)


def configured_format(config) -> Format:
    """The Format of Config.format (the lowrank rewrite uses the svd format's counts and rank rule)."""
    return FORMATS["svd" if config.format == "lowrank" else config.format]


def format_options(ctx: PassContext) -> dict:
    """Options of the configured format (the same for allocation and decomposition)."""
    return configured_format(ctx.config).options(ctx.config)


@declare(kind="analysis", requires=("targets",), produces=("plan",))
def allocate(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    plans = _plans(gm, ctx, set())
    chosen = 0
    for node in meta.targets(gm):
        plan, why = plans[meta.info(node).target.name]
        chosen += plan.format != "dense"
        ctx.counters[f"allocate.{why}"] += 1
    for node in meta.target_uses(gm):  # every use of a shared weight carries its one plan
        meta.update(node, plan=plans[meta.info(node).target.name][0])
    log.info("allocate: %d targets factorized at budget %.3g", chosen, ctx.config.budget)
    return PassResult(gm, modified=chosen > 0, summary={"factorized": chosen})


def reallocate(gm: fx.GraphModule, ctx: PassContext, fixed: set[str]) -> set[str]:
    """The plans solved again with the targets in `fixed` kept dense (the numerical guard refused
    them), so that the budget still holds: the other targets make up for them. Returns the names
    whose plan changed (updated on their nodes); a budget they cannot make up is an error."""
    try:
        plans = _plans(gm, ctx, fixed)
    except ConfigError as exc:
        raise ConfigError(f"the numerical guard kept {', '.join(sorted(fixed))} dense, and then {exc.problem}",
                          "raise the budget or guard_tolerance, or leave those layers out with exclude") from exc
    changed = set()
    for node in meta.target_uses(gm):
        name = meta.info(node).target.name
        old, (new, _) = meta.info(node).plan, plans[name]
        if name in fixed or (old.format, old.rank, old.dense_rows, old.quant) == (new.format, new.rank, new.dense_rows, new.quant):
            continue
        meta.update(node, plan=new)
        changed.add(name)
    log.info("allocate: solved again with %d guard-refused targets dense: %d plans changed", len(fixed), len(changed))
    return changed


def _plans(gm: fx.GraphModule, ctx: PassContext, fixed: set[str]) -> dict[str, tuple[meta.PlanInfo, str]]:
    """Every target's plan (and its counter name), the targets in `fixed` dense, the rest within the budget."""
    budget = ctx.config.budget
    # pruned MLP blocks: candidates of the budgeted allocation (their curves: sensitivity), else each at the budget
    pruned, spent = prune_plans(gm, ctx, fixed) if ctx.config.allocation_kind != "budgeted" else ({}, 0.0)
    budgeted = budgeted_plans(gm, ctx, fixed) if ctx.config.allocation_kind == "budgeted" else {}
    nodes = [n for n in meta.targets(gm) if meta.info(n).target.name not in budgeted and meta.info(n).target.name not in pruned]
    infos = [meta.info(n).target for n in nodes]
    if fixed & {t.name for t in infos} or spent > 0:  # uniform: the others keep the fraction that brings the total back to the budget
        left = budget * sum(t.dense_params for t in infos) - sum(t.dense_params for t in infos if t.name in fixed) - spent
        others = sum(t.dense_params for t in infos if t.name not in fixed)
        if others <= 0 or left <= 0:
            raise ConfigError(f"budget {budget:g} leaves nothing for the other targets", "raise the budget")
        budget = min(left / others, 1.0)
    plans = {name: (plan, f"budgeted.{plan.format}") for name, plan in budgeted.items()}
    plans.update({name: (plan, plan.format) for name, plan in pruned.items()})
    blocks = marked_pairs(gm, ctx)
    if blocks:
        ctx.counters["allocate.pruned_blocks"] = sum(plans[d][0].format == "prune" for d in blocks if d in plans)
    for t in infos:
        if t.name in fixed:
            plans[t.name] = (meta.PlanInfo("dense", None, t.dense_params, t.dense_params, reason="guard"), "dense.guard")
            continue
        # embedding tables are gathered row by row: they always take the low-rank format
        fmt = configured_format(ctx.config) if t.kind == "linear" else FORMATS["svd"]
        options = format_options(ctx) if t.kind == "linear" else {}
        chosen_format = ctx.config.format if t.kind == "linear" else "lowrank"
        if t.conv is not None and chosen_format != "lowrank":
            if chosen_format not in conv_formats.FORMATS:
                raise conv_formats.refusal(t.name, chosen_format)
            fmt, options = conv_formats.format_for(chosen_format, t.conv), {}
        bias = t.out_features if t.bias else 0
        try:
            rank = rank_for_params(fmt, t.out_features, t.in_features, budget * t.dense_params - bias, **options)
            after = fmt.params(t.out_features, t.in_features, rank, **options) + bias
        except ValueError as exc:  # a shape the format cannot take (its own message names why)
            raise ConfigError(f"{t.name}: {exc}", f"--exclude {t.name} (Config(exclude=...)), or choose another --format") from None
        if after >= t.dense_params:
            plans[t.name] = (meta.PlanInfo("dense", None, t.dense_params, t.dense_params, reason="factorization not smaller"), "dense.not_smaller")
        elif after > budget * t.dense_params * (1 + 1e-12) + 1e-9:
            raise ConfigError(
                f"budget {budget:g} is too small for {t.name} ({t.out_features}x{t.in_features}): the smallest "
                f"{fmt.name} factorization keeps {after / t.dense_params:.3f} of its parameters",
                "raise the budget, choose another format, or leave the layer out with Config(exclude=...)",
            )
        else:
            plans[t.name] = (meta.PlanInfo(chosen_format, rank, t.dense_params, after), chosen_format)
    return plans


def solve_budget(costs: Sequence[Sequence[float]], losses: Sequence[Sequence[float]], limit: float) -> list[int]:
    """Per target the candidate (an index into its costs and losses) such that the summed loss is
    smallest, as far as this finds, with the summed cost within `limit`: a Lagrangian relaxation
    (each target takes the candidate minimising loss + lambda * cost; lambda bisected to meet the
    limit), then what is left of the limit spent greedily on the upgrade with the most loss saved
    per unit of cost. The cheapest candidates must fit (the caller says what to do otherwise)."""
    scale = max(limit, 1e-300)  # lambda is searched for costs in units of the limit
    n = range(len(costs))

    def choose(lam: float) -> list[int]:
        return [min(range(len(costs[k])), key=lambda i: (losses[k][i] + lam * costs[k][i] / scale, costs[k][i])) for k in n]

    def cost(choice: list[int]) -> float:
        return sum(costs[k][i] for k, i in zip(n, choice))

    best = [min(range(len(c)), key=c.__getitem__) for c in costs]
    lo, hi = -30.0, 20.0  # log10 lambda
    for _ in range(80):
        mid = (lo + hi) / 2
        choice = choose(10**mid)
        if cost(choice) <= limit:
            best, hi = choice, mid
        else:
            lo = mid
    best = list(best)
    while True:
        room = limit - cost(best)
        options = [((losses[k][i] - losses[k][j]) / max(costs[k][j] - costs[k][i], 1e-300), k, j)
                   for k, i in zip(n, best) for j in range(len(costs[k]))
                   if losses[k][j] < losses[k][i] and costs[k][j] - costs[k][i] <= room]
        if not options:
            return best
        _, k, j = max(options)
        best[k] = j


def _dense_only(curve):
    """A target's curve reduced to its dense candidate (the last one)."""
    return type(curve)(curve.name, curve.ranks[-1:], curve.params[-1:], curve.loss[-1:], curve.cost[-1:], curve.dense_rows[-1:], curve.formats[-1:],
                       curve.quant[-1:])


def budgeted_choice(gm: fx.GraphModule, ctx: PassContext, fixed: set[str] = frozenset()) -> tuple[list[fx.Node], list[Any], list[int]]:
    """The linear targets, their curves (ctx.curves; `fixed` ones reduced to dense; a pruned MLP block
    is one, under its down projection's name) and per target the index of the candidate minimising
    the summed predicted loss with the total cost within the budget (`solve_budget`); the budget's
    errors are raised here."""
    cfg = ctx.config
    if cfg.format != "lowrank":
        raise ConfigError(
            f"budgeted allocation chooses low-rank ranks; format {cfg.format!r} is allocated uniformly for now",
            "use format='svd' with allocation='budgeted', or allocation='uniform'",
        )
    ups = {up for pair in marked_pairs(gm, ctx).values() for up in pair.ups}  # a pruned block's curve is its down projection's
    nodes = [n for n in meta.targets(gm) if meta.info(n).target.kind == "linear" and meta.info(n).target.name not in ups]
    curves = [ctx.curves[meta.info(n).target.name] for n in nodes]
    curves = [_dense_only(c) if c.name in fixed else c for c in curves]
    if not curves:
        return [], [], []
    # what the budget counts (Config.budget_kind); the last candidate of a curve is dense
    limit = cfg.budget * sum(c.cost[-1] for c in curves)

    def cost(choice: list[int]) -> float:
        return sum(c.cost[i] for c, i in zip(curves, choice))

    cheapest = [min(range(len(c.cost)), key=lambda i: c.cost[i]) for c in curves]
    if cost(cheapest) > limit * (1 + 1e-12):
        if cfg.budget_kind == "latency":
            slow = sum(len(c.cost) == 1 for c in curves)
            raise ConfigError(
                f"latency budget {cfg.budget:g} cannot be met: the fastest choice per target takes {cost(cheapest) / (limit / cfg.budget):.3f} "
                f"of the dense time at latency_rows={cfg.latency_rows} ({slow} of {len(curves)} targets have no factorization faster than dense)",
                "raise the budget, time at more rows (latency_rows), or use budget_kind='params'",
            )
        raise ConfigError(
            f"budget {cfg.budget:g} ({cfg.budget_kind}) is below the cheapest factorization of the targets "
            f"({cost(cheapest) / (limit / cfg.budget):.3f})",
            "raise the budget or leave targets out with Config(exclude=...)",
        )
    return nodes, curves, solve_budget([c.cost for c in curves], [c.loss for c in curves], limit)


def budgeted_plans(gm: fx.GraphModule, ctx: PassContext, fixed: set[str] = frozenset()) -> dict[str, meta.PlanInfo]:
    """Ranks (or dense) for the linear targets minimising the summed predicted loss of their curves
    with their total cost within the budget: a Lagrangian relaxation (each target takes the
    candidate minimising loss + lambda * cost; lambda bisected to meet the budget), then the
    leftover budget spent greedily on the best loss reduction per unit of cost."""
    cfg = ctx.config
    nodes, curves, best = budgeted_choice(gm, ctx, fixed)
    if not curves:
        return {}
    limit = cfg.budget * sum(c.cost[-1] for c in curves)

    def cost(choice: list[int]) -> float:
        return sum(c.cost[i] for c, i in zip(curves, choice))

    plans = {}
    for node, c, i in zip(nodes, curves, best):
        t = meta.info(node).target
        rank = c.ranks[i]
        if t.name in marked_pairs(gm, ctx):  # a pruned block: its down projection's curve holds the whole block's
            plans.update(_block_plans(gm, ctx, t.name, rank, c.loss[i]))
        elif rank is None:
            plans[t.name] = meta.PlanInfo("dense", None, t.dense_params, t.dense_params, reason="budgeted: kept dense")
        elif c.quant[i] is not None:
            choice = c.quant[i]
            plans[t.name] = meta.PlanInfo(choice.format, choice.rank, t.dense_params, c.params[i], reason=f"budgeted: {choice.label()}, "
                                          f"loss {c.loss[i]:.3g}", quant=choice.record(cfg.act_bits), bytes_after=int(c.cost[i]))
        else:
            plans[t.name] = meta.PlanInfo(c.formats[i], rank, t.dense_params, c.params[i], reason=f"budgeted: loss {c.loss[i]:.3g}",
                                          dense_rows=c.dense_rows[i])
    params_kept = sum(c.params[i] for c, i in zip(curves, best)) / sum(c.params[-1] for c in curves)
    log.info("allocate (budgeted, %s): %d of %d targets factorized, %.4f of their %s and %.4f of their parameters kept",
             cfg.budget_kind, sum(r is not None for r in (c.ranks[i] for c, i in zip(curves, best))), len(curves),
             cost(best) / (limit / cfg.budget), cfg.budget_kind, params_kept)
    return plans


def prune_plans(gm: fx.GraphModule, ctx: PassContext, fixed: set[str] = frozenset()) -> tuple[dict[str, meta.PlanInfo], float]:
    """The plans of the pruned MLP blocks (Config.mlp == "prune"), every member of a block at the
    largest neuron count whose parameters fit `budget` of the block's (a block with a member in
    `fixed`, refused by the guard, dense), and the parameters they take beyond `budget` of theirs
    (negative: left over for the other targets)."""
    pairs = marked_pairs(gm, ctx)
    if not pairs:
        return {}, 0.0
    infos = {meta.info(n).target.name: meta.info(n).target for n in meta.targets(gm)}
    require_calibration(ctx, pairs)
    plans: dict[str, meta.PlanInfo] = {}
    spent = 0.0
    for down, pair in pairs.items():
        members = [infos[name] for name in (*pair.ups, down)]
        dense = sum(t.dense_params for t in members)

        count = max((n for n in range(1, pair.hidden + 1) if sum(block_params(members, n)) <= ctx.config.budget * dense), default=0)
        if fixed & {t.name for t in members} or count in (0, pair.hidden):
            if count == 0 and not fixed & {t.name for t in members}:
                raise ConfigError(f"budget {ctx.config.budget:g} is too small for the MLP block of {down}: one neuron keeps "
                                  f"{sum(block_params(members, 1)) / dense:.3f} of its parameters", "raise the budget, or mlp='lowrank'")
            why = "guard" if fixed & {t.name for t in members} else "every neuron fits"
            plans.update({t.name: meta.PlanInfo("dense", None, t.dense_params, t.dense_params, reason=f"pruned block: {why}") for t in members})
            spent += dense - ctx.config.budget * dense
            continue
        for t, params in zip(members, block_params(members, count)):
            plans[t.name] = meta.PlanInfo("prune", count, t.dense_params, params, reason=f"pruned block: {count} of {pair.hidden} neurons")
        spent += sum(block_params(members, count)) - ctx.config.budget * dense
    return plans, spent


def _block_plans(gm: fx.GraphModule, ctx: PassContext, down: str, count: int | None, loss: float) -> dict[str, meta.PlanInfo]:
    """The plans of every member of the pruned MLP block of `down` at `count` neurons (None: dense)."""
    pair = marked_pairs(gm, ctx)[down]
    infos = {meta.info(n).target.name: meta.info(n).target for n in meta.targets(gm)}
    members = [infos[name] for name in (*pair.ups, down)]
    if count is None:
        return {t.name: meta.PlanInfo("dense", None, t.dense_params, t.dense_params, reason="budgeted: pruned block kept dense") for t in members}
    return {t.name: meta.PlanInfo("prune", count, t.dense_params, params, reason=f"budgeted: {count} of {pair.hidden} neurons, loss {loss:.3g}")
            for t, params in zip(members, block_params(members, count))}
