"""calibrate: stream calibration batches through the graph, accumulating each target's X^T X,
mean |x| and the norms of its output channels (a convolution's X: its unfolded input patches).

Observer modules (call_module nodes) are inserted before and after the targets for the duration
of the pass and removed after it, so the graph leaves this pass as it entered. What they accumulate
lives on the observers of this call: the pass keeps no state between calls.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.fx as fx

from .. import memory, meta
from ..calibration import CountStats, GramStats, OutputGramStats, OutputStats, channels_last
from ..errors import DataError, PassError
from ..progress import progress
from ..tn.formats import FORMATS
from ..tn.whitening import output_gram_whitening, whitening_from_gram
from . import fisher
from .base import PassContext, PassResult, declare
from .mlp import marked_pairs
from .head import head_targets, reduced_head
from .targets import getattr_path, target_weight

log = logging.getLogger(__name__)

OBSERVER_PREFIX = "tngraph_observer_"


class Batch:
    """The batch running now: its token mask (True = real token), if any, read by every observer,
    and whether a calibration batch runs at all (other forwards, such as the output head's objective
    check, leave the statistics alone)."""

    mask: torch.Tensor | None = None
    active: bool = False


class Observer(torch.nn.Module):
    """Accumulates the rows reaching one point of the graph into `stats` (padding left out)."""

    def __init__(self, stats: GramStats | CountStats | OutputStats | OutputGramStats, batch: Batch, rows: Any = None,
                 inputs: bool = False):
        super().__init__()
        self.stats, self.batch, self.rows = stats, batch, rows
        self.update = stats.update_inputs if inputs else stats.update  # output statistics see both sides of the target

    def forward(self, x: torch.Tensor) -> None:
        if not self.batch.active:
            return
        if self.rows is not None:  # a convolution's: unfolded input patches, or output channels last
            x = self.rows(x)
        mask = self.batch.mask
        rows = x.shape if isinstance(self.stats, CountStats) else x.shape[:-1]
        if mask is not None and tuple(rows) == tuple(mask.shape):
            x = x[mask]  # padded positions are not data: leave them out of the statistics
        self.update(x)


def _insert(gm: fx.GraphModule, where: fx.Node, after: bool, x: fx.Node, observer: Observer, index: int) -> str:
    name = f"{OBSERVER_PREFIX}{index}"
    gm.add_submodule(name, observer)
    with (gm.graph.inserting_after(where) if after else gm.graph.inserting_before(where)):
        gm.graph.call_module(name, (x,))
    return name


@declare(kind="analysis", requires=("targets",), produces=("calibration",))
def calibrate(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    nodes = meta.target_uses(gm)
    if not ctx.calibration or not nodes:
        if nodes:
            log.info("calibrate: no calibration data; decompositions will be data-free")
        return PassResult(gm, modified=False, summary={"batches": 0})
    stats, shared, outputs = {}, {}, {}
    batch, observers = Batch(), []
    inputs: dict[str, list[fx.Node]] = {}  # a shared weight's Gram sums the inputs of all its uses
    for node in nodes:
        inputs.setdefault(meta.info(node).target.name, []).append(node)
    heads = head_targets(gm, ctx)  # a vocabulary head's output norms follow from its input's Gram
    through_outputs = output_side(gm, ctx, inputs, heads)
    narrow = _gram_plan(gm, ctx, inputs, through_outputs)
    for node in meta.targets(gm):
        t = meta.info(node).target
        key = _input_key(t, inputs)
        if key in through_outputs:  # C = W X^T X W^T from its outputs, not X^T X
            stats[t.name] = OutputGramStats(t.out_features, t.in_features, getattr_path(gm, t.bias) if t.bias else None,
                                            torch.float32 if ctx.lean or t.name in narrow else torch.float64)
            for use in inputs[t.name]:
                observers.append(_insert(gm, use, False, use.args[_x_index(use)], Observer(stats[t.name], batch, inputs=True), len(observers)))
                observers.append(_insert(gm, use, True, use, Observer(stats[t.name], batch), len(observers)))
            continue
        if key in shared:  # targets reading the same input (q, k, v) share one set of statistics
            stats[t.name] = shared[key]
            continue
        stats[t.name] = shared[key] = (CountStats(t.out_features) if t.kind == "embedding"
                                       else GramStats(t.in_features, torch.float32 if ctx.lean or key in narrow else torch.float64))
        rows = functools.partial(unfolded_rows, t.conv) if t.conv is not None else None
        for use in inputs[t.name]:
            observers.append(_insert(gm, use, False, use.args[_x_index(use)], Observer(stats[t.name], batch, rows), len(observers)))
    for node in nodes:  # outputs: one set per target, fed by each of its uses
        t = meta.info(node).target
        if t.kind == "linear" and t.name not in heads:
            out = outputs.setdefault(t.name, OutputStats(t.out_features))
            rows = channels_last if t.conv is not None else None
            observers.append(_insert(gm, node, True, node, Observer(out, batch, rows), len(observers)))
    gm.recompile()

    def forwards(batches: list) -> None:
        with torch.no_grad(), reduced_head(gm, ctx, objective=False, held=True):  # no logits: the statistics are taken upstream
            for args, kwargs in progress(batches, desc="calibrate", enabled=ctx.config.progress, unit="batch"):
                _run(gm, args, kwargs, batch)

    try:
        if fisher.with_calibration(ctx, gm):  # the fisher pass's backward passes ride on these forwards
            ctx.analysis["fisher_in_calibrate"] = fisher.collect(gm, ctx, before=functools.partial(_set_mask, batch), forwards=forwards)
        else:
            forwards(ctx.calibration)
    finally:
        for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target in observers]:
            gm.graph.erase_node(node)
        for name in observers:
            gm.delete_submodule(name)
        gm.recompile()
    for node in meta.targets(gm):
        t = meta.info(node).target
        if t.name in heads and isinstance(stats[t.name], GramStats):
            outputs[t.name] = _head_outputs(gm, t, stats[t.name])
    finite: dict[int, bool] = {}  # per set of statistics (q, k, v share one)
    for node in nodes:
        name = meta.info(node).target.name
        s = stats[name]
        if isinstance(s, (GramStats, OutputGramStats)) and not finite.setdefault(id(s), s.finite()):
            raise DataError(f"the calibration inputs reaching {name} hold NaN or Inf values",
                            "check the calibration data (and, for fp16 models, whether activations overflow: calibrate in float32)")
        mean_abs = float(s.mean_abs.mean()) if isinstance(s, (GramStats, OutputGramStats)) else 0.0
        out = outputs.get(name)
        output_rms = float(out.rms.pow(2).mean().sqrt()) if out is not None else 0.0
        meta.update(node, calibration=meta.CalibrationInfo(rows=s.rows, mean_abs=mean_abs, output_rms=output_rms))
    ctx.stats.update(stats)
    ctx.output_stats.update(outputs)
    rows = max(s.rows for s in stats.values())
    ctx.counters["calibrate.batches"] += len(ctx.calibration)
    log.info("calibrate: %d batches, %d rows per target", len(ctx.calibration), rows)
    return PassResult(gm, modified=True, summary={"batches": len(ctx.calibration), "rows": rows})


def _input_key(t: meta.TargetInfo, inputs: dict[str, list[fx.Node]]) -> tuple:
    """What targets share one set of input statistics by: the nodes their uses read (q, k, v share
    theirs), and the convolution geometry (convolutions of one input see it unfolded by their own)."""
    return tuple(use.args[_x_index(use)] for use in inputs[t.name]), t.conv


def output_side(gm: fx.GraphModule, ctx: PassContext, inputs: dict[str, list[fx.Node]], heads: set[str]) -> set[tuple]:
    """The inputs (by _input_key) whose targets are calibrated through their outputs
    (calibration.OutputGramStats): where each target reading the input is a plain low-rank
    candidate (no convolution, vocabulary head or tied table) and their output Grams together are
    smaller than the input's X^T X (a down projection: yes; q, k, v sharing one input: no). Only
    runs whose candidates are whitened low rank alone: the tensor-network formats, mixtures, dense
    rows, precisions and the predictor read X^T X or the whitened weight itself (Config.short_side_used)."""
    if not ctx.config.short_side_used:
        return set()
    pruned = marked_pairs(gm, ctx)  # a pruned block's down projection needs its input Gram itself
    groups: dict[tuple, list[meta.TargetInfo]] = {}
    for node in meta.targets(gm):
        t = meta.info(node).target
        groups.setdefault(_input_key(t, inputs), []).append(t)
    return {key for key, ts in groups.items()
            if all(t.kind == "linear" and t.conv is None and not t.lookups and t.name not in heads and t.name not in pruned for t in ts)
            and sum(t.out_features**2 for t in ts) < ts[0].in_features**2}


def _gram_plan(gm: fx.GraphModule, ctx: PassContext, inputs: dict[str, list[fx.Node]], through_outputs: set[tuple]) -> set:
    """Which inputs' Grams (by _input_key; an output Gram by its target's name) are summed in float32:
    none while the float64 ones take at most half the room Config.max_memory leaves beside what the
    process holds (the rest is for the forwards and the later passes), else the widest first until
    they do. Refuses before allocating when even float32 ones would not fit (tngraph.memory)."""
    widths = {}
    for node in meta.targets(gm):
        t = meta.info(node).target
        key = _input_key(t, inputs)
        if key in through_outputs:
            widths[t.name] = t.out_features
        elif t.kind == "linear":
            widths[key] = t.in_features
    limit = memory.limit_bytes(ctx.config.max_memory)
    if limit:
        memory.load_weights(gm)  # the plans count the whole model as held
    memory.check_fits(sum(GramStats.bytes(w, torch.float32) for w in widths.values()),
                      f"the calibration statistics ({len(widths)} Gram matrices of target inputs or outputs, float32)", limit,
                      "raise --max-memory, target fewer layers (--include/--exclude), or pass --blockwise for a causal LM")
    if not limit:
        return set()
    narrow, _ = memory.widest_first(widths, GramStats.bytes, lambda w: GramStats.bytes(w, torch.float32),
                                    (limit - memory.resident_bytes()) / 2)
    if narrow:
        log.info("memory plan: %d of %d calibration Grams summed in float32 (the widest: %d wide) to stay within %s (--max-memory)",
                 len(narrow), len(widths), max(widths[k] for k in narrow), memory.size(limit))
    return narrow


def _head_outputs(gm: fx.GraphModule, t: meta.TargetInfo, stats: GramStats) -> OutputStats:
    """A vocabulary head's output channel norms from its input's Gram, without its logits: the
    squared norm of channel j is w_j^T (X^T X) w_j (the bias left out)."""
    out = OutputStats(t.out_features)
    weight = target_weight(gm, t).detach()
    gram = stats.gram.to(torch.float32)
    for start in range(0, t.out_features, 8192):
        rows = weight[start : start + 8192].float()
        out.sq_sum[start : start + 8192] = ((rows @ gram) * rows).sum(1).clamp_min(0).to(torch.float64)
    out.rows = stats.rows
    return out


def input_whitening(ctx: PassContext, t: meta.TargetInfo, fmt_name: str = "svd", **options):
    """The shared whitening step of a linear target's calibration X^T X, shaped for `fmt_name`
    (with its options); None when whitening is off or the target saw no calibration rows."""
    stats = ctx.stats.get(t.name)
    if not (ctx.config.whiten and stats is not None and getattr(stats, "rows", 0) > 0):
        return None
    if isinstance(stats, OutputGramStats):
        if fmt_name != "svd" or options:
            raise PassError(f"{t.name} was calibrated through its outputs, which whiten low rank only, not {fmt_name}",
                            "report this: calibrate.output_side should have kept its input Gram")
        key = ("outputs", id(stats), stats.rows, ctx.config.damping)
        cached = ctx.analysis.get("whitening", {}).get("last")
        if cached is None or cached[0] != key:
            ctx.analysis["whitening"] = {"last": (key, output_gram_whitening(stats.output_gram, stats.scale, ctx.config.damping))}
        return ctx.analysis["whitening"]["last"][1]
    if trades_gram(ctx) and fmt_name == "svd" and not options:
        # memory-bound (ctx.lean), low-rank only: the Gram is replaced by its Cholesky factor, made
        # once per input; nothing later needs the Gram itself (the guard measures with the factor)
        if stats.whitening is None:
            stats.whitening = whitening_from_gram(stats.gram, ctx.config.damping)
            stats.gram = None
        return stats.whitening
    # targets reading one input (q, k, v) share its statistics and come one after another: the last
    # whitening made is kept, so their Cholesky factor is computed once
    key = (id(stats), stats.rows, fmt_name, t.out_features, t.in_features, ctx.config.damping, tuple(sorted(options.items())))
    cached = ctx.analysis.get("whitening", {}).get("last")
    if cached is not None and cached[0] == key:
        return cached[1]
    ctx.analysis["whitening"] = {}  # the last one goes before the next is made: one is held at a time
    white = FORMATS[fmt_name].whitening(stats.gram, t.out_features, t.in_features, ctx.config.damping, **options)
    ctx.analysis["whitening"] = {"last": (key, white)}
    return white


def trades_gram(ctx: PassContext) -> bool:
    """Whether this run keeps each input's whitening instead of its Gram matrix: a memory-bound
    driver (ctx.lean) with plain low-rank candidates only (the tensor-network formats, mixtures and
    dense-row candidates read the Gram itself)."""
    cfg = ctx.config
    return ctx.lean and cfg.format == "lowrank" and not cfg.mixture and not cfg.dense_rows and not cfg.bits


def unfolded_rows(conv: meta.Conv, x: torch.Tensor) -> torch.Tensor:
    """A convolution's input as the rows its unfolded weight multiplies: one row of
    in_channels * prod(kernel) values (channel-major, as the weight's reshape) per output position."""
    if conv.dims == 1:
        x, kernel, stride, padding, dilation = x.unsqueeze(-2), (1, *conv.kernel), (1, *conv.stride), (0, *conv.padding), (1, *conv.dilation)
    else:
        kernel, stride, padding, dilation = conv.kernel, conv.stride, conv.padding, conv.dilation
    if x.dim() == 3:  # an unbatched input
        x = x.unsqueeze(0)
    patches = torch.nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _x_index(node: fx.Node) -> int:
    """Which argument carries the rows: addmm's second, embedding's indices, linear's / mm's first."""
    return 1 if node.target in (torch.ops.aten.addmm.default, torch.ops.aten.embedding.default) else 0


def _set_mask(batch: Batch, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    mask = kwargs.get("attention_mask")
    batch.mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() >= 1 else None
    batch.active = True


def _run(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], batch: Batch) -> None:
    _set_mask(batch, args, kwargs)
    try:
        gm(*args, **kwargs)
    except Exception as exc:
        raise DataError(
            f"a calibration batch does not fit the captured model: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
            "pass calibration samples with the same structure, dtypes and ranks as the example inputs",
        ) from exc
