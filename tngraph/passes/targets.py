"""targets: mark linear-like nodes with a constant weight (aten.linear / addmm / mm / matmul, the weight
stored (out x in) and transposed, or stored (in x out) as GPT-2's Conv1D keeps it; aten.conv1d /
conv2d with groups 1, as the matrix their weight unfolds to), and with
Config(targets=("linear", "embedding")) embedding lookups (aten.embedding), as compression targets."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import meta
from ..errors import ModelError
from .base import PassContext, PassResult, declare

log = logging.getLogger(__name__)
aten = torch.ops.aten

TRANSPOSES = (aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default)  # numpy_T: `W.T`


@dataclass(frozen=True)
class LinearMatch:
    """A matched linear-like node: y = x @ W^T (+ b) with W = gm.<weight>."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node  # the get_attr node of W (out x in), or of W^T (in x out) when transposed
    bias: fx.Node | None
    transposed: bool = False
    conv: meta.Conv | None = None  # a convolution (its weight unfolds to out x in_channels*prod(kernel))


_CONVS = {aten.conv1d.default: 1, aten.conv2d.default: 2}


def conv_geometry(node: fx.Node) -> tuple[meta.Conv | None, str | None]:
    """(geometry, None) of a conv1d/conv2d node with a constant weight, or (None, why it is no
    target): grouped and depthwise convolutions are not (their weight is block diagonal already)."""
    dims = _CONVS[node.target]
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    values = {**dict(zip(names, node.args)), **node.kwargs}
    w = values.get("weight")
    if not _is_attr(w):
        return None, "weight_not_constant"
    if int(values.get("groups", 1)) != 1:
        return None, "grouped_conv"
    shape = w.meta["val"].shape if "val" in w.meta else getattr_path(w.graph.owning_module, str(w.target)).shape

    def sizes(key: str, default: int) -> tuple[int, ...]:
        value = values.get(key, default)
        value = [value] if isinstance(value, int) else list(value)
        return tuple(int(v) for v in (value * dims if len(value) == 1 else value))

    return meta.Conv(int(shape[1]), tuple(int(k) for k in shape[2:]), sizes("stride", 1), sizes("padding", 0), sizes("dilation", 1)), None


def match_linear(node: fx.Node) -> LinearMatch | None:
    """Pattern side of every linear rewrite: which nodes compute x @ W^T + b with a constant W
    (a convolution's unfolded weight too)."""
    if node.op != "call_function":
        return None
    if node.target in _CONVS:
        geometry, _ = conv_geometry(node)
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if geometry is not None and (b is None or _is_attr(b)):
            return LinearMatch(node, node.args[0], node.args[1], b, conv=geometry)
        return None
    if node.target == aten.linear.default:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if _is_attr(w) and (b is None or _is_attr(b)):
            return LinearMatch(node, x, w, b)
        return None
    if node.target in (aten.addmm.default, aten.mm.default, aten.matmul.default):  # matmul: x @ W.T (Falcon's own Linear)
        b, x, wt = (node.args[0], node.args[1], node.args[2]) if node.target == aten.addmm.default else (None, *node.args[:2])
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        if isinstance(wt, fx.Node) and wt.op == "call_function" and wt.target in TRANSPOSES and _is_transpose(wt):
            w = wt.args[0]
            if _is_attr(w) and (b is None or _is_attr(b)):
                return LinearMatch(node, x, w, b)
        elif _is_attr(wt) and (b is None or _is_attr(b)):  # x @ W with W stored (in x out): Conv1D
            return LinearMatch(node, x, wt, b, transposed=True)
    return None


def target_weight(gm: fx.GraphModule, t: "meta.TargetInfo") -> torch.Tensor:
    """A linear target's weight as (out x in), whichever way it is stored, a convolution's unfolded
    (a view: writing it writes the weight)."""
    weight = getattr_path(gm, t.weight)
    if t.conv is not None:
        return weight.view(weight.shape[0], -1)
    return weight.T if t.transposed else weight


@dataclass(frozen=True)
class EmbeddingMatch:
    """A matched lookup: y = W[indices] with W = gm.<weight> (rows x width)."""

    node: fx.Node
    weight: fx.Node
    indices: fx.Node


def match_embedding(node: fx.Node) -> EmbeddingMatch | None:
    if node.op == "call_function" and node.target == aten.embedding.default:
        w, idx = node.args[0], node.args[1]
        if _is_attr(w) and isinstance(idx, fx.Node):
            return EmbeddingMatch(node, w, idx)
    return None


def _is_attr(value: object) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr"


