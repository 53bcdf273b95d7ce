"""A factorized layer kind, defined once by its reference forward.

`define(name, reference, factors, weight=None)` turns one plain torch function
`reference(x, factors, bias) -> y` (x: (..., in), factors: the layer's tensors in `factors` order,
bias: (out,) or None) into everything tngraph needs of the layer:

- the custom op tngraph::<name>(x, factors, bias): one opaque node for dynamo, torch.export and
  Inductor; its eager and fake (meta) implementations are the reference itself;
- the graph the factorize pass writes (`inline`: the reference traced by make_fx at the target's
  FakeTensor values, in the graph's own fake mode), the pattern the fuse pass matches (the same
  trace, matched with torch.fx's SubgraphMatcher) and the expansion unfuse writes back (`expand`);
- the nn.Module that takes the target's place (`LayerLinear`, whose forward is the reference);
- the ONNX graph: torch.onnx exports the module's reference (and `expand` turns a graph's op nodes
  back into it first), so no hand-written translation is needed;
- the dense weight the guard compares (`weight`, by default the reference on the identity).

The tensor-network formats share one older layer (tngraph::network, modules.NetworkLinear) and the
low-rank format its own (tngraph::lowrank, modules.LowRankLinear), each with hand-written fuse rules
and ONNX translations (TensorRT's Einsum takes no ellipsis, ONNX's no bfloat16).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch import nn

Reference = Callable[[torch.Tensor, list, Optional[torch.Tensor]], torch.Tensor]
PROBE_ROWS = 1024  # identity rows per reference call when a layer's dense weight is probed


@dataclass(frozen=True)
class Layer:
    """One layer kind: its name (the op is tngraph::<name>), its reference, the keys of its factors
    (the recipe's and the module's parameter names, in call order) and its dense weight."""

    name: str
    reference: Reference
    factors: tuple[str, ...]
    op: object
    weight_fn: Callable[[list], torch.Tensor] | None = None
    summary: str = ""

    def weight(self, factors: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
        """The (out x in) matrix the factors stand for: what the guard and the tests compare."""
        tensors = [factors[k] for k in self.factors]
        if self.weight_fn is not None:
            return self.weight_fn(tensors)
        eye = torch.eye(in_features, dtype=tensors[0].dtype, device=tensors[0].device)
        return torch.cat([self.reference(eye[i : i + PROBE_ROWS], tensors, None) for i in range(0, in_features, PROBE_ROWS)]).T

    def trace(self, x: torch.Tensor, factors: list[torch.Tensor], bias: torch.Tensor | None) -> fx.GraphModule:
        """The reference as an aten graph (make_fx, pre-dispatch: the IR torch.export captures) at these
        values, FakeTensors of one fake mode; its placeholders are x, the factors, then the bias."""
        from torch._guards import detect_fake_mode
        from torch.fx.experimental.proxy_tensor import make_fx

        n = len(factors)

        def call(x, *rest):
            return self.reference(x, list(rest[:n]), rest[n] if len(rest) > n else None)

        args = call_inputs(x, factors, bias)
        mode = detect_fake_mode(args)
        with mode if mode is not None else contextlib.nullcontext():
            return make_fx(call, pre_dispatch=True)(*args)

    def trace_nodes(self, x: fx.Node, factors: list[fx.Node], bias: fx.Node | None) -> fx.GraphModule | None:
        """`trace` at the FakeTensor values these graph nodes carry (None when one carries none)."""
        vals = [n.meta.get("val") for n in call_inputs(x, factors, bias)]
        if any(v is None for v in vals):
            return None
        return self.trace(vals[0], vals[1 : 1 + len(factors)], vals[-1] if bias is not None else None)


def call_inputs(x, factors, bias) -> list:
    """The reference's inputs in the order of its trace's placeholders: x, the factors, the bias if any."""
    return [x, *factors, *([bias] if bias is not None else [])]


def define(name: str, reference: Reference, factors: tuple[str, ...], *, weight: Callable[[list], torch.Tensor] | None = None,
           summary: str = "") -> Layer:
    """The layer `name` from its reference (see the module's docstring); registers tngraph::<name>."""

    def implementation(x: torch.Tensor, factors: list[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
        return reference(x, list(factors), bias)

    implementation.__name__ = name
    # the op's signature is read from these annotations; the module has no `from __future__ import
    # annotations` for them, so they are types, not strings
    implementation.__annotations__ = {"x": torch.Tensor, "factors": list[torch.Tensor], "bias": Optional[torch.Tensor],
                                      "return": torch.Tensor}
    op = torch.library.custom_op(f"tngraph::{name}", implementation, mutates_args=())
    op.register_fake(implementation)  # the reference on FakeTensors: the output's shape and dtype
    return Layer(name, reference, tuple(factors), getattr(torch.ops.tngraph, name).default, weight, summary)


def inline(graph: fx.Graph, traced: fx.GraphModule, inputs: list[fx.Node]) -> list[fx.Node]:
    """Copy `traced`'s nodes into `graph` at its insertion point, its placeholders bound to `inputs`;
    the copied nodes, the last one the layer's output (FakeTensor values kept)."""
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise ValueError(f"the trace takes {len(placeholders)} inputs, {len(inputs)} given")
    env.update(zip(placeholders, inputs))
    created: list[fx.Node] = []
    output = None
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            output = fx.node.map_arg(node.args[0], lambda n: env[n])
            continue
        new = graph.node_copy(node, lambda n: env[n])
        new.meta = {k: v for k, v in node.meta.items() if k == "val"}
        env[node] = new
        created.append(new)
    if isinstance(output, (list, tuple)):
        output = output[0]
    if created and created[-1] is not output:  # the output last, for the callers' convenience
        created.remove(output)
        created.append(output)
    return created


class LayerLinear(nn.Module):
    """The nn.Module of a defined layer standing in for an nn.Linear: its factors are parameters
    named by the layer's keys; forward is the reference (eager, training, torch.compile and export)."""

    def __init__(self, layer: Layer, factors: dict[str, torch.Tensor], in_features: int, out_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        missing = [k for k in layer.factors if k not in factors]
        if missing:
            raise ValueError(f"the {layer.name} layer needs factors {list(layer.factors)}; {missing} missing")
        self.layer_name = layer.name
        for key in layer.factors:
            self.register_parameter(key, nn.Parameter(factors[key]))
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.in_features, self.out_features = in_features, out_features
        self.layer = layer

    def factors(self) -> list[torch.Tensor]:
        return [getattr(self, k) for k in self.layer.factors]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.reference(x, self.factors(), self.bias)

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{k} {'x'.join(map(str, getattr(self, k).shape))}" for k in self.layer.factors)
        return f"{self.layer_name}: in_features={self.in_features}, out_features={self.out_features}, {shapes}, bias={self.bias is not None}"


def expand(gm: fx.GraphModule, ops: dict) -> int:
    """Every node of `gm` calling one of `ops` (op -> Layer) replaced, in place, by its layer's traced
    reference (unfuse; ONNX and runtimes without tngraph's ops); the number expanded. The last node
    of each expansion takes the op node's metadata."""
    graph, done = gm.graph, 0
    for node in list(graph.nodes):
        layer = ops.get(node.target) if node.op == "call_function" else None
        if layer is None:
            continue
        x, factors, bias = node.args
        traced = layer.trace_nodes(x, factors, bias)
        if traced is None:
            raise ValueError(f"{node.name}: the {layer.name} layer's inputs carry no values to trace its reference at")
        with graph.inserting_before(node):
            created = inline(graph, traced, call_inputs(x, factors, bias))
        for new in created:
            new.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "tngraph")})
        created[-1].meta.update(node.meta)
        node.replace_all_uses_with(created[-1])
        graph.erase_node(node)
        done += 1
    if done:
        gm.recompile()
    return done
