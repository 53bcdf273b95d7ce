"""fuse (rewrite): factor chains become single tngraph ops (tngraph.ops), which run as one kernel.

Declared rules, applied in order over the whole graph, each counting what it fused and why it refused:
- fuse.lowrank:     linear(linear(x, B), A[, bias])  ->  tngraph::lowrank(x, B, A, bias, "none")
                    (B and A parameters or buffers; the intermediate used by nothing else)
- fuse.lowrank_act: gelu|silu|relu(tngraph::lowrank(..., "none"))  ->  tngraph::lowrank(..., act)
                    (exact GELU only; the op's output used by nothing else)
- fuse.network:     [add(] flatten(einsum(eq, [unflatten(x, in_dims), *cores])) [, bias)]
                    ->  tngraph::network(x, cores, eq, in_dims, out_features, bias)
                    (the tensor-network formats; cores parameters or buffers)
- fuse.layer:       a defined layer's traced reference (tngraph.layers; factorize wrote it)
                    ->  tngraph::<layer>(x, factors, bias)
                    (the pattern is the reference traced again at the region's values, matched with
                    torch.fx's SubgraphMatcher; the lowrank and network rules leave such regions alone)
The fused node keeps the annotations (target, plan, sensitivity) of the chain's output node.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import meta, ops  # noqa: F401  (ops registers torch.ops.tngraph.*)
from ..layers import LAYERS, Layer, call_inputs, expand_layers
from ..tn.formats import FORMATS
from .base import PassContext, PassResult, declare
from .rewrite import RewriteRule, apply_rules

aten = torch.ops.aten
LOWRANK = torch.ops.tngraph.lowrank.default
NETWORK = torch.ops.tngraph.network.default
_ACTS = {aten.gelu.default: "gelu", aten.silu.default: "silu", aten.relu.default: "relu"}
# what fusion leaves without users, to remove
_PURE = (aten.linear.default, LOWRANK, aten.einsum.default, aten.unflatten.int, aten.flatten.using_ints)


@dataclass(frozen=True)
class ChainMatch:
    node: fx.Node  # the outer linear
    inner: fx.Node
    x: fx.Node
    b: fx.Node
    a: fx.Node
    bias: fx.Node | None


@dataclass(frozen=True)
class ActMatch:
    node: fx.Node  # the activation
    op: fx.Node  # the tngraph::lowrank it follows
    act: str


def _in_layer(node: fx.Node) -> bool:
    """Whether factorize wrote `node` as part of a defined layer's reference (fuse.layer's to fuse)."""
    made = meta.info(node).provenance
    return made is not None and made.created_by == "factorize" and made.role == "layer"


def _chain(node: fx.Node) -> ChainMatch | None:
    if node.op != "call_function" or node.target != aten.linear.default or len(node.args) < 2 or _in_layer(node):
        return None
    inner = node.args[0]
    if not isinstance(inner, fx.Node) or inner.op != "call_function" or inner.target != aten.linear.default:
        return None
    if len(inner.args) > 2 and inner.args[2] is not None:
        return None  # a bias between the factors: not a factor chain
    bias = node.args[2] if len(node.args) > 2 else None
    return ChainMatch(node, inner, inner.args[0], inner.args[1], node.args[1], bias)


def _chain_check(m: ChainMatch, gm: fx.GraphModule, ctx: PassContext) -> str | None:
    if len(m.inner.users) != 1:
        return "intermediate_reused"
    if not all(isinstance(w, fx.Node) and w.op == "get_attr" for w in (m.b, m.a)):
        return "weights_not_constant"
    return None


def _annotate(new: fx.Node, old: fx.Node, role: str) -> None:
    """tngraph's annotations with the provenance, and torch's own keys (module stack, trace, value) of the replaced node."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "val"):
        if key in old.meta and key not in new.meta:
            new.meta[key] = old.meta[key]
    new.meta[meta.KEY] = dataclasses.replace(meta.info(old), provenance=meta.Provenance("fuse", old.name, role))


def _chain_replacement(m: ChainMatch, gm: fx.GraphModule, ctx: PassContext) -> fx.Node:
    with gm.graph.inserting_before(m.node):
        new = gm.graph.call_function(LOWRANK, (m.x, m.b, m.a, m.bias, "none"))
    _annotate(new, m.node, "lowrank")
    return new


