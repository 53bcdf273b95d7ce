"""factorize: linear(x, W, b) -> the target's layer (tngraph.layers), its reference traced at the target's values:
           lowrank: linear(linear(x, B), A, b), A @ B the whitened truncated SVD (patch level: with dense rows);
           a convolution's lowrank: conv(conv(x, B), A 1x1, b), the SVD of its unfolded weight;
           tensor-network formats: flatten(einsum(eq, unflatten(x), *cores)) + b; lrbd and other defined layers: theirs."""
from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from .. import meta
from ..distributed import share_map
from ..errors import ConfigError, PassError, TngraphError
from ..layers import LAYERS, QUANT_LAYERS, call_inputs, inline, layer_for
from ..plan import TargetPlan
from ..progress import progress
from ..tn import conv as conv_formats
from ..tn import decompose_lowrank
from ..tn.lowrank import decompose_rows_weighted, lowrank_from_outputs
from ..tn.formats import FORMATS
from ..tn.quant import Choice
from ..tn.prune import Selection, prune_neurons, refit_kept
from ..tn.refit import refit_core
from ..tn.whitening import OutputGram, ProjectedGradGram
from .base import PassContext, PassResult, declare, recorded, replay
from .calibrate import input_whitening
from .fisher import output_whitening
from .allocate import reallocate
from .guard import accept
from .mlp import block_statistics, marked_pairs, pair_members, swept_neurons
from .sensitivity import quant_tensors, quant_weight
from .rewrite import RewriteRule, apply_rules
from .targets import TRANSPOSES, EmbeddingMatch, LinearMatch, getattr_path, match_embedding, match_linear, target_weight

log = logging.getLogger(__name__)
aten = torch.ops.aten

_COPIED_META = ("nn_module_stack", "stack_trace", "from_node", "source_fn_stack", "torch_fn")


def _pattern(node: fx.Node) -> LinearMatch | None:
    return match_linear(node) if meta.info(node).target is not None else None


def _check(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext) -> str | None:
    plan = meta.info(m.node).plan
    if plan is None:
        return "unplanned"
    if plan.format == "dense":
        return "planned_dense"
    if plan.format != "lowrank":
        return "other_format"
    return None


def _check_embedding(m: EmbeddingMatch, gm: fx.GraphModule, ctx: PassContext) -> str | None:
    plan = meta.info(m.node).plan
    if plan is None:
        return "unplanned"
    return "planned_dense" if plan.format == "dense" else None


def _embedding_plan(m: EmbeddingMatch, gm: fx.GraphModule, ctx: PassContext) -> TargetPlan | None:
    """The embedding's frequency-weighted low-rank factors, or None when the guard refuses them."""
    t, plan = meta.info(m.node).target, meta.info(m.node).plan
    weight = getattr_path(gm, t.weight)
    stats = ctx.stats.get(t.name)
    weights = stats.row_weights() if ctx.config.whiten and stats is not None and stats.rows > 0 else None
    if weights is not None:
        ctx.counters["factorize.embedding.frequency_weighted"] += 1
    a, b = decompose_rows_weighted(weight, plan.rank, weights)
    if not accept(ctx, m.node, weight, a @ b):
        return None
    return TargetPlan(t.name, "lowrank", plan.rank, t.in_features, t.out_features, False, {"a": a, "b": b}, kind="embedding")


def _embedding_pattern(node: fx.Node) -> EmbeddingMatch | None:
    return match_embedding(node) if meta.info(node).target is not None else None


def _embedding_replacement(m: EmbeddingMatch, gm: fx.GraphModule, ctx: PassContext) -> fx.Node:
    """embedding(W, idx) -> embedding(A, idx) @ B: gathers rows of A (rows x r), never the table."""
    t = meta.info(m.node).target
    decided = _decided(m, gm, ctx, _embedding_plan)
    if decided is None:
        return None
    a, b = decided.factors["a"], decided.factors["b"]
    graph = gm.graph
    with graph.inserting_before(m.node):
        a_node = _add_factor(gm, t, "lowrank_a", a)
        b_node = _add_factor(gm, t, "lowrank_b", b)
        rows = graph.call_function(aten.embedding.default, (a_node, m.indices, *m.node.args[2:]))
        out = graph.call_function(aten.matmul.default, (rows, b_node))
    return _finish(m, [(a_node, "factor_a"), (b_node, "factor_b"), (rows, "gather"), (out, "up")], out)


