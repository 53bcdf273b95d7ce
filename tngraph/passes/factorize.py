"""factorize: linear(x, W, b) -> linear(linear(x, B), A, b)  (lowrank: A @ B the whitened truncated SVD)
           linear(x, W, b) -> flatten(einsum(eq, unflatten(x), *cores)) + b  (tensor-network formats)."""
from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from .. import meta
from ..plan import TargetPlan
from ..progress import progress
from ..tn import decompose_lowrank, whitening_from_gram
from ..tn.formats import FORMATS
from ..tn.formats.tt import refit_last_core
from .allocate import format_options
from .base import PassContext, PassResult
from .rewrite import RewriteRule, apply_rules
from .targets import LinearMatch, getattr_path, match_linear

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


def _check_network(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext) -> str | None:
    plan = meta.info(m.node).plan
    if plan is None:
        return "unplanned"
    if plan.format in ("dense", "lowrank"):
        return "other_format"
    return None


def _copy_meta(source: fx.Node, created: list[tuple[fx.Node, str]]) -> None:
    for node, role in created:
        for key in _COPIED_META:
            if key in source.meta:
                node.meta[key] = source.meta[key]
        meta.update(node, provenance=meta.Provenance("factorize", source.name, role))


def _network_replacement(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext) -> fx.Node:
    node_info = meta.info(m.node)
    t, plan = node_info.target, node_info.plan
    weight = getattr_path(gm, t.weight)
    fmt, options = FORMATS[plan.format], format_options(ctx)
    stats = ctx.stats.get(t.name)
    whitening = None
    if ctx.config.whiten and stats is not None and stats.rows > 0:
        whitening = fmt.whitening(stats.gram, t.out_features, t.in_features, ctx.config.damping, **options)
        ctx.counters[f"factorize.{plan.format}.whitened"] += 1
    net = fmt.decompose(weight, plan.rank, whitening, **options)
    if ctx.config.refit and stats is not None and stats.rows > 0 and plan.format == "tt":
        net = refit_last_core(net, weight, stats.gram)
        ctx.counters[f"factorize.{plan.format}.refit"] += 1
    factors = {f"core{k}": c for k, c in enumerate(net.cores)}
    spec = dict(core_labels=list(net.core_labels), in_dims=list(net.in_dims), out_dims=list(net.out_dims),
                in_labels=net.in_labels, out_labels=net.out_labels, format=net.format)
    ctx.plan[t.name] = TargetPlan(t.name, plan.format, plan.rank, t.in_features, t.out_features, t.bias is not None, factors, spec)
    owner_path, _, weight_attr = t.weight.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    prefix = f"{owner_path}." if owner_path else ""
    graph = gm.graph
    equation = "..." + net.in_labels + "," + ",".join(net.core_labels) + "->..." + net.out_labels
    created: list[tuple[fx.Node, str]] = []
    with graph.inserting_before(m.node):
        core_nodes = []
        for k, core in enumerate(net.cores):
            name = _free_name(owner, f"{weight_attr}_{plan.format}_core{k}")
            owner.register_parameter(name, torch.nn.Parameter(core, requires_grad=False))
            core_nodes.append(graph.get_attr(prefix + name))
            core_nodes[-1].meta["val"] = core
            created.append((core_nodes[-1], f"core{k}"))
        xs = graph.call_function(aten.unflatten.int, (m.x, -1, list(net.in_dims)))
        ys = graph.call_function(aten.einsum.default, (equation, [xs, *core_nodes]))
        out = graph.call_function(aten.flatten.using_ints, (ys, -len(net.out_dims), -1))
        created += [(xs, "unflatten"), (ys, "contract"), (out, "flatten")]
        if m.bias is not None:
            out = graph.call_function(aten.add.Tensor, (out, m.bias))
            created.append((out, "bias"))
    _copy_meta(m.node, created)
    meta.update(out, target=t, plan=plan, calibration=node_info.calibration)
    x_val = m.x.meta.get("val")
    fake_mode = detect_fake_mode([x_val]) if x_val is not None else None
    if fake_mode is not None:
        with fake_mode:
            fakes = [fake_mode.from_tensor(c) for c in net.cores]
            xs.meta["val"] = aten.unflatten.int(x_val, -1, list(net.in_dims))
            ys.meta["val"] = aten.einsum.default(equation, [xs.meta["val"], *fakes])
            flat = aten.flatten.using_ints(ys.meta["val"], -len(net.out_dims), -1)
            out.meta["val"] = flat
    return out


