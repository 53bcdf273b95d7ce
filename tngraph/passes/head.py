"""A language model's output head, reduced to the width of its input while the analysis passes run.

The calibrate, fisher and sensitivity passes run the captured graph on calibration batches many
times. For a causal LM the graph ends in the vocabulary head: logits = h W^T + b with W (V x d) and V
(32 k-152 k) far wider than d. Every such run computes, holds and compares tokens x V values, which
is most of the time and memory of the passes (issue 27), though nothing upstream of the head needs
them: the statistics are taken at the targets, and the sensitivity passes compare outputs through
their squared error only.

That error does not need the logits. With G = W^T W = R^T R (R is d x d):

    ||(h - h') W^T||^2 = (h - h') G (h - h')^T = ||(h - h') R^T||^2,

so a head with weight R gives the same squared differences, the same output energy (a bias b is
carried by c = R^-T W^T b and one constant column sqrt(||b||^2 - ||c||^2)), and random output
probes v ~ N(0, I) whose gradients at h have the same distribution (covariance G). `reduced_head`
swaps the weight in for the duration of a `with` block, only where that is exact:

- the head is a linear node with a constant weight, no target of this run and sharing its weight
  with none (the passes write the targets' weights);
- its output reaches the graph's output only through ops that act on each row alone and linearly:
  dtype casts, copies, slices and selects of leading dimensions, scaling by a constant;
- it is wider than its input (V > d + 1), or there is nothing to gain;
- the measuring passes' objective counts the outputs whole (a language model's), which is checked
  on the reduced graph once: a pooled sentence embedding of the head's output is not a squared
  difference of logits.

The graph leaves the block as it entered it.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .. import meta
from ..batches import split_batch
from ..calibration import GramStats
from .base import PassContext
from .targets import getattr_path, match_linear

log = logging.getLogger(__name__)
aten = torch.ops.aten

ATTR_PREFIX = "tngraph_reduced_head_"
GRAM_ROWS = 8192  # rows of W per chunk of its Gram (fp32 products summed in fp64)

# ops an output row passes through unchanged in shape and linearly
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.clone.default, aten.contiguous.default,
          aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default}
_LEADING = {aten.slice.Tensor, aten.select.int}  # on a dimension other than the last
_SCALES = {aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar}


@contextlib.contextmanager
def reduced_head(gm: fx.GraphModule, ctx: PassContext, *, objective: bool = True, held: bool = False) -> Iterator[bool]:
    """Within the block, gm's vocabulary heads give their d (+1) reduced outputs instead of logits
    (see the module's docstring); yields whether any head was reduced. `objective`: the block's
    runs compare outputs through ctx.objective (checked to count them whole); False when the
    outputs are not looked at (calibration statistics). `held`: heads that are targets are reduced
    too, the caller holding their weights at the values they have on entry (`head_targets`)."""
    heads = _heads(gm, ctx, held)
    if not heads:
        yield False
        return
    saved = [(node, node.target, node.args, dict(node.kwargs)) for node, _ in heads]
    added: list[fx.Node] = []
    for k, (node, match) in enumerate(heads):
        weight, bias = _reduced(gm, ctx, match)
        names = (f"{ATTR_PREFIX}{k}_weight", f"{ATTR_PREFIX}{k}_bias")
        gm.register_buffer(names[0], weight, persistent=False)
        gm.register_buffer(names[1], bias, persistent=False)
        with gm.graph.inserting_before(node):
            attrs = [gm.graph.get_attr(name) for name in names]
        added += attrs
        node.target, node.args, node.kwargs = aten.linear.default, (match.x, *attrs), {}
    gm.recompile()
    try:
        whole = not objective or _counts_whole(gm, ctx)
        if not whole:
            _restore(gm, saved, added)
            saved = []
        elif not ctx.analysis.get("head", {}).get("said"):
            ctx.analysis.setdefault("head", {})["said"] = True
            node, match = heads[0]
            log.info("analysis runs the output head %s at its input's width (%d outputs instead of %d), exact for the "
                     "squared output error%s", node.name, _inner(gm, match) + 1, _width(gm, match),
                     f" (and {len(heads) - 1} more)" if len(heads) > 1 else "")
        yield whole
    finally:
        if saved:
            _restore(gm, saved, added)


def _restore(gm: fx.GraphModule, saved: list, added: list[fx.Node]) -> None:
    for node, target, args, kwargs in saved:
        node.target, node.args, node.kwargs = target, args, kwargs
    for attr in added:
        if not attr.users:
            name = str(attr.target)
            gm.graph.erase_node(attr)
            if hasattr(gm, name):
                delattr(gm, name)
    added.clear()
    gm.recompile()


def head_targets(gm: fx.GraphModule, ctx: PassContext) -> set[str]:
    """The targets that are output heads reduce_head could stand for (their weights held fixed)."""
    return {meta.info(node).target.name for node, _ in _heads(gm, ctx, True) if meta.info(node).target is not None}


def _heads(gm: fx.GraphModule, ctx: PassContext, held: bool = False) -> list[tuple[fx.Node, Any]]:
    """The linear nodes that end the graph and may be reduced, with their matches; `held`: targets
    among them too (one read by no other target's node)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    uses: dict[str, int] = {}
    for n in meta.target_uses(gm):
        uses[meta.info(n).target.weight] = uses.get(meta.info(n).target.weight, 0) + 1
    written = {meta.info(n).target.weight for n in meta.targets(gm)}
    found, seen = [], set()
    for leaf in pytree.tree_leaves(output.args):
        node = leaf
        while isinstance(node, fx.Node) and _passes_rows(node) is not None:
            node = _passes_rows(node)
        if not isinstance(node, fx.Node) or node in seen:
            continue
        seen.add(node)
        match = match_linear(node)
        if match is None or match.conv is not None:
            continue
        t = meta.info(node).target
        if t is not None and not (held and not t.lookups and uses.get(t.weight) == 1 and t.kind == "linear"):
            continue
        mine = {t.weight} if t is not None else set()
        if str(match.weight.target) in written - mine or (match.bias is not None and str(match.bias.target) in written):
            continue
        if _width(gm, match) <= _inner(gm, match) + 1 or not _reaches_output_rowwise(node, output):
            continue
        found.append((node, match))
    return found


def _width(gm: fx.GraphModule, match: Any) -> int:
    return int(getattr_path(gm, str(match.weight.target)).shape[1 if match.transposed else 0])


def _inner(gm: fx.GraphModule, match: Any) -> int:
    return int(getattr_path(gm, str(match.weight.target)).shape[0 if match.transposed else 1])


def _passes_rows(node: fx.Node) -> fx.Node | None:
    """The tensor a row-wise linear op reads (what its output row is a fixed linear map of, row by
    row), or None when `node` is no such op."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    x = node.args[0]
    if node.target in _CASTS:
        return x
    if node.target in _LEADING:
        rank = len(x.meta["val"].shape) if "val" in x.meta else None
        dim = int(node.args[1]) if len(node.args) > 1 else 0
        return x if rank is not None and dim % rank != rank - 1 else None
    if node.target in _SCALES and len(node.args) == 2 and isinstance(node.args[1], (int, float)) and not isinstance(node.args[1], bool):
        return x
    return None


def _reaches_output_rowwise(head: fx.Node, output: fx.Node) -> bool:
    """Whether every use of the head's output, followed through row-wise linear ops, ends at the
    graph's output (a loss, a softcap or a shape taken of the logits would see the reduced ones)."""
    todo = [head]
    while todo:
        node = todo.pop()
        for user in node.users:
            if user is output or _checks_dtype_only(user):
                continue
            if _passes_rows(user) is not node:
                return False
            todo.append(user)
    return True


def _checks_dtype_only(node: fx.Node) -> bool:
    """An export-time check of a tensor's dtype, device or layout (not of its sizes or strides)."""
    if node.op != "call_function" or node.target != aten._assert_tensor_metadata.default:
        return False
    named = dict(zip(("a", "size", "stride"), node.args)) | dict(node.kwargs)
    return named.get("size") is None and named.get("stride") is None


def _reduced(gm: fx.GraphModule, ctx: PassContext, match: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(R', c'): the (d + 1) x d weight and d + 1 bias standing for the head (cached per weight)."""
    key = (str(match.weight.target), str(match.bias.target) if match.bias is not None else None)
    cache = ctx.analysis.setdefault("head", {})
    if key not in cache:
        w = getattr_path(gm, key[0])
        w = w.T if match.transposed else w  # (V x d)
        b = getattr_path(gm, key[1]) if key[1] is not None else None
        cache[key] = reduce_head(w, b)
    return cache[key]


@torch.no_grad()
def reduce_head(weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For a head y = x W^T + b (W: V x d), a (d + 1) x d weight R' and bias c' with
    ||x R'^T + c'||^2 = ||x W^T + b||^2 for every x, in the head's dtype."""
    d = weight.shape[1]
    stats = GramStats(d)  # W^T W as calibration sums X^T X: chunks in fp32 (fp64 weights in fp64), summed in fp64
    for start in range(0, weight.shape[0], GRAM_ROWS):
        stats.update(weight[start : start + GRAM_ROWS])
    s, u = torch.linalg.eigh(stats.gram)
    s = s.clamp_min(0)
    root = s.sqrt()
    reduced = torch.zeros(d + 1, d, dtype=torch.float64)
    reduced[:d] = root[:, None] * u.T  # G = R^T R
    out_bias = torch.zeros(d + 1, dtype=torch.float64)
    if bias is not None:
        b = bias.double()
        wtb = torch.zeros(d, dtype=torch.float64)
        for start in range(0, weight.shape[0], GRAM_ROWS):
            wtb += weight[start : start + GRAM_ROWS].double().T @ b[start : start + GRAM_ROWS]
        keep = s > s.max().clamp_min(1e-300) * 1e-12
        c = torch.where(keep, (u.T @ wtb) / torch.where(keep, root, torch.ones_like(root)), torch.zeros_like(root))
        out_bias[:d] = c
        out_bias[d] = (b.pow(2).sum() - c.pow(2).sum()).clamp_min(0).sqrt()
    return reduced.to(weight.dtype), out_bias.to(weight.dtype)


def _counts_whole(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Whether ctx.objective hands the outputs on as they are (every float output counts), on the
    reduced graph's output for the first calibration batch; remembered for this objective."""
    if ctx.objective is None:
        return True
    cache = ctx.analysis.setdefault("head", {})
    key = ("whole", id(ctx.objective))
    if key not in cache:
        if not ctx.calibration:
            return False
        # one row of the smallest batch: the check reads the output's structure, not its values
        args, kwargs = split_batch(min(ctx.calibration, key=_batch_size), 1)[0]
        with torch.no_grad():
            result = gm(*args, **kwargs)
            picked = ctx.objective(result, args, kwargs)
        ours = [id(x) for x in pytree.tree_leaves(result) if isinstance(x, torch.Tensor) and x.is_floating_point()]
        theirs = [id(x) for x in pytree.tree_leaves(picked) if isinstance(x, torch.Tensor) and x.is_floating_point()]
        cache[key] = ours == theirs
        if not cache[key]:
            log.info("analysis keeps the full output head: the objective does not count the outputs whole")
    return cache[key]


def _batch_size(batch: tuple[tuple, dict]) -> int:
    return sum(x.numel() for x in pytree.tree_leaves(batch) if isinstance(x, torch.Tensor))
