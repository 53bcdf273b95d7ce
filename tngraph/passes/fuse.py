"""fuse (rewrite): each factorized target's layer becomes its single op (tngraph.layers), which runs as one kernel.

Declared rules, one set per layer kind, each counting what it fused and why it refused:
- fuse.<layer>:     the region factorize wrote for a target (its layer's reference, traced)
                    ->  tngraph::<layer>(x, factors, bias, *statics)
                    (the pattern is the reference traced again at the region's values with the
                    statics of the target's plan, matched with torch.fx's SubgraphMatcher; the
                    factors parameters or buffers, the intermediates used by nothing else)
- fuse.lowrank:     also any other linear(linear(x, B), A[, bias]), B and A constants: the low-rank
                    reference's trace, matched anywhere (user chains, patch-level regions,
                    already-compressed models compiled again)
- fuse.<layer>_act: gelu|silu|relu(tngraph::<layer>(..., act="none")) -> tngraph::<layer>(..., act)
                    for layers whose epilogue is an activation (low rank; exact GELU only; the op's
                    output used by nothing else)
The fused node keeps the annotations (target, plan, sensitivity) of the region's output node.
`unfuse` expands every op back into its layer's reference.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher

from .. import meta
from .. import layers
from ..layers import LAYERS, OPS, Layer, call_inputs, expand_layers, layer_for
from .base import PassContext, PassResult, declare
from .rewrite import RewriteRule, apply_rules

aten = torch.ops.aten
LOWRANK, NETWORK = layers.LOWRANK.op, layers.NETWORK.op  # the ops
ACTIVATIONS = {aten.gelu.default: "gelu", aten.silu.default: "silu", aten.relu.default: "relu"}
# what fusion leaves without users, to remove
_PURE = (aten.linear.default, aten.einsum.default, aten.unflatten.int, aten.flatten.using_ints, *OPS)


def _in_layer(node: fx.Node) -> bool:
    """Whether factorize wrote `node` as part of a target's layer (a region for fuse.<layer>)."""
    made = meta.info(node).provenance
    return made is not None and made.created_by == "factorize" and made.role == "layer"