def _is_transpose(node: fx.Node) -> bool:
    if node.target == aten.permute.default:
        return list(node.args[1]) == [1, 0]
    if node.target == aten.transpose.int:
        return sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]
    return True


def is_selected(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    if include and not any(re.search(p, name) for p in include):
        return False
    return not any(re.search(p, name) for p in exclude)


@declare(kind="analysis", produces=("targets",))
def targets(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    cfg = ctx.config
    found = 0
    kinds = set(cfg.targets)
    shared = _shareable_weights(gm) if "linear" in kinds else {}
    tied = _tied_lookups(gm, cfg) if "linear" in kinds else {}
    for node in gm.graph.nodes:
        m = match_linear(node) if "linear" in kinds else None
        if m is None and node.op == "call_function" and node.target in _CONVS and "linear" in kinds:
            why = conv_geometry(node)[1] or "conv_bias_not_constant"
            ctx.counters[f"targets.skipped.{why}"] += 1
            log.info("targets: %s is no target (%s)", node.name, why.replace("_", " "))
        if m is None and "embedding" in kinds:
            m = match_embedding(node)
        if m is None:
            continue
        kind = "embedding" if isinstance(m, EmbeddingMatch) else "linear"
        transposed = kind == "linear" and m.transposed
        weight_name = str(m.weight.target)
        name = weight_name.rsplit(".", 1)[0] if "." in weight_name else weight_name
        lookups: tuple[str, ...] = ()
        if m.weight in tied:
            head = _tied_head(ctx, node, kind, tied[m.weight])
            if head is None:
                continue
            name, lookups = head[0] or name, head[1]
        if not is_selected(name, cfg.include, cfg.exclude):
            ctx.counters["targets.skipped.filtered"] += 1
            continue
        weight = gm.get_parameter(weight_name) if _has_param(gm, weight_name) else getattr_path(gm, weight_name)
        conv = m.conv if kind == "linear" else None
        if weight.dim() != (2 if conv is None else 2 + conv.dims) or not weight.is_floating_point():
            ctx.counters["targets.skipped.not_float_matrix"] += 1
            continue
        if kind == "embedding" and weight.shape[0] < weight.shape[1]:
            # a table with fewer rows than its width (token types, a few positions) has nothing to gain
            ctx.counters["targets.skipped.small_table"] += 1
            continue
        why = _use_refused(ctx, node, m, name, kind, shared, tied)
        if why is not None:
            ctx.counters[f"targets.skipped.{why}"] += 1
            continue
        if not torch.isfinite(weight).all():
            bad = int((~torch.isfinite(weight)).sum())
            raise ModelError(
                f"weight {weight_name!r} holds {bad} NaN/Inf values",
                "repair or reload the model's weights before compressing it",
            )
        if kind == "linear" and m.bias is not None and tuple(getattr_path(gm, str(m.bias.target)).shape) != (weight.shape[1 if transposed else 0],):
            ctx.counters["targets.skipped.bias_shape"] += 1  # an addmm whose "bias" broadcasts otherwise
            continue
        if conv is not None:
            out_features, in_features = int(weight.shape[0]), weight[0].numel()
        else:
            out_features, in_features = weight.shape[::-1] if transposed else weight.shape
        meta.update(
            node,
            target=meta.TargetInfo(
                name=name,
                weight=weight_name,
                bias=str(m.bias.target) if kind == "linear" and m.bias is not None else None,
                in_features=int(in_features),
                out_features=int(out_features),
                kind=kind,
                transposed=transposed,
                conv=conv,
                lookups=lookups,
            ),
        )
        found += 1
        ctx.counters[f"targets.{kind}"] += 1
        if m.weight in shared:
            ctx.counters["targets.shared_uses"] += 1
        if m.weight in tied:
            ctx.counters["targets.tied_lookups"] += len(tied[m.weight])
    ctx.counters["targets.found"] += found
    log.info("targets: %d nodes selected", found)
    return PassResult(gm, modified=found > 0, summary={"targets": found})


def _tied_lookups(gm: fx.GraphModule, cfg) -> dict[fx.Node, list[fx.Node]]:
    """Output heads tied to an embedding table (GPT-2's lm_head reads wte's weight): a weight read by
    exactly one linear node and by embedding lookups only, mapped to those lookups. The head is
    the target; its lookups gather rows of its low-rank factors, so only a plain low-rank plan keeps
    the tie (other formats, dense rows and mixtures leave such a head dense)."""
    if cfg.format != "lowrank" or cfg.dense_rows or cfg.mixture:
        return {}
    tied = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or len(node.users) < 2:
            continue
        lookups = [u for u in node.users if match_embedding(u) is not None and u.args[0] is node]
        heads = [u for u in node.users if u not in lookups]
        if lookups and len(heads) == 1 and (m := match_linear(heads[0])) is not None and m.weight is node and m.conv is None \
                and not m.transposed:
            tied[node] = lookups
    return tied


def _use_refused(ctx: PassContext, node: fx.Node, m, name: str, kind: str, shared: dict, tied: dict) -> str | None:
    """Why this use of its weight is no target (a counter's name), or None."""
    if len(m.weight.users) > 1 and m.weight not in shared and m.weight not in tied:
        # a weight read otherwise too (in arithmetic, or by a format that cannot keep a tie): factorizing
        # the linear use would untie it
        return "shared_weight"
    if ctx.module_targets_only and m.weight in shared and not all(_called_as_module(u, name, kind) for u in shared[m.weight]):
        # one Parameter tied into several modules: swapping the module that owns it would leave the
        # others reading the dense weight (the tie broken); torch.compile's graphs rewrite every use
        return "tied_across_modules"
    if ctx.module_targets_only and not _called_as_module(node, name, kind):
        # compress() swaps modules: a weight read by its parent's own code (nn.MultiheadAttention's
        # out_proj and in_proj_weight) would keep running dense, so it is no target there
        return "not_a_module_call"
    return None


def _tied_head(ctx: PassContext, node: fx.Node, kind: str, lookups: list[fx.Node]) -> tuple[str | None, tuple[str, ...]] | None:
    """(the head's module path, its tables' module paths) for a use of a tied weight; None (counted)
    when this use is no target: the table itself (the head is), or, under compress(), a tie whose
    modules the export does not name."""
    if kind == "embedding":  # the table's factors are its head's: the head is the target
        ctx.counters["targets.skipped.tied_to_a_head"] += 1
        return None
    # the Parameter may carry the table's name: the head's target is the module that runs it
    paths = [_module_path(u, ("Embedding",)) for u in lookups]
    head = _module_path(node, ("Linear",))
    if ctx.module_targets_only and (head is None or None in paths):
        ctx.counters["targets.skipped.tied_across_modules"] += 1
        return None
    return head, tuple(p for p in paths if p is not None)


def _innermost_module(node: fx.Node) -> tuple[str, str] | None:
    """(path, type name) of the innermost module running `node` (torch.export's module stack), or
    None when the graph has no stack or another path syntax."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, typ = list(stack.values())[-1]
    if not isinstance(path, str) or not _PLAIN_PATH.fullmatch(path):
        return None
    return path, typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))


def _module_path(node: fx.Node, types: tuple[str, ...]) -> str | None:
    """The module path that runs `node` when its type ends with one of `types`."""
    module = _innermost_module(node)
    return module[0] if module is not None and module[1].endswith(types) else None


def _shareable_weights(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """Weights read by several linear nodes alike (one module run several times, as ALBERT runs its
    one layer at every depth): each is one target whose factors every use reads, so the tie holds.
    A weight with any other reader (a tied embedding table, a weight used in arithmetic) is not.
    Returns each such weight's linear nodes."""
    uses: dict[fx.Node, list[LinearMatch]] = {}
    for node in gm.graph.nodes:
        m = match_linear(node)
        if m is not None:
            uses.setdefault(m.weight, []).append(m)
    shareable = {}
    for weight, matches in uses.items():
        if len(matches) < 2:
            continue
        nodes = {m.node for m in matches}
        readers = {u for u in weight.users if u not in nodes}
        # Falcon's x @ W.T reads W through a transpose: it is a reader only through the matched nodes
        if any(not (u.op == "call_function" and u.target in TRANSPOSES and set(u.users) <= nodes) for u in readers):
            continue
        if len({(m.transposed, m.conv, m.bias) for m in matches}) == 1:
            shareable[weight] = [m.node for m in matches]
    return shareable


_PLAIN_PATH = re.compile(r"[\w.]*")


def _called_as_module(node: fx.Node, name: str, kind: str) -> bool:
    """Whether the op runs inside the forward of the nn.Linear / nn.Embedding that owns the weight
    (torch.export's module stack; graphs without one, or with another path syntax, are trusted)."""
    module = _innermost_module(node)
    if module is None:
        return True
    wanted = ("Embedding",) if kind == "embedding" else ("Linear", "Conv1D", "Conv1d", "Conv2d")
    return module[0] == name and module[1].endswith(wanted)


def _has_param(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_parameter(name)
        return True
    except AttributeError:
        return False


def getattr_path(root: torch.nn.Module, path: str) -> torch.Tensor:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, torch.Tensor)
    return obj
