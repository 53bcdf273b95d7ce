"""Output-side (Fisher / Gauss-Newton) statistics: how much each target's output channels matter.

For an end objective e(x) (the pooled sentence embedding, or every float output) and the squared
error ||e' - e||^2 the sensitivity pass measures, the Gauss-Newton matrix of a target's output y is
J^T J with J = de/dy. Its expectation over tokens, G = E[g g^T] with g = J^T v for random probes v
(E[v v^T] = I), is collected here by one backward pass per probe. With the input Gram X^T X this gives
the second-order (K-FAC) prediction of the objective's error when W becomes W':

    ||e' - e||^2 ~= tr(G (W - W') X^T X (W - W')^T),

the loss that the "fisher" sensitivity estimator reads off spectra and that two-sided whitened
decompositions minimise.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .. import memory, meta
from ..batches import batch_shape, split_batch
from ..calibration import GradStats, ProjectedGradStats, channels_last
from ..errors import DataError, PassError
from ..progress import progress
from ..tn.whitening import (DiagonalWhitening, ProjectedGradGram, Whitening, diagonal_whitening, projected_gradient_whitening,
                            whitening_from_gram)
from .base import PassContext, PassResult, declare, spread
from .head import head_targets, reduced_head
from .targets import target_weight

log = logging.getLogger(__name__)

TAP_PREFIX = "tngraph_tap_"


class Tap(torch.nn.Module):
    """Passes a target's output on, keeping it (in `seen`, under the tap's number) as a leaf the
    backward pass can take the gradient at. The state is this call's: nothing outlives it."""

    def __init__(self, key: int, seen: dict[int, torch.Tensor]):
        super().__init__()
        self.key, self.seen = key, seen

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if not y.requires_grad:  # nothing upstream is tracked yet: this output starts the tape
            y = y.detach().requires_grad_(True)
        self.seen[self.key] = y
        return y