def _format_check(m: LinearMatch, layer: bool) -> str | None:
    """Refuse unless the plan's format is a tensor network (layer False) or a defined layer's (True)."""
    plan = meta.info(m.node).plan
    if plan is None:
        return "unplanned"
    if plan.format in ("dense", "lowrank") or plan.format in QUANT_LAYERS or (FORMATS[plan.format].layer is not None) != layer:
        return "other_format"
    if m.conv is not None and (layer or plan.format not in conv_formats.FORMATS):
        raise conv_formats.refusal(meta.info(m.node).target.name, plan.format)
    return None


def _check_network(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext) -> str | None:
    return _format_check(m, layer=False)


def _check_layer(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext) -> str | None:
    return _format_check(m, layer=True)


def _layer_plan(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext) -> TargetPlan | None:
    """The factors of a defined layer's format, or None when the guard refuses them."""
    plan_format = meta.info(m.node).plan.format
    fmt = FORMATS[plan_format]
    options = fmt.options(ctx.config)
    t, plan, weight, _, whitening = _inputs(m, gm, ctx, plan_format, options)
    try:
        factors = fmt.decompose(weight, plan.rank, whitening, **options)
    except ValueError as exc:  # the format's own refusal (a shape it cannot take)
        raise ConfigError(f"{t.name}: {exc}", f"--exclude {t.name}, or choose another --format") from exc
    if not accept(ctx, m.node, weight, LAYERS[fmt.layer].weight(factors, t.in_features)):
        return None
    return TargetPlan(t.name, plan.format, plan.rank, t.in_features, t.out_features, t.bias is not None, factors)


def _check_quant(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext) -> str | None:
    plan = meta.info(m.node).plan
    if plan is None:
        return "unplanned"
    return None if plan.format in QUANT_LAYERS else "other_format"


def _quant_plan(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext) -> TargetPlan | None:
    """The codes, scales (and compensating low-rank factors) of a quantized plan, error feedback on
    the calibration Gram; None when the guard refuses them."""
    t, plan = meta.info(m.node).target, meta.info(m.node).plan
    weight = target_weight(gm, t)
    choice = Choice.of_plan(plan.format, plan.quant, plan.rank)
    factors = quant_tensors(ctx, t, weight, choice)
    ctx.counters[f"factorize.{plan.format}.int{choice.bits}"] += 1
    if not accept(ctx, m.node, weight, quant_weight(factors, choice).to(weight.dtype)):
        return None
    return TargetPlan(t.name, plan.format, plan.rank or 0, t.in_features, t.out_features, t.bias is not None, factors,
                      quant=dict(plan.quant))


def _quant_replacement(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext) -> fx.Node:
    decided = _decided(m, gm, ctx, _quant_plan)
    return None if decided is None else _layer_graph(m, gm, meta.info(m.node).target, decided)


def _layer_replacement(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext) -> fx.Node:
    decided = _decided(m, gm, ctx, _layer_plan)
    return None if decided is None else _layer_graph(m, gm, meta.info(m.node).target, decided)


def _layer_graph(m: LinearMatch, gm: fx.GraphModule, t: meta.TargetInfo, decided: TargetPlan) -> fx.Node:
    """The layer's reference, traced at the target's values (make_fx, the graph's fake mode), in the linear's place."""
    layer = layer_for(decided.format, conv=decided.conv is not None)
    keys, statics = layer.keys(decided.factors), layer.plan_statics(decided)
    x_val = m.x.meta.get("val")
    fake_mode = detect_fake_mode([x_val]) if x_val is not None else None
    if fake_mode is None:
        raise PassError(f"{t.name}: the graph carries no FakeTensor values to trace the {layer.name} layer at",
                        "capture the model with tngraph.capture (torch.export), which records them")
    with gm.graph.inserting_before(m.node):
        factor_nodes = [_add_factor(gm, t, f"{decided.format}_{k}", decided.factors[k]) for k in keys]
    for node in factor_nodes:
        node.meta["val"] = fake_mode.from_tensor(_attr_of(node), static_shapes=True)
    if m.bias is not None:
        _val(m.bias, fake_mode)  # a get_attr bias without a value gets one
    traced = layer.trace_nodes(m.x, factor_nodes, m.bias, statics)
    with gm.graph.inserting_before(m.node):
        created = inline(gm.graph, traced, call_inputs(m.x, factor_nodes, m.bias))
    return _finish(m, [(n, f"factor_{k}") for n, k in zip(factor_nodes, keys)] + [(n, "layer") for n in created], created[-1])