def _replacement(m: LinearMatch, gm: fx.GraphModule, ctx: PassContext) -> fx.Node:
    node_info = meta.info(m.node)
    t, plan = node_info.target, node_info.plan
    weight = getattr_path(gm, t.weight)
    whitening = None
    stats = ctx.stats.get(t.name)
    if ctx.config.whiten and stats is not None and stats.rows > 0:
        whitening = whitening_from_gram(stats.gram, ctx.config.damping)
    a, b = decompose_lowrank(weight, plan.rank, whitening)
    ctx.plan[t.name] = TargetPlan(
        name=t.name,
        format="lowrank",
        rank=plan.rank,
        in_features=t.in_features,
        out_features=t.out_features,
        has_bias=t.bias is not None,
        factors={"a": a, "b": b},
    )
    owner_path, _, weight_attr = t.weight.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    prefix = f"{owner_path}." if owner_path else ""
    a_name = _free_name(owner, f"{weight_attr}_lowrank_a")
    b_name = _free_name(owner, f"{weight_attr}_lowrank_b")
    owner.register_parameter(a_name, torch.nn.Parameter(a, requires_grad=False))
    owner.register_parameter(b_name, torch.nn.Parameter(b, requires_grad=False))
    graph = gm.graph
    with graph.inserting_before(m.node):
        b_node = graph.get_attr(prefix + b_name)
        a_node = graph.get_attr(prefix + a_name)
        hidden = graph.call_function(aten.linear.default, (m.x, b_node))
        out_args = (hidden, a_node, m.bias) if m.bias is not None else (hidden, a_node)
        out = graph.call_function(aten.linear.default, out_args)
    for created, role in ((b_node, "factor_b"), (a_node, "factor_a"), (hidden, "down"), (out, "up")):
        for key in _COPIED_META:
            if key in m.node.meta:
                created.meta[key] = m.node.meta[key]
        meta.update(created, provenance=meta.Provenance("factorize", m.node.name, role))
    meta.update(out, target=t, plan=plan, calibration=node_info.calibration)
    _set_vals(m, a_node, b_node, hidden, a, b)
    return out


def _free_name(owner: torch.nn.Module, name: str) -> str:
    candidate, i = name, 1
    while hasattr(owner, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def _set_vals(m: LinearMatch, a_node: fx.Node, b_node: fx.Node, hidden: fx.Node, a: torch.Tensor, b: torch.Tensor) -> None:
    x_val = m.x.meta.get("val")
    fake_mode = detect_fake_mode([x_val]) if x_val is not None else None
    a_node.meta["val"] = a
    b_node.meta["val"] = b
    if fake_mode is None:
        return
    with fake_mode:
        hidden.meta["val"] = aten.linear.default(x_val, fake_mode.from_tensor(b))


def _erase_dead_weights(gm: fx.GraphModule, weights: set[str]) -> int:
    """Remove the replaced dense weights (and the transposes that fed addmm/mm) no node reads any more."""
    erased = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.users:
            continue
        if node.op == "call_function" and node.target in (aten.t.default, aten.transpose.int, aten.permute.default):
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


LOWRANK_LINEAR = RewriteRule("lowrank_linear", _pattern, _check, _replacement)
NETWORK_LINEAR = RewriteRule("network_linear", _pattern, _check_network, _network_replacement)
RULES = [LOWRANK_LINEAR, NETWORK_LINEAR]


def factorize(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    candidates = [n for n in meta.targets(gm) if (meta.info(n).plan or meta.PlanInfo("dense", None, 0, 0)).format != "dense"]
    nodes = progress(candidates, desc="factorize", enabled=ctx.config.progress, unit="layer")
    replaced = {meta.info(n).target.weight for n in candidates}
    fired = apply_rules(gm, ctx, RULES, nodes=nodes)
    ctx.counters["factorize.dense_weights_freed"] += _erase_dead_weights(gm, replaced)
    gm.recompile()
    log.info("factorize: %d targets rewritten", fired)
    return PassResult(gm, modified=fired > 0, summary={"rewritten": fired})