def gradient_stats(gm: fx.GraphModule, nodes: list[fx.Node], batches: list[tuple[tuple, dict]],
                   objective=None, *, probes: int = 1, seed: int = 0, show: bool = False,
                   max_memory: float | None = None, before=None, projected: set[str] = frozenset()) -> dict[str, GradStats]:
    """G = sum over batches and tokens of E_v[g g^T] (out x out, float64) for every target in `nodes`,
    g the gradient of <v, objective(output)> at the target's output, v ~ N(0, I), averaged over
    `probes` probes; padded positions (attention_mask) left out. Targets named in `projected` keep
    W^T G W (in x in) instead (calibration.ProjectedGradStats). `max_memory` (GB, 0: physical
    memory; None: no plan): targets whose Grams do not fit keep only the diagonal (tngraph.memory),
    and batches are cut into micro-batches whose activations fit, and take no more than the model's
    weights (at least a GB). `before(args, kwargs)`, when given, is called ahead of each batch's forward.

    Taps are inserted after the targets for the duration of the call and removed after it."""
    diagonal, seen = set(), {}
    if max_memory is not None:
        working = max(memory.GB, sum(p.numel() * p.element_size() for p in gm.parameters()))
        diagonal, batches = _memory_plan(nodes, batches, max_memory, projected, working)
    stats = {}
    for t in (meta.info(n).target for n in nodes):
        new = ProjectedGradStats(t.out_features, in_features=t.in_features) if t.name in projected else GradStats(t.out_features, diagonal=t.name in diagonal)
        stats.setdefault(t.name, new)
    convs = {meta.info(n).target.name for n in nodes if meta.info(n).target.conv is not None}
    names = [meta.info(n).target.name for n in nodes]  # tap k -> its target (a shared weight's uses feed one)
    weights = {t.name: target_weight(gm, t) for t in (meta.info(n).target for n in nodes) if t.name in projected}
    generator = torch.Generator().manual_seed(seed)
    with _tapped(gm, nodes, seen):
        for args, kwargs in progress(batches, desc="fisher", enabled=show, unit="batch"):
            seen.clear()
            if before is not None:
                before(args, kwargs)
            with torch.enable_grad():
                leaves = _objective_leaves(gm, objective, args, kwargs)
                if not leaves:
                    continue
                energy = sum(float((x.detach().to(torch.float64) ** 2).sum()) for x in leaves)
                samples = sum(x.numel() // max(x.shape[-1], 1) if x.dim() else 1 for x in leaves)
                keys = list(seen)
                mask = kwargs.get("attention_mask")
                mask = mask.bool() if isinstance(mask, torch.Tensor) else None
                counted: set[str] = set()  # a batch's energy and samples count once per target, whatever its uses
                for p in range(probes):
                    probe = sum((x * torch.randn(x.shape, generator=generator).to(x.dtype)).sum() for x in leaves)
                    grads = torch.autograd.grad(probe, [seen[k] for k in keys], retain_graph=p + 1 < probes, allow_unused=True)
                    for k, g in zip(keys, grads):
                        key = names[k]
                        if g is None:
                            continue
                        g = channels_last(g) if key in convs else g  # output channels last
                        if mask is not None and tuple(g.shape[:-1]) == tuple(mask.shape):
                            g = g[mask]
                        stats[key].update(g, 1.0 / probes, **({"weight": weights[key]} if key in weights else {}))
                        if p == 0:
                            stats[key].rows += g.numel() // g.shape[-1]
                            if key not in counted:
                                counted.add(key)
                                stats[key].energy += energy
                                stats[key].samples += samples
    return stats


def _objective_leaves(gm: fx.GraphModule, objective, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The float tensors of the objective on one batch that the taps' gradients flow from."""
    try:
        result = gm(*args, **kwargs)
    except Exception as exc:
        raise DataError(
            f"a calibration batch does not fit the captured model: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
            "pass calibration samples with the same structure, dtypes and ranks as the example inputs",
        ) from exc
    out = objective(result, args, kwargs) if objective is not None else result
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.requires_grad]


@contextlib.contextmanager
def _tapped(gm: fx.GraphModule, nodes: list[fx.Node], seen: dict[int, torch.Tensor]):
    """gm with a Tap after each of `nodes` (tap k keeps its output in seen[k]) and its parameters
    frozen, for the duration of the block; both undone after it."""
    taps = []
    for k, node in enumerate(nodes):
        gm.add_submodule(f"{TAP_PREFIX}{k}", Tap(k, seen))
        with gm.graph.inserting_after(node):
            tap = gm.graph.call_module(f"{TAP_PREFIX}{k}", (node,))
        node.replace_all_uses_with(tap, delete_user_cb=lambda user: user is not tap)
        taps.append(tap)
    gm.recompile()
    frozen = _freeze(gm)  # no parameter is tracked: the tape starts at the first tap, saving less
    try:
        yield
    finally:
        seen.clear()
        for p in frozen:
            p.requires_grad_(True)
        for k, (node, tap) in enumerate(zip(nodes, taps)):
            tap.replace_all_uses_with(node)
            gm.graph.erase_node(tap)
            gm.delete_submodule(f"{TAP_PREFIX}{k}")
        gm.recompile()


def _freeze(gm: fx.GraphModule) -> list[torch.nn.Parameter]:
    """Stop gm's parameters from requiring gradients (the ones that did, returned to be restored):
    autograd then keeps no layer input for a weight gradient nobody asks for."""
    frozen = [p for p in gm.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


ACTIVATION_BYTES = 24  # per target output value and token: about six float32 tensors (the output, its gradient, what autograd saves)


def _memory_plan(nodes: list[fx.Node], batches: list, max_memory: float, projected: set[str] = frozenset(),
                 working: int = memory.GB) -> tuple[set[str], list]:
    """Within Config.max_memory (tngraph.memory): which targets keep diagonal statistics, and the
    batches cut into micro-batches whose forward and backward pass fit in half the room left, and
    in `working` bytes whatever the limit (the statistics are sums over rows: the same in
    distribution, other random probes)."""
    limit = memory.limit_bytes(max_memory)
    targets = {meta.info(n).target.name: meta.info(n).target for n in nodes}
    widths = {name: t.out_features for name, t in targets.items() if name not in projected}
    fixed = sum(ProjectedGradStats.bytes(t.in_features) for name, t in targets.items() if name in projected)
    diagonal = memory.diagonal_plan(widths, limit, held=fixed)
    if not batches:
        return diagonal, batches
    held = fixed + sum(GradStats.bytes(w, name in diagonal) for name, w in widths.items())
    per_token = ACTIVATION_BYTES * sum(meta.info(n).target.out_features for n in nodes)
    room = min(working, (limit - memory.resident_bytes() - held) / 2) if limit else working
    length = max(batch_shape(b)[1] for b in batches)  # calibration batches come sorted by length: the longest decides
    fit = max(1, int(room // max(per_token * length, 1)))
    if fit >= max(batch_shape(b)[0] for b in batches):
        return diagonal, batches
    why = f"to stay within {memory.size(limit)} (--max-memory)" if room < working else "the model's size in activations at most"
    log.info("fisher: micro-batches of %d rows (about %s of activations each): %s", fit, memory.size(fit * length * per_token), why)
    return diagonal, [part for batch in batches for part in split_batch(batch, fit)]


def needed(ctx: PassContext) -> bool:
    """Whether this run uses output statistics: output whitening of low-rank targets, or the fisher
    sensitivity of a budgeted allocation."""
    cfg = ctx.config
    if not (ctx.calibration and cfg.whiten):
        return False
    budgeted = cfg.allocation_kind == "budgeted"
    lowrank = cfg.format == "lowrank" or budgeted
    return (cfg.output_whiten and lowrank) or (budgeted and cfg.sensitivity in ("fisher", "predicted"))


@declare(kind="analysis", requires=("targets", "calibration"), produces=("gradients",))
def fisher(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    done = ctx.analysis.pop("fisher_in_calibrate", None)
    if done is not None:  # calibrate's forwards took the backward passes too
        return PassResult(gm, modified="skipped" not in done, summary=done)
    if not (_linear_uses(gm) and needed(ctx)):
        return PassResult(gm, modified=False, summary={"skipped": "not used by this configuration"})
    summary = collect(gm, ctx)
    return PassResult(gm, modified="skipped" not in summary, summary=summary)


def _linear_uses(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in meta.target_uses(gm) if meta.info(n).target.kind == "linear"]


def with_calibration(ctx: PassContext, gm: fx.GraphModule) -> bool:
    """Whether this run's fisher pass reads every calibration batch: calibrate's forwards then run
    its backward passes too (one forward per batch instead of two)."""
    return ("fisher" in ctx.passes and needed(ctx) and ctx.group is None and bool(_linear_uses(gm))
            and len(spread(ctx.calibration, ctx.config.fisher_batches)) == len(ctx.calibration))


def collect(gm: fx.GraphModule, ctx: PassContext, before=None, forwards=None) -> dict:
    """The fisher pass's work: the output-gradient statistics of the linear targets into
    ctx.grad_stats. From calibrate: `before(args, kwargs)` is called ahead of each forward (its
    observers read the batch's mask), and `forwards(batches)` runs them where nothing is tapped.
    Returns the pass's summary."""
    nodes = _linear_uses(gm)
    batches = spread(ctx.calibration, ctx.config.fisher_batches)
    take = len(batches)
    # a language model's head runs reduced: the probes' gradients at its input have the same
    # distribution. A head that is a target is not tapped: the objective is its output, so its
    # output-gradient Gram is the identity (and V x V would not fit); its sensitivity is known exactly
    heads = head_targets(gm, ctx)
    with reduced_head(gm, ctx, held=bool(heads)) as reduced:
        if reduced and heads:
            ctx.analysis["head_targets"] = dict.fromkeys(heads, True)
            nodes = [n for n in nodes if meta.info(n).target.name not in heads]
        if not nodes:  # the heads were the only targets: nothing to tap (calibrate's forwards still run)
            if forwards is not None:
                forwards(batches)
            return {"skipped": "the only targets are output heads"}
        stats = gradient_stats(gm, nodes, batches, ctx.objective, seed=ctx.config.seed, show=ctx.config.progress,
                               max_memory=ctx.config.max_memory, before=before, projected=input_side(ctx, nodes))
    memory.return_freed(collect=False)  # the backward passes' buffers go back to the system
    ctx.grad_stats.update(stats)
    ctx.counters["fisher.batches"] += take
    log.info("fisher: output-gradient statistics of %d targets over %d batches", len(nodes), take)
    projected = sum(isinstance(s, ProjectedGradStats) for s in stats.values())
    if projected:
        ctx.counters["fisher.projected"] += projected
    return {"targets": len(nodes), "batches": take, **({"projected": projected} if projected else {})}


def input_side(ctx: PassContext, nodes: list[fx.Node]) -> set[str]:
    """The targets whose output-gradient statistics are kept projected onto their inputs
    (calibration.ProjectedGradStats): plain low-rank linear targets (no convolution or tied table)
    with more outputs than inputs, in runs whose candidates are whitened low rank alone
    (Config.short_side_used)."""
    if not ctx.config.short_side_used:
        return set()
    ts = [meta.info(n).target for n in nodes]
    return {t.name for t in ts if t.kind == "linear" and t.conv is None and not t.lookups and t.out_features > t.in_features}


def output_whitening(ctx: PassContext, name: str, rows: torch.Tensor | None = None
                     ) -> Whitening | DiagonalWhitening | ProjectedGradGram | None:
    """The output-side whitening of a target (Cholesky of its damped gradient Gram, restricted to
    output `rows` when given; for projected statistics, their ProjectedGradGram), when this run uses
    output whitening and the statistics exist."""
    cfg = ctx.config
    stats = ctx.grad_stats.get(name)
    if not (cfg.output_whiten and cfg.whiten and stats is not None and stats.rows > 0):
        return None
    if isinstance(stats, ProjectedGradStats):  # known through the inputs: W^T G W, no out x out factor
        if rows is not None:
            raise PassError(f"{name}'s output-gradient statistics were kept projected onto its inputs, which cannot be restricted to output rows",
                            "report this: fisher.input_side should have kept its output-gradient Gram")
        return projected_gradient_whitening(stats.gram, stats.scale, stats.damping(cfg.output_damping))
    if stats.diagonal:  # a memory plan's diagonal statistics: scaled rows, no n x n factor
        return diagonal_whitening(stats.sums if rows is None else stats.sums[rows], stats.damping(cfg.output_damping))
    gram = stats.gram if rows is None else stats.gram[rows][:, rows]
    return whitening_from_gram(gram, stats.damping(cfg.output_damping))