def _inputs(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext, fmt_name: str, options: dict):
    """The target, its plan, the dense weight, its calibration stats and the format's whitening."""
    node_info = meta.info(m.node)
    t, plan = node_info.target, node_info.plan
    weight = target_weight(gm, t)
    stats = ctx.stats.get(t.name)
    if not (stats is not None and stats.rows > 0):
        stats = None
    whitening = input_whitening(ctx, t, fmt_name, **options)
    if whitening is not None:
        ctx.counters[f"factorize.{plan.format}.whitened"] += 1
    return t, plan, weight, stats, whitening


def _add_factor(gm: fx.GraphModule, t: meta.TargetInfo, suffix: str, tensor: torch.Tensor) -> fx.Node:
    """Register `tensor` next to the dense weight it replaces and return a get_attr node for it; a
    factor registered already (an earlier use of a shared weight) is read again, not copied."""
    owner_path, _, weight_attr = t.weight.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    base = f"{weight_attr}_{suffix}"
    for held, value in [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]:
        if (held == base or held.startswith(base + "_")) and value.shape == tensor.shape and value.data_ptr() == tensor.data_ptr():
            return gm.graph.get_attr(f"{owner_path}.{held}" if owner_path else held)
    name = _free_name(owner, base)
    if tensor.is_floating_point():
        owner.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    else:  # indices (the row order of patch-level plans)
        owner.register_buffer(name, tensor)
    return gm.graph.get_attr(f"{owner_path}.{name}" if owner_path else name)


def _finish(m: LinearMatch | EmbeddingMatch, created: list[tuple[fx.Node, str]], out: fx.Node) -> fx.Node:
    """Torch's metadata, provenance and FakeTensor values on the created nodes; annotations on `out`."""
    old = meta.info(m.node)
    x_val = (m.x if isinstance(m, LinearMatch) else m.indices).meta.get("val")
    fake_mode = detect_fake_mode([x_val]) if x_val is not None else None
    for node, role in created:
        for key in _COPIED_META:
            if key in m.node.meta:
                node.meta[key] = m.node.meta[key]
        meta.update(node, provenance=meta.Provenance("factorize", m.node.name, role))
        if "val" in node.meta:  # made with its value (a defined layer's traced nodes and factors)
            continue
        if node.op == "get_attr":
            node.meta["val"] = fake_mode.from_tensor(_attr_of(node), static_shapes=True) if fake_mode else _attr_of(node)
        elif fake_mode is not None:
            with fake_mode:
                args = fx.node.map_arg(node.args, lambda n: _val(n, fake_mode))
                node.meta["val"] = node.target(*args)
    meta.update(out, target=old.target, plan=old.plan, calibration=old.calibration, sensitivity=old.sensitivity)
    return out


def _val(node: fx.Node, fake_mode) -> torch.Tensor:
    if "val" not in node.meta and node.op == "get_attr":
        node.meta["val"] = fake_mode.from_tensor(_attr_of(node), static_shapes=True)
    return node.meta["val"]


def _attr_of(node: fx.Node) -> torch.Tensor:
    return getattr_path(node.graph.owning_module, str(node.target))


def _network_replacement(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext) -> fx.Node:
    t = meta.info(m.node).target
    decided = _decided(m, gm, ctx, _network_plan)
    return None if decided is None else _layer_graph(m, gm, t, decided)


