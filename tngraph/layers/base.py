"""A factorized layer kind, defined once by its reference forward.

`define(name, reference, factors, ...)` turns one plain torch function
`reference(x, factors, bias, **statics) -> y` (x: (..., in), factors: the layer's tensors in key
order, bias: (out,) or None, statics: the layer's non-tensor arguments, e.g. an activation or an
einsum equation) into everything tngraph needs of the layer:

- the custom op tngraph::<name>(x, factors, bias, *statics): one opaque node for dynamo,
  torch.export and Inductor; its eager (CPU) and fake (meta) implementations are the reference,
  its backward the reference's own, recomputed from the saved inputs (nothing in between is kept);
  `cuda` adds a GPU implementation (tngraph.ops: Triton kernels chosen per shape);
- the graph the factorize pass writes (`inline`: the reference traced by make_fx at the target's
  FakeTensor values, in the graph's own fake mode), the pattern the fuse pass matches (the same
  trace, matched with torch.fx's SubgraphMatcher) and the expansion unfuse writes back (`expand`);
- the nn.Module that takes the target's place (`LayerLinear`, whose forward is the reference, or
  the op where it has a kernel or an ONNX translation);
- the ONNX graph: torch.onnx exports the reference (and `expand` turns a graph's op nodes back into
  it first); a layer whose reference ONNX or TensorRT cannot take as it is (the network layer's
  ellipsis einsum) names an onnxscript translation of its op instead (`onnx`);
- the dense weight the guard compares (`weight`, by default the reference on the identity).
"""
from __future__ import annotations

import contextlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch import nn

Reference = Callable[..., torch.Tensor]  # (x, factors, bias, **statics) -> y
PROBE_ROWS = 1024  # identity rows per reference call when a layer's dense weight is probed
CORE_KEY = re.compile(r"core(\d+)$")


@dataclass(frozen=True)
class Layer:
    """One layer kind: its name (the op is tngraph::<name>), its reference, the keys of its factors
    (the recipe's and the module's parameter names, in call order; empty: any number of cores,
    core0, core1, ...), its static arguments and their defaults, and how a plan sets them."""

    name: str
    reference: Reference
    factors: tuple[str, ...]
    op: object
    statics: dict[str, Any] = field(default_factory=dict)  # name -> default (None: no default)
    statics_of: Callable[[Any], dict] | None = None  # TargetPlan -> the statics it implies
    weight_fn: Callable[..., torch.Tensor] | None = None
    onnx: Callable[..., Any] | None = None  # an onnxscript translation of the op (None: export the reference)
    cuda: bool = False  # the op has a GPU implementation of its own
    epilogue: str | None = None  # the static an activation that follows the layer is folded into
    summary: str = ""

    def keys(self, factors) -> list[str]:
        """The factor keys in call order for these factors (a dict or the keys themselves)."""
        if self.factors:
            return list(self.factors)
        cores = sorted((int(m.group(1)), k) for k in factors if (m := CORE_KEY.match(k)))
        return [k for _, k in cores]

    def plan_statics(self, plan) -> dict[str, Any]:
        """The statics of a target's layer from its plan (a TargetPlan); the defaults where it sets none."""
        return {**self.statics, **(self.statics_of(plan) if self.statics_of is not None else {})}

    def __call__(self, x: torch.Tensor, factors: list[torch.Tensor], bias: torch.Tensor | None, statics: dict | None = None) -> torch.Tensor:
        return self.reference(x, list(factors), bias, **{**self.statics, **(statics or {})})

    def call_op(self, x: torch.Tensor, factors: list[torch.Tensor], bias: torch.Tensor | None, statics: dict | None = None) -> torch.Tensor:
        """The op tngraph::<name> on these inputs (its statics positional, in declared order)."""
        values = {**self.statics, **(statics or {})}
        return self.op(x, list(factors), bias, *(values[k] for k in self.statics))

    def op_statics(self, node: fx.Node) -> dict[str, Any]:
        """The statics of an op node of this layer, by name."""
        return dict(zip(self.statics, node.args[3:]))

    def weight(self, factors: dict[str, torch.Tensor], in_features: int, statics: dict | None = None) -> torch.Tensor:
        """The (out x in) matrix the factors stand for: what the guard and the tests compare."""
        tensors = [factors[k] for k in self.keys(factors)]
        values = {**self.statics, **(statics or {})}
        if self.weight_fn is not None:
            return self.weight_fn(tensors, **values)
        eye = torch.eye(in_features, dtype=tensors[0].dtype, device=tensors[0].device)
        return torch.cat([self(eye[i : i + PROBE_ROWS], tensors, None, values) for i in range(0, in_features, PROBE_ROWS)]).T

    def trace(self, x: torch.Tensor, factors: list[torch.Tensor], bias: torch.Tensor | None, statics: dict | None = None) -> fx.GraphModule:
        """The reference as an aten graph (make_fx, pre-dispatch: the IR torch.export captures) at these
        values, FakeTensors of one fake mode or real tensors; its placeholders are x, the factors, then the bias."""
        from torch._guards import detect_fake_mode
        from torch.fx.experimental.proxy_tensor import make_fx

        n = len(factors)

        def call(x, *rest):
            return self(x, list(rest[:n]), rest[n] if len(rest) > n else None, statics)

        args = call_inputs(x, factors, bias)
        mode = detect_fake_mode(args)
        with mode if mode is not None else contextlib.nullcontext():
            return make_fx(call, pre_dispatch=True)(*args)

    def trace_nodes(self, x: fx.Node, factors: list[fx.Node], bias: fx.Node | None, statics: dict | None = None) -> fx.GraphModule | None:
        """`trace` at the FakeTensor values these graph nodes carry (None when one carries none)."""
        vals = [n.meta.get("val") for n in call_inputs(x, factors, bias)]
        if any(v is None for v in vals):
            return None
        return self.trace(vals[0], vals[1 : 1 + len(factors)], vals[-1] if bias is not None else None, statics)