def _annotate(new: fx.Node, old: fx.Node, role: str) -> None:
    """tngraph's annotations with the provenance, and torch's own keys (module stack, trace, value) of the replaced node."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "val"):
        if key in old.meta and key not in new.meta:
            new.meta[key] = old.meta[key]
    new.meta[meta.KEY] = dataclasses.replace(meta.info(old), provenance=meta.Provenance("fuse", old.name, role))


@dataclass(frozen=True)
class LayerMatch:
    node: fx.Node  # the layer's output, which carries the target's annotations
    layer: Layer
    x: fx.Node
    factors: tuple[fx.Node, ...]
    bias: fx.Node | None
    region: tuple[fx.Node, ...]  # every node factorize wrote for this target


def _region(node: fx.Node, layer: Layer) -> LayerMatch | None:
    info = meta.info(node)
    if info.target is None or info.plan is None or info.plan.format == "prune" or not _in_layer(node):  # pruned: a plain linear
        return None
    if layer_for(info.plan.format, conv=info.target.conv is not None) is not layer:
        return None
    source = info.provenance.source
    region = tuple(n for n in node.graph.nodes if (p := meta.info(n).provenance) is not None and p.created_by == "factorize"
                   and p.source == source)
    roles = {meta.info(n).provenance.role: n for n in region}
    keys = layer.keys([r.removeprefix("factor_") for r in roles if r.startswith("factor_")])
    factors = tuple(roles.get(f"factor_{k}") for k in keys)
    if not factors or any(f is None for f in factors):
        return None
    inside = set(region)
    external = {a for n in region for a in n.all_input_nodes if a not in inside}
    bias = next((a for a in external if a.op == "get_attr" and str(a.target) == info.target.bias), None) if info.target.bias else None
    xs = [a for a in external if a is not bias]
    return LayerMatch(node, layer, xs[0], factors, bias, region) if len(xs) == 1 else None


def _statics(m: LayerMatch, ctx: PassContext) -> dict | None:
    plan = ctx.plan.get(meta.info(m.node).target.name)
    return m.layer.plan_statics(plan) if plan is not None else None


def _region_check(m: LayerMatch, gm: fx.GraphModule, ctx: PassContext) -> str | None:
    inside = set(m.region)
    if any(u not in inside for n in m.region if n is not m.node for u in n.users):
        return "intermediate_reused"
    if not all(f.op == "get_attr" for f in m.factors):
        return "factors_not_constant"
    statics = _statics(m, ctx)
    if statics is None:
        return "no_plan"
    pattern = m.layer.trace_nodes(m.x, list(m.factors), m.bias, statics)
    if pattern is None:
        return "no_shape"
    inputs = call_inputs(m.x, m.factors, m.bias)
    # a reference may leave an input unread (an fp16 layer's scales and zero points): the matcher
    # cannot bind a placeholder nothing reads, so such inputs leave the pattern and the comparison
    placeholders = [n for n in pattern.graph.nodes if n.op == "placeholder"]
    unread = {i for i, n in enumerate(placeholders) if not n.users}
    for i in sorted(unread, reverse=True):
        pattern.graph.erase_node(placeholders[i])
    inputs = [node for i, node in enumerate(inputs) if i not in unread]
    matcher = SubgraphMatcher(pattern.graph, match_output=False, match_placeholder=False, remove_overlapping_matches=True)
    for found in matcher.match(gm.graph):
        if found.returning_nodes == [m.node] and found.placeholder_nodes == inputs:
            return None
    return "not_the_reference"  # someone changed the region since factorize wrote it


def _region_replacement(m: LayerMatch, gm: fx.GraphModule, ctx: PassContext) -> fx.Node:
    statics = _statics(m, ctx)
    with gm.graph.inserting_before(m.node):
        new = gm.graph.call_function(m.layer.op, (m.x, list(m.factors), m.bias, *(statics[k] for k in m.layer.statics)))
    _annotate(new, m.node, m.layer.name)
    return new


@functools.lru_cache(maxsize=None)
def _chain_patterns() -> tuple[fx.GraphModule, ...]:
    """The low-rank reference traced on small tensors, with a bias and without: linear(linear(x, B), A[, bias])."""
    x, a, b, bias = torch.zeros(2, 3), torch.zeros(4, 2), torch.zeros(2, 3), torch.zeros(4)
    return layers.LOWRANK.trace(x, [a, b], bias), layers.LOWRANK.trace(x, [a, b], None)


def _chains(gm: fx.GraphModule) -> dict[fx.Node, InternalMatch]:
    """Every low-rank chain of the graph outside the layers factorize wrote, by its output node."""
    found: dict[fx.Node, InternalMatch] = {}
    for pattern in _chain_patterns():
        matcher = SubgraphMatcher(pattern.graph, match_output=False, match_placeholder=False, remove_overlapping_matches=True)
        for match in matcher.match(gm.graph):
            (out,) = match.returning_nodes
            inner = [n for n in match.nodes_map.values() if n is not None and n.op == "call_function"]
            if out not in found and not any(_in_layer(n) for n in inner):
                found[out] = match
    return found


@dataclass(frozen=True)
class ChainMatch:
    node: fx.Node  # the outer linear
    x: fx.Node
    factors: tuple[fx.Node, fx.Node]  # a, b
    bias: fx.Node | None


def _chain(node: fx.Node, chains: dict[fx.Node, InternalMatch]) -> ChainMatch | None:
    match = chains.get(node)
    if match is None:
        return None
    x, a, b, *bias = match.placeholder_nodes
    return ChainMatch(node, x, (a, b), bias[0] if bias else None)


def _chain_check(m: ChainMatch, gm: fx.GraphModule, ctx: PassContext) -> str | None:
    return None if all(w.op == "get_attr" for w in m.factors) else "weights_not_constant"


def _chain_replacement(m: ChainMatch, gm: fx.GraphModule, ctx: PassContext) -> fx.Node:
    with gm.graph.inserting_before(m.node):
        new = gm.graph.call_function(LOWRANK, (m.x, list(m.factors), m.bias, "none"))
    _annotate(new, m.node, "lowrank")
    return new


@dataclass(frozen=True)
class ActMatch:
    node: fx.Node  # the activation
    op: fx.Node  # the layer's op it follows
    layer: Layer
    act: str


def _act(node: fx.Node, layer: Layer) -> ActMatch | None:
    if node.op != "call_function" or node.target not in ACTIVATIONS or not node.args:
        return None
    op = node.args[0]
    if not isinstance(op, fx.Node) or op.op != "call_function" or op.target != layer.op or layer.op_statics(op)[layer.epilogue] != "none":
        return None
    if node.target == aten.gelu.default and node.kwargs.get("approximate", "none") != "none":
        return None
    return ActMatch(node, op, layer, ACTIVATIONS[node.target])


def _act_check(m: ActMatch, gm: fx.GraphModule, ctx: PassContext) -> str | None:
    return "output_reused" if len(m.op.users) != 1 else None


def _act_replacement(m: ActMatch, gm: fx.GraphModule, ctx: PassContext) -> fx.Node:
    statics = {**m.layer.op_statics(m.op), m.layer.epilogue: m.act}
    with gm.graph.inserting_before(m.node):
        new = gm.graph.call_function(m.layer.op, (*m.op.args[:3], *(statics[k] for k in m.layer.statics)))
    _annotate(new, m.op, f"{m.layer.name}_{m.act}")
    return new


REGION_RULES: list[RewriteRule] = [RewriteRule(f"fuse.{layer.name}", functools.partial(_region, layer=layer), _region_check,
                                               _region_replacement) for layer in LAYERS.values()]
ACT_RULES: list[RewriteRule] = [RewriteRule(f"fuse.{layer.name}_act", functools.partial(_act, layer=layer), _act_check, _act_replacement)
                                for layer in LAYERS.values() if layer.epilogue is not None]


@declare(kind="rewrite", requires=("factorized",), produces=("fused",))
def fuse(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if not ctx.config.fuse:
        return PassResult(gm, False, {"skipped": "fuse=False"})
    regions = apply_rules(gm, ctx, REGION_RULES)
    chains = apply_rules(gm, ctx, [RewriteRule("fuse.lowrank", functools.partial(_chain, chains=_chains(gm)), _chain_check,
                                               _chain_replacement)])
    acts = apply_rules(gm, ctx, ACT_RULES)
    if regions or chains or acts:
        # the regions' and chains' intermediates and the ops an activation was fused into are left without users
        for node in reversed(list(gm.graph.nodes)):
            if node.op == "call_function" and (node.target in _PURE or _in_layer(node)) and not node.users:
                gm.graph.erase_node(node)
        gm.recompile()
    return PassResult(gm, bool(regions or chains or acts), {"fused": regions + chains, "with_activation": acts})


def unfuse(gm: fx.GraphModule) -> fx.GraphModule:
    """Expand every layer's op node of `gm` (in place) back into its reference's aten ops: for targets
    without tngraph's ops (other runtimes) and to check the fused graph against it."""
    expand_layers(gm)
    gm.recompile()
    return gm