def _network_plan(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext) -> TargetPlan | None:
    """The tensor-network decomposition of the target's plan, or None when the guard refuses it."""
    plan_format = meta.info(m.node).plan.format
    options = FORMATS[plan_format].options(ctx.config)  # the plan's format: budgeted mixtures hold several
    if m.conv is not None:
        return _conv_plan(m, gm, ctx, options)
    t, plan, weight, stats, whitening = _inputs(m, gm, ctx, plan_format, options)
    try:
        net = FORMATS[plan.format].decompose(weight, plan.rank, whitening, **options)
    except TngraphError as exc:
        raise type(exc)(f"{t.name}: {exc.problem}", exc.fix) from exc
    if ctx.config.refit and stats is not None:
        refitted = refit_core(net, weight, stats.gram)
        if refitted is None:
            ctx.counters[f"factorize.{plan.format}.refit_skipped"] += 1
        else:
            net = refitted
            ctx.counters[f"factorize.{plan.format}.refit"] += 1
    if not accept(ctx, m.node, weight, net.to_dense()):
        return None
    factors = {f"core{k}": c for k, c in enumerate(net.cores)}
    return TargetPlan(t.name, plan.format, plan.rank, t.in_features, t.out_features, t.bias is not None, factors, net.spec())


def _conv_plan(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext, options: dict) -> TargetPlan | None:
    """A convolution's Tucker-2 or CP factors (its kernel kept whole), whitened by the Gram of its
    unfolded input patches; None when the guard refuses them."""
    t, plan = meta.info(m.node).target, meta.info(m.node).plan
    stats = ctx.stats.get(t.name)
    gram = stats.gram if ctx.config.whiten and stats is not None and stats.rows > 0 else None
    if gram is not None:
        ctx.counters[f"factorize.conv_{plan.format}.whitened"] += 1
    try:
        factors = conv_formats.decompose(plan.format, getattr_path(gm, t.weight), plan.rank, gram, ctx.config.damping, **options)
    except TngraphError as exc:  # CP that did not converge: its own fix
        raise type(exc)(f"{t.name}: {exc.problem}", exc.fix) from exc
    except ValueError as exc:
        raise ConfigError(f"{t.name}: {exc}", f"--exclude {t.name}, or choose another --format") from exc
    statics = t.conv.statics()
    if not accept(ctx, m.node, target_weight(gm, t), layer_for(plan.format, conv=True).weight(factors, t.in_features, statics)):
        return None
    return TargetPlan(t.name, plan.format, plan.rank, t.in_features, t.out_features, t.bias is not None, factors, conv=statics)


def _decided(m: LinearMatch | EmbeddingMatch, gm: fx.GraphModule, ctx: PassContext, plan_fn) -> TargetPlan | None:
    """The target's factors (decided before, else now by `plan_fn`), recorded in ctx.plan; None when the guard refused them."""
    name = meta.info(m.node).target.name
    decided = _preset(ctx, name) or plan_fn(m, gm, ctx)
    if decided is not None:
        ctx.plan[name] = decided
    return decided


def _preset(ctx: PassContext, name: str) -> TargetPlan | None:
    """Factors decided before (the torch.compile backend's cache, or factorize's first sweep), to be
    put in place as they are."""
    preset = ctx.preset.get(name)
    return preset[1] if preset is not None else ctx.analysis.get("decided", {}).get(name)


def _replacement(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext) -> fx.Node:
    t = meta.info(m.node).target
    decided = _decided(m, gm, ctx, _lowrank_plan)
    if decided is None:
        return None
    if "dense" in decided.factors:
        return _patched_graph(m, gm, t, decided.factors)
    return _layer_graph(m, gm, t, decided)