def call_inputs(x, factors, bias) -> list:
    """The reference's inputs in the order of its trace's placeholders: x, the factors, the bias if any."""
    return [x, *factors, *([bias] if bias is not None else [])]


STATIC_TYPES = (str, int, float, bool, list[int])


def define(name: str, reference: Reference, factors: tuple[str, ...] = (), *, statics: dict[str, tuple[type, Any]] | None = None,
           statics_of: Callable[[Any], dict] | None = None, weight: Callable[..., torch.Tensor] | None = None,
           cuda: Callable[..., torch.Tensor] | None = None, fake: Callable[..., torch.Tensor] | None = None,
           onnx: Callable[..., Any] | None = None, epilogue: str | None = None, summary: str = "") -> Layer:
    """The layer `name` from its reference (see the module's docstring); registers tngraph::<name>.

    statics: name -> (type, default) of the reference's keyword arguments, in the op's order;
    statics_of(plan) -> the statics a target's plan sets; cuda(x, factors, bias, **statics): the
    op's GPU implementation; fake (same arguments): its output from shapes alone, where running
    the reference on FakeTensors costs more; onnx: an onnxscript translation of the op
    (x, factors, bias, *statics)."""
    declared = dict(statics or {})
    for key, (kind, _) in declared.items():
        if kind not in STATIC_TYPES:
            raise TypeError(f"layer {name}: static {key!r} is a {kind}; an op takes {', '.join(map(str, STATIC_TYPES))}")
    if epilogue is not None and epilogue not in declared:
        raise ValueError(f"layer {name}: the epilogue {epilogue!r} is not one of its statics {list(declared)}")

    def implementation(x, factors, bias, *values):
        return reference(x, list(factors), bias, **dict(zip(declared, values)))

    implementation.__name__ = name
    # the op's schema is read from this signature: types, not strings
    params = [inspect.Parameter("x", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=torch.Tensor),
              inspect.Parameter("factors", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=list[torch.Tensor]),
              inspect.Parameter("bias", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[torch.Tensor])]
    params += [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind) for k, (kind, _) in declared.items()]
    implementation.__signature__ = inspect.Signature(params, return_annotation=torch.Tensor)
    op = torch.library.custom_op(f"tngraph::{name}", implementation, mutates_args=())
    # the fake (meta) implementation: the reference on FakeTensors, or the layer's own shape function
    op.register_fake(implementation if fake is None else _bound(fake, declared))
    _register_backward(op, reference, tuple(declared))
    if cuda is not None:
        op.register_kernel("cuda")(_bound(cuda, declared))
    return Layer(name, reference, tuple(factors), getattr(torch.ops.tngraph, name).default,
                 {k: default for k, (_, default) in declared.items()}, statics_of, weight, onnx, cuda is not None, epilogue, summary)