def _act(node: fx.Node) -> ActMatch | None:
    if node.op != "call_function" or node.target not in _ACTS or not node.args:
        return None
    op = node.args[0]
    if not isinstance(op, fx.Node) or op.op != "call_function" or op.target != LOWRANK or op.args[4] != "none":
        return None
    if node.target == aten.gelu.default and node.kwargs.get("approximate", "none") != "none":
        return None
    return ActMatch(node, op, _ACTS[node.target])


def _act_check(m: ActMatch, gm: fx.GraphModule, ctx: PassContext) -> str | None:
    return "output_reused" if len(m.op.users) != 1 else None


def _act_replacement(m: ActMatch, gm: fx.GraphModule, ctx: PassContext) -> fx.Node:
    x, b, a, bias, _ = m.op.args
    with gm.graph.inserting_before(m.node):
        new = gm.graph.call_function(LOWRANK, (x, b, a, bias, m.act))
    _annotate(new, m.op, f"lowrank_{m.act}")
    return new


@dataclass(frozen=True)
class NetworkMatch:
    node: fx.Node  # the flatten, or the bias add after it
    flatten: fx.Node
    einsum: fx.Node
    unflatten: fx.Node
    bias: fx.Node | None


def _network(node: fx.Node) -> NetworkMatch | None:
    bias = None
    flat = node
    if node.op == "call_function" and node.target == aten.add.Tensor and len(node.args) == 2 and isinstance(node.args[0], fx.Node):
        flat, bias = node.args[0], node.args[1]
        if not isinstance(bias, fx.Node) or bias.op != "get_attr":
            return None
    if flat.op != "call_function" or flat.target != aten.flatten.using_ints or _in_layer(flat):
        return None
    ein = flat.args[0]
    if not isinstance(ein, fx.Node) or ein.target != aten.einsum.default:
        return None
    operands = ein.args[1]
    if not operands or not isinstance(operands[0], fx.Node) or operands[0].target != aten.unflatten.int:
        return None
    if bias is None and any(u.op == "call_function" and u.target == aten.add.Tensor for u in flat.users):
        return None  # matched at the add instead
    return NetworkMatch(node, flat, ein, operands[0], bias)


def _network_check(m: NetworkMatch, gm: fx.GraphModule, ctx: PassContext) -> str | None:
    if any(len(n.users) != 1 for n in (m.einsum, m.unflatten)) or (m.bias is not None and len(m.flatten.users) != 1):
        return "intermediate_reused"
    if not all(isinstance(c, fx.Node) and c.op == "get_attr" for c in m.einsum.args[1][1:]):
        return "cores_not_constant"
    val = m.node.meta.get("val")
    if val is None:
        return "no_shape"
    return None


def _network_replacement(m: NetworkMatch, gm: fx.GraphModule, ctx: PassContext) -> fx.Node:
    x, _, in_dims = m.unflatten.args
    equation, operands = m.einsum.args
    with gm.graph.inserting_before(m.node):
        new = gm.graph.call_function(NETWORK, (x, list(operands[1:]), equation, list(in_dims), int(m.node.meta["val"].shape[-1]), m.bias))
    _annotate(new, m.node, "network")  # the annotations sit on the chain's last node (the bias add when there is one)
    return new


@dataclass(frozen=True)
class LayerMatch:
    node: fx.Node  # the layer's output, which carries the target's annotations
    layer: Layer
    x: fx.Node
    factors: tuple[fx.Node, ...]
    bias: fx.Node | None
    region: tuple[fx.Node, ...]  # every node factorize wrote for this target


def _layer(node: fx.Node) -> LayerMatch | None:
    info = meta.info(node)
    if info.target is None or info.plan is None or not _in_layer(node):
        return None
    fmt = FORMATS.get(info.plan.format)
    if fmt is None or fmt.layer is None:
        return None
    source = info.provenance.source
    region = tuple(n for n in node.graph.nodes if (p := meta.info(n).provenance) is not None and p.created_by == "factorize"
                   and p.source == source)
    roles = {meta.info(n).provenance.role: n for n in region}
    layer = LAYERS[fmt.layer]
    factors = tuple(roles.get(f"factor_{k}") for k in layer.factors)
    if any(f is None for f in factors):
        return None
    inside = set(region)
    external = {a for n in region for a in n.all_input_nodes if a not in inside}
    bias = next((a for a in external if a.op == "get_attr" and str(a.target) == info.target.bias), None) if info.target.bias else None
    xs = [a for a in external if a is not bias]
    return LayerMatch(node, layer, xs[0], factors, bias, region) if len(xs) == 1 else None