def _lowrank_plan(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext) -> TargetPlan | None:
    """The whitened low-rank factors of the target's plan (patch level: with its dense rows), or
    None when the guard refuses them."""
    t, plan, weight, _, whitening = _inputs(m, gm, ctx, "svd", {})
    if plan.dense_rows and t.conv is None:
        return _patched_plan(m, ctx, t, plan, weight, whitening)
    out_whitening = output_whitening(ctx, t.name)
    if out_whitening is not None:
        ctx.counters["factorize.lowrank.output_whitened"] += 1
    if isinstance(whitening, OutputGram):  # calibrated through its outputs: the guard measures A B = Q W by Q
        a, b, left = lowrank_from_outputs(weight, plan.rank, whitening, out_whitening)
        ctx.counters["factorize.lowrank.through_outputs"] += 1
    else:
        (a, b), left = decompose_lowrank(weight, plan.rank, whitening, out_whitening, lean=ctx.lean), None
        if isinstance(out_whitening, ProjectedGradGram):
            ctx.counters["factorize.lowrank.through_inputs"] += 1
    if not accept(ctx, m.node, weight, a @ b, left=left):
        return None
    return TargetPlan(t.name, "lowrank", plan.rank, t.in_features, t.out_features, t.bias is not None, {"a": a, "b": b},
                      conv=t.conv.statics() if t.conv is not None else None, tied=t.lookups)


def _patched_plan(m: LinearMatch, ctx: PassContext, t, plan, weight, whitening) -> TargetPlan | None:
    """Patch level: the plan's most sensitive output rows stay dense, the rest is low-rank;
    y = index_select(cat(x B^T A^T, x D^T), order) + b."""
    dense_rows = ctx.analysis["row_order"][t.name][: plan.dense_rows].sort().values
    keep = torch.ones(t.out_features, dtype=torch.bool)
    keep[dense_rows] = False
    rest = torch.arange(t.out_features)[keep]
    out_whitening = output_whitening(ctx, t.name, rows=rest)
    if out_whitening is not None:
        ctx.counters["factorize.lowrank.output_whitened"] += 1
    a, b = decompose_lowrank(weight[rest], plan.rank, whitening, out_whitening, lean=ctx.lean)
    dense = weight[dense_rows].detach().clone()
    order = torch.argsort(torch.cat([rest, dense_rows]))
    if not accept(ctx, m.node, weight, torch.cat([a @ b, dense]).index_select(0, order)):
        return None
    factors = {"a": a, "b": b, "dense": dense, "order": order}
    ctx.counters["factorize.lowrank.dense_rows"] += len(dense_rows)
    return TargetPlan(t.name, "lowrank", plan.rank, t.in_features, t.out_features, t.bias is not None, factors)


def _patched_graph(m: LinearMatch, gm: fx.GraphModule, t: meta.TargetInfo, factors: dict[str, torch.Tensor]) -> fx.Node:
    a, b, dense, order = factors["a"], factors["b"], factors["dense"], factors["order"]
    graph = gm.graph
    with graph.inserting_before(m.node):
        b_node = _add_factor(gm, t, "lowrank_b", b)
        a_node = _add_factor(gm, t, "lowrank_a", a)
        d_node = _add_factor(gm, t, "dense_rows", dense)
        o_node = _add_factor(gm, t, "row_order", order)
        hidden = graph.call_function(aten.linear.default, (m.x, b_node))
        low = graph.call_function(aten.linear.default, (hidden, a_node))
        kept = graph.call_function(aten.linear.default, (m.x, d_node))
        both = graph.call_function(aten.cat.default, ([low, kept], -1))
        out = graph.call_function(aten.index_select.default, (both, -1, o_node))
        created = [(b_node, "factor_b"), (a_node, "factor_a"), (d_node, "dense_rows"), (o_node, "row_order"),
                   (hidden, "down"), (low, "up"), (kept, "dense"), (both, "concat"), (out, "reorder")]
        if m.bias is not None:
            out = graph.call_function(aten.add.Tensor, (out, m.bias))
            created.append((out, "bias"))
    return _finish(m, created, out)