def _bound(fn: Callable[..., torch.Tensor], declared: dict) -> Callable[..., torch.Tensor]:
    """fn(x, factors, bias, **statics) called as the op is: its statics positional."""
    return lambda x, factors, bias, *values: fn(x, list(factors), bias, **dict(zip(declared, values)))


def _register_backward(op, reference: Reference, statics: tuple[str, ...]) -> None:
    """The op's gradients: the reference run again on the saved inputs under autograd (its
    intermediates are recomputed, not kept between forward and backward)."""

    def setup(ctx, inputs, output):
        x, factors, bias, *values = inputs
        ctx.count, ctx.has_bias, ctx.values = len(factors), bias is not None, dict(zip(statics, values))
        ctx.save_for_backward(x, *factors, *([bias] if bias is not None else []))

    def backward(ctx, grad):
        saved = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(t.is_floating_point()) for t in saved]
            x, factors = inputs[0], inputs[1 : 1 + ctx.count]
            bias = inputs[-1] if ctx.has_bias else None
            y = reference(x, factors, bias, **ctx.values)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(y, wanted, grad, allow_unused=True))
        out = [next(grads) if t.requires_grad else None for t in inputs]
        return (out[0], out[1 : 1 + ctx.count], out[-1] if ctx.has_bias else None, *([None] * len(statics)))

    op.register_autograd(backward, setup_context=setup)


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
    named by the layer's keys, its statics plain attributes. Forward is the reference (eager,
    training, torch.compile, export), except for GPU inference where the layer has kernels of its
    own and for export where it has an ONNX translation: there the op."""

    def __init__(self, layer: Layer, factors: dict[str, torch.Tensor], in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, statics: dict[str, Any] | None = None):
        super().__init__()
        keys = layer.keys(factors)
        missing = [k for k in layer.factors if k not in factors]
        if missing or not keys:
            raise ValueError(f"the {layer.name} layer needs factors {list(layer.factors) or ['core0', '...']}; {missing or 'none'} given")
        unknown = sorted(set(statics or {}) - set(layer.statics))
        if unknown:
            raise ValueError(f"the {layer.name} layer takes statics {list(layer.statics)}, not {unknown}")
        self.layer_name = layer.name
        self.factor_keys = tuple(keys)
        for key in keys:  # integer factors (quantized codes, zero points) are buffers: nothing trains them
            if factors[key].is_floating_point():
                self.register_parameter(key, nn.Parameter(factors[key]))
            else:
                self.register_buffer(key, factors[key])
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.in_features, self.out_features = in_features, out_features
        self.layer = layer
        self.statics = {**layer.statics, **(statics or {})}

    def factors(self) -> list[torch.Tensor]:
        return [getattr(self, k) for k in self.factor_keys]

    def factor_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.factor_keys}

    @property
    def weight(self) -> torch.Tensor:
        """The (out x in) matrix the factors stand for, made on each read: for model code that reads
        the Linear it replaced (T5 checks `wo.weight.dtype` in its forward). Not a parameter."""
        return self.layer.weight(self.factor_dict(), self.in_features, self.statics)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if (layer.cuda and x.is_cuda and not torch.is_grad_enabled()) or (layer.onnx is not None and torch.compiler.is_exporting()):
            return layer.call_op(x, self.factors(), self.bias, self.statics)
        return layer(x, self.factors(), self.bias, self.statics)

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{k} {'x'.join(map(str, getattr(self, k).shape))}" for k in self.factor_keys)
        return f"{self.layer_name}: in_features={self.in_features}, out_features={self.out_features}, {shapes}, bias={self.bias is not None}"


def expand(gm: fx.GraphModule, ops: dict, *, keep=()) -> int:
    """Every node of `gm` calling one of `ops` (op -> Layer) replaced, in place, by its layer's traced
    reference (unfuse; ONNX and runtimes without tngraph's ops); layers named in `keep` are left. The
    number expanded. The last node of each expansion takes the op node's metadata."""
    graph, done = gm.graph, 0
    for node in list(graph.nodes):
        layer = ops.get(node.target) if node.op == "call_function" else None
        if layer is None or layer.name in keep:
            continue
        x, factors, bias = node.args[:3]
        traced = layer.trace_nodes(x, factors, bias, layer.op_statics(node))
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