def _layer_check(m: LayerMatch, gm: fx.GraphModule, ctx: PassContext) -> str | None:
    from torch.fx.passes.utils.matcher_utils import SubgraphMatcher

    inside = set(m.region)
    if any(u not in inside for n in m.region if n is not m.node for u in n.users):
        return "intermediate_reused"
    if not all(f.op == "get_attr" for f in m.factors):
        return "factors_not_constant"
    pattern = m.layer.trace_nodes(m.x, list(m.factors), m.bias)
    if pattern is None:
        return "no_shape"
    inputs = call_inputs(m.x, m.factors, m.bias)
    matcher = SubgraphMatcher(pattern.graph, match_output=False, match_placeholder=False, remove_overlapping_matches=True)
    for found in matcher.match(gm.graph):
        if found.returning_nodes == [m.node] and found.placeholder_nodes == inputs:
            return None
    return "not_the_reference"  # someone changed the region since factorize wrote it


def _layer_replacement(m: LayerMatch, gm: fx.GraphModule, ctx: PassContext) -> fx.Node:
    with gm.graph.inserting_before(m.node):
        new = gm.graph.call_function(m.layer.op, (m.x, list(m.factors), m.bias))
    _annotate(new, m.node, m.layer.name)
    return new


RULES: list[RewriteRule] = [RewriteRule("fuse.layer", _layer, _layer_check, _layer_replacement),
                            RewriteRule("fuse.lowrank", _chain, _chain_check, _chain_replacement),
                            RewriteRule("fuse.network", _network, _network_check, _network_replacement)]
ACT_RULES: list[RewriteRule] = [RewriteRule("fuse.lowrank_act", _act, _act_check, _act_replacement)]


@declare(kind="rewrite", requires=("factorized",), produces=("fused",))
def fuse(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if not ctx.config.fuse:
        return PassResult(gm, False, {"skipped": "fuse=False"})
    chains = apply_rules(gm, ctx, RULES)
    acts = apply_rules(gm, ctx, ACT_RULES)
    if chains or acts:
        # the chains' intermediates, ops an activation was fused into and the rest of fused layers'
        # references are left without users
        for node in reversed(list(gm.graph.nodes)):
            if node.op == "call_function" and (node.target in _PURE or _in_layer(node)) and not node.users:
                gm.graph.erase_node(node)
        gm.recompile()
    return PassResult(gm, bool(chains or acts), {"fused": chains, "with_activation": acts})


def unfuse(gm: fx.GraphModule) -> fx.GraphModule:
    """Expand every tngraph::lowrank, tngraph::network and defined layer's node of `gm` (in place) back
    into aten ops: for targets without tngraph's ops (ONNX, other runtimes) and to check the fused graph against it."""
    expand_layers(gm)
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (LOWRANK, NETWORK):
            continue
        with graph.inserting_before(node):
            if node.target == LOWRANK:
                x, b, a, bias, act = node.args
                hidden = graph.call_function(aten.linear.default, (x, b))
                chain = [hidden, graph.call_function(aten.linear.default, (hidden, a, bias) if bias is not None else (hidden, a))]
                annotated = chain[-1]  # where factorize left the annotations
                if act != "none":
                    chain.append(graph.call_function({v: k for k, v in _ACTS.items()}[act], (chain[-1],)))
            else:
                x, cores, equation, in_dims, _, bias = node.args
                n_out = len(equation.split("->")[1].replace("...", ""))
                xs = graph.call_function(aten.unflatten.int, (x, -1, list(in_dims)))
                ys = graph.call_function(aten.einsum.default, (equation, [xs, *cores]))
                chain = [xs, ys, graph.call_function(aten.flatten.using_ints, (ys, -n_out, -1))]
                if bias is not None:
                    chain.append(graph.call_function(aten.add.Tensor, (chain[-1], bias)))
                annotated = chain[-1]
        for created in chain:
            created.meta.update({k: v for k, v in node.meta.items() if k not in ("val", meta.KEY)})
        annotated.meta[meta.KEY] = node.meta.get(meta.KEY)
        if "val" in node.meta:
            chain[-1].meta["val"] = node.meta["val"]
        node.replace_all_uses_with(chain[-1])
        graph.erase_node(node)
    gm.recompile()
    return gm