def _free_name(owner: torch.nn.Module, name: str) -> str:
    candidate, i = name, 1
    while hasattr(owner, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def _dead_aliases(gm: fx.GraphModule, weights: set[str]) -> set[str]:
    """Attributes read by no node that hold one of `weights`' tensors: a tied Parameter torch.export
    also left under its other name (an embedding table's), to be freed with it."""
    storages = {getattr_path(gm, w).data_ptr() for w in weights}
    dead = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not node.users:
            try:
                value = getattr_path(gm, str(node.target))
            except (AttributeError, AssertionError):  # a submodule, or nothing
                continue
            if value.data_ptr() in storages:
                dead.add(str(node.target))
    return dead


def _tie_lookups(gm: fx.GraphModule, ctx: PassContext, heads: set) -> int:
    """Embedding lookups of a factorized output head's tied weight gather rows of its factors
    instead: embedding(W, idx) -> embedding(A, idx) @ B, the same A and B the head reads."""
    lookups: dict[str, list] = {}
    for node in gm.graph.nodes:
        m = match_embedding(node)
        if m is not None:
            lookups.setdefault(str(m.weight.target), []).append(m)
    done = 0
    for t in heads:
        plan = ctx.plan.get(t.name)
        if plan is None or plan.format != "lowrank" or "dense" in plan.factors or plan.conv is not None:
            continue
        for m in lookups.get(t.weight, []):
            node = m.node
            with gm.graph.inserting_before(node):
                a_node = _add_factor(gm, t, "lowrank_a", plan.factors["a"])
                b_node = _add_factor(gm, t, "lowrank_b", plan.factors["b"])
                rows = gm.graph.call_function(aten.embedding.default, (a_node, m.indices, *node.args[2:]))
                out = gm.graph.call_function(aten.matmul.default, (rows, b_node))
            _finish(m, [(a_node, "factor_a"), (b_node, "factor_b"), (rows, "gather"), (out, "up")], out)
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            done += 1
    return done


def _erase_dead_weights(gm: fx.GraphModule, weights: set[str]) -> int:
    """Remove the replaced dense weights (and the transposes that fed addmm/mm) no node reads any more."""
    erased = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.users:
            continue
        if node.op == "call_function" and node.target in TRANSPOSES:
            if any(isinstance(a, fx.Node) and a.op == "get_attr" and str(a.target) in weights for a in node.args):
                gm.graph.erase_node(node)
        elif node.op == "get_attr" and str(node.target) in weights:
            owner_path, _, attr = str(node.target).rpartition(".")
            gm.graph.erase_node(node)
            owner = gm.get_submodule(owner_path) if owner_path else gm
            if hasattr(owner, attr):
                delattr(owner, attr)
            erased += 1
    return erased


@declare(kind="analysis", requires=("targets",), produces=("plan",))
def preset_plans(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """(analysis) Every target's plan from decisions made before (ctx.preset, name ->
    (PlanInfo, TargetPlan)): replaces calibrate .. allocate when the factors are already known."""
    preset = ctx.preset
    placed = 0
    for node in meta.target_uses(gm):
        entry = preset.get(meta.info(node).target.name)
        if entry is not None:
            meta.update(node, plan=entry[0])
            placed += 1
    ctx.counters["preset.plans"] += placed
    return PassResult(gm, modified=False, summary={"preset": placed})


def _check_prune(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext) -> str | None:
    plan = meta.info(m.node).plan
    if plan is None:
        return "unplanned"
    return None if plan.format == "prune" else "other_format"


def _block_selection(gm: fx.GraphModule, ctx: PassContext, pair) -> Selection | None:
    """The pruned block's kept neurons and refitted down projection (tngraph.tn.prune: greedy on the
    down projection's input Gram, weighted by its output-gradient Gram when output whitening is on),
    decided once per block and guarded on the down projection; None when the guard refused it."""
    chosen = ctx.analysis.setdefault("pruned_blocks", {})
    if pair.down in chosen:
        return chosen[pair.down]
    down = next(n for n in meta.targets(gm) if meta.info(n).target.name == pair.down)
    weight, gram, out_gram, damping = block_statistics(gm, ctx, pair)
    count = meta.info(down).plan.rank
    if out_gram is not None:
        ctx.counters["factorize.prune.output_weighted"] += 1
    kept = swept_neurons(ctx, pair.down, count)
    if kept is not None:  # the allocation's curve swept these statistics: its neurons at this count, refitted
        selection = refit_kept(weight, gram, kept, out_gram, damping=damping)
        ctx.counters["factorize.prune.from_sweep"] += 1
    else:
        selection = prune_neurons(weight, gram, count, out_gram, damping=damping)
    full = torch.zeros_like(weight)
    full[:, selection.keep] = selection.weight
    chosen[pair.down] = selection if accept(ctx, down, weight, full) else None
    return chosen[pair.down]


def _prune_plan(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext) -> TargetPlan | None:
    """A pruned block's member: an up projection's kept rows or the down projection's refitted
    columns (its block's selection, `_block_selection`); None when the guard refused the block."""
    t, plan = meta.info(m.node).target, meta.info(m.node).plan
    pair = pair_members(gm, ctx)[t.name]
    selection = _block_selection(gm, ctx, pair)
    if selection is None:
        return None
    keep = selection.keep
    if t.name == pair.down:
        factors = {"weight": selection.weight.contiguous(), "columns": keep.clone()}
    else:
        factors = {"weight": target_weight(gm, t)[keep].detach().clone(), "rows": keep.clone()}
    ctx.counters["factorize.prune.members"] += 1
    return TargetPlan(t.name, "prune", plan.rank, t.in_features, t.out_features, t.bias is not None, factors)


def _prune_replacement(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext) -> fx.Node:
    """linear(x, W, b) -> linear(x, W[keep], b[keep]) for an up projection, linear(h, W', b) for the
    down projection (h: the block's hidden values, now of the kept neurons alone)."""
    t = meta.info(m.node).target
    decided = _decided(m, gm, ctx, _prune_plan)
    if decided is None:
        return None
    fake_mode = detect_fake_mode([m.x.meta.get("val")])
    if "columns" in decided.factors:
        _refresh_values(m.x, fake_mode)  # the elementwise ops between now carry the kept neurons alone
    with gm.graph.inserting_before(m.node):
        weight = _add_factor(gm, t, "prune_weight", decided.factors["weight"])
        bias = m.bias
        if m.bias is not None and "rows" in decided.factors:
            bias = _add_factor(gm, t, "prune_bias", getattr_path(gm, str(m.bias.target)).detach()[decided.factors["rows"]].clone())
        out = gm.graph.call_function(aten.linear.default, (m.x, weight, bias))
    created = [(weight, "factor_weight"), (out, "layer")] + ([(bias, "factor_bias")] if bias is not m.bias else [])
    return _finish(m, created, out)


def _refresh_values(node: fx.Node, fake_mode) -> None:
    """The FakeTensor values of `node` and the elementwise nodes before it, recomputed in graph order
    from their inputs' (the block's up projections have been rewritten already)."""
    region, frontier = set(), [node]
    while frontier:
        n = frontier.pop()
        if n in region or n.op != "call_function" or meta.info(n).target is not None or meta.info(n).provenance is not None:
            continue
        region.add(n)
        frontier.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    for n in sorted(region, key=order.__getitem__):
        with fake_mode:
            args = fx.node.map_arg(n.args, lambda a: _val(a, fake_mode))
            kwargs = fx.node.map_arg(n.kwargs, lambda a: _val(a, fake_mode))
            n.meta["val"] = n.target(*args, **kwargs)


LOWRANK_LINEAR = RewriteRule("lowrank_linear", _pattern, _check, _replacement)
NETWORK_LINEAR = RewriteRule("network_linear", _pattern, _check_network, _network_replacement)
LAYER_LINEAR = RewriteRule("layer_linear", _pattern, _check_layer, _layer_replacement)
QUANT_LINEAR = RewriteRule("quant_linear", _pattern, _check_quant, _quant_replacement)
LOWRANK_EMBEDDING = RewriteRule("lowrank_embedding", _embedding_pattern, _check_embedding, _embedding_replacement)
PRUNE_LINEAR = RewriteRule("prune_linear", _pattern, _check_prune, _prune_replacement)
RULES = [PRUNE_LINEAR, LOWRANK_LINEAR, NETWORK_LINEAR, LAYER_LINEAR, QUANT_LINEAR, LOWRANK_EMBEDDING]


def _planned(node: fx.Node) -> bool:
    return (meta.info(node).plan or meta.PlanInfo("dense", None, 0, 0)).format != "dense"


def _decide_one(gm: fx.GraphModule, ctx: PassContext, node: fx.Node) -> tuple[bool, TargetPlan | None, meta.PlanInfo | None]:
    """Decompose one node's plan and guard it (on the rank that owns it): (decided, the plan or None
    when the guard refused it, the node's plan after the guard)."""
    for rule, plan_fn in ((PRUNE_LINEAR, _prune_plan), (LOWRANK_LINEAR, _lowrank_plan), (NETWORK_LINEAR, _network_plan), (LAYER_LINEAR, _layer_plan),
                          (QUANT_LINEAR, _quant_plan), (LOWRANK_EMBEDDING, _embedding_plan)):
        match = rule.pattern(node)
        if match is not None and rule.check(match, gm, ctx) is None:
            found = plan_fn(match, gm, ctx)
            if found is None:
                ctx.counters[f"{rule.name}.refused.guard"] += 1
            return True, found, meta.info(node).plan
    return False, None, None


def _decide(gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node]) -> None:
    """Decompose each node's plan and run the guard on it, into ctx.analysis["decided"] (a refused
    one is planned dense by the guard); nothing enters the graph yet. With several ranks
    (ctx.group), each target is decided by one of them and what it recorded shared."""
    decided = ctx.analysis.setdefault("decided", {})
    todo = [n for n in nodes if meta.info(n).target.name not in decided and _preset(ctx, meta.info(n).target.name) is None and _planned(n)]
    results = share_map(ctx.group, todo, lambda node: recorded(ctx, meta.info(node).target.name, lambda: _decide_one(gm, ctx, node)),
                        wrap=lambda items: progress(items, desc="factorize", enabled=ctx.config.progress, unit="layer"))
    for j, (node, ((made, found, node_plan), effects)) in enumerate(results.items()):
        name = meta.info(node).target.name
        if ctx.group is not None and ctx.group.owner(j) != ctx.group.rank:
            replay(ctx, name, effects)
            if made:
                for use in meta.target_uses(gm):  # the guard may have planned it dense
                    if meta.info(use).target.name == name:
                        meta.update(use, plan=node_plan)
        if found is not None:
            decided[name] = found


@declare(kind="rewrite", requires=("plan",), produces=("factorized",))
def factorize(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Decompose every planned target and guard it; when the guard keeps targets dense, the others'
    plans are solved again with those fixed dense (reallocate), so the budget still holds, and the
    changed ones decomposed again; then every decided substitution enters the graph."""
    _decide(gm, ctx, [n for n in meta.targets(gm) if _planned(n)])
    fixed: set[str] = set()
    while set(ctx.analysis.get("guard_reverted", {})) - fixed:
        fixed = set(ctx.analysis["guard_reverted"])
        changed = reallocate(gm, ctx, fixed)
        for name in changed:
            ctx.analysis["decided"].pop(name, None)
        ctx.counters["factorize.reallocated"] += len(changed)
        _decide(gm, ctx, [n for n in meta.targets(gm) if meta.info(n).target.name in changed])
    candidates = [n for n in meta.target_uses(gm) if _planned(n)]  # every use of a shared weight, one set of factors
    replaced = {meta.info(n).target.weight for n in candidates}
    # a pruned up projection reads its kept bias entries: the whole bias goes with the weight
    replaced |= {meta.info(n).target.bias for n in candidates if meta.info(n).plan.format == "prune" and meta.info(n).target.bias
                 and meta.info(n).target.name not in marked_pairs(gm, ctx)}
    replaced |= _dead_aliases(gm, replaced)
    fired = apply_rules(gm, ctx, RULES, nodes=candidates)
    ctx.analysis.pop("decided", None)  # the factors now live in the graph and ctx.plan
    ctx.counters["factorize.tied_lookups"] += _tie_lookups(gm, ctx, {meta.info(n).target for n in candidates})
    ctx.counters["factorize.dense_weights_freed"] += _erase_dead_weights(gm, replaced)
    gm.recompile()
    log.info("factorize: %d targets rewritten", fired)
    return PassResult(gm, modified=fired > 0, summary={"rewritten": fired})
