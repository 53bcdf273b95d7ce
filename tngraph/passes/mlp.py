"""MLP pairs: the targets whose output neurons flow, one by one, into one other target.

An MLP block is up -> elementwise -> down (BERT's intermediate -> GELU -> output, OPT's fc1 -> ReLU
-> fc2) or, gated, down(act(gate(x)) * up(x)) (Llama's gate_proj, up_proj -> down_proj). Hidden
neuron j is row j of every up projection, the j-th channel of every elementwise op between, and
column j of the down projection, and nothing else reads it: the block can drop neurons (rows of
the ups, columns of the down; tngraph.tn.prune chooses which and refits the down) and stay an MLP
of the same form. `mlp_pairs` finds such blocks in a graph the targets pass has marked, and names
why each other target that reads an elementwise region is no pair (a reshape between, a broadcast
operand such as a per-neuron scale, an intermediate value read elsewhere, a shared weight).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace

import torch
import torch.fx as fx

from .. import meta
from ..modules import PrunedLinear
from ..recipe import swap_module
from ..errors import ConfigError
from ..tn.prune import Sweep, refit_damping
from .targets import match_linear, target_weight

log = logging.getLogger(__name__)
aten = torch.ops.aten
_ELEMENTWISE_EXTRA = (aten._to_copy.default,)  # dtype casts: elementwise, not tagged pointwise


@dataclass(frozen=True)
class MLPPair:
    """One MLP block: the targets whose rows are its hidden neurons (`ups`: the up projection, and the
    gate when gated, in graph order), the target whose columns read them (`down`), the number of neurons and
    the elementwise ops between, in graph order."""

    ups: tuple[str, ...]
    down: str
    hidden: int
    ops: tuple[str, ...]

    @property
    def gated(self) -> bool:
        return len(self.ups) > 1


def _elementwise(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function":
        return False
    if target == aten.dropout.default:  # dropout outside training is the identity
        return len(node.args) > 2 and node.args[2] is False
    return target in _ELEMENTWISE_EXTRA or torch.Tag.pointwise in getattr(target, "tags", ())


def _reshaped(node: fx.Node) -> bool:
    """A view or reshape of an elementwise value (GPT-2's Conv1D flattens its input around addmm)."""
    return node.op == "call_function" and node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default) and \
        isinstance(node.args[0], fx.Node) and _elementwise(node.args[0])


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _plain_target(node: fx.Node) -> meta.TargetInfo | None:
    """The node's target when it is a plain linear one (not a convolution, not an embedding)."""
    t = meta.info(node).target
    if t is None or t.kind != "linear" or t.conv is not None or match_linear(node) is None:
        return None
    return t


def _region(down: fx.Node, hidden_shape: tuple[int, ...]) -> tuple[list[fx.Node], list[fx.Node], str | None]:
    """(up nodes, elementwise nodes) between the down node's input and the targets feeding it, and
    the first reason they are no pair (None: they are one)."""
    ups: list[fx.Node] = []
    region: list[fx.Node] = []
    seen: set[fx.Node] = set()
    why = None
    frontier = [match_linear(down).x]
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if meta.info(node).target is not None:
            ups.append(node)
            if _plain_target(node) is None:
                why = why or "up_not_plain"
            elif _shape(node) != hidden_shape:
                why = why or "up_shape"
            continue
        if not _elementwise(node):
            why = why or "not_elementwise"
            continue
        region.append(node)
        for arg in node.all_input_nodes:
            shape = _shape(arg)
            if shape == hidden_shape:
                frontier.append(arg)
            elif shape is None or len(shape) > 0:  # a 0-d value broadcasts the same to every neuron
                why = why or "broadcast_operand"
    return ups, region, why if ups else why or "no_up"


def mlp_pairs(gm: fx.GraphModule) -> tuple[list[MLPPair], Counter]:
    """The MLP blocks of a graph marked by the targets pass, in graph order, and per reason the
    number of targets reading an elementwise region that are no pair."""
    uses = Counter(meta.info(n).target.name for n in meta.target_uses(gm))
    pairs: list[MLPPair] = []
    refused: Counter = Counter()
    claimed: set[str] = set()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for down in meta.targets(gm):
        t = _plain_target(down)
        x = match_linear(down).x if t is not None else None
        if x is not None and _reshaped(x):
            refused["reshape"] += 1  # rows flattened around the projection: not supported yet
            continue
        if x is None or not _elementwise(x):
            continue  # reads no elementwise region: not an MLP's down projection
        ups, region, why = _region(down, _shape(x) or ())
        if not ups:
            continue  # an elementwise region no target feeds (a normalization's output): not an MLP
        if why is None and any(uses[n] > 1 for n in [t.name, *(meta.info(u).target.name for u in ups)]):
            why = "shared_weight"
        inside = set(region) | set(ups)
        if why is None and any(user not in inside and user is not down for node in inside for user in node.users):
            why = "read_elsewhere"
        names = tuple(meta.info(u).target.name for u in ups)
        if why is None and claimed & {t.name, *names}:
            why = "overlaps"
        if why is not None:
            refused[why] += 1
            continue
        claimed |= {t.name, *names}
        ups.sort(key=order.__getitem__)
        pairs.append(MLPPair(tuple(meta.info(u).target.name for u in ups), t.name,
                             t.in_features, tuple(str(n.target).split(".")[-2] for n in sorted(region, key=order.__getitem__))))
    return pairs, refused


def prune_pair_modules(model: torch.nn.Module, pair: MLPPair, keep: torch.Tensor, down_weight: torch.Tensor | None = None) -> None:
    """Make `pair`'s block in `model` keep the hidden neurons `keep` (in place): each up projection
    keeps those rows (and bias entries), the down projection those columns, or `down_weight`
    (out x len(keep): a refitted one, tngraph.tn.prune) instead, each a tngraph.modules.PrunedLinear
    as the pipeline's pruned blocks are. Its modules must be nn.Linear."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    if keep.dim() != 1 or len(keep) == 0 or int(keep.min()) < 0 or int(keep.max()) >= pair.hidden or len(set(keep.tolist())) != len(keep):
        raise ValueError(f"neurons to keep must be distinct indices in [0, {pair.hidden}), got {keep.tolist()[:8]}...")
    layers = {name: model.get_submodule(name) for name in (*pair.ups, pair.down)}
    wrong = [name for name, layer in layers.items() if type(layer) is not torch.nn.Linear]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not nn.Linear: only plain linear blocks are pruned here")
    down = layers[pair.down]
    if down_weight is not None and tuple(down_weight.shape) != (down.out_features, len(keep)):
        raise ValueError(f"the down weight must be {down.out_features}x{len(keep)}, got {tuple(down_weight.shape)}")
    for name in pair.ups:
        up = layers[name]
        swap_module(model, name, PrunedLinear(up.weight.detach()[keep], up.bias.detach()[keep] if up.bias is not None else None, keep, "rows"))
    weight = down.weight.detach()[:, keep] if down_weight is None else down_weight.to(down.weight.dtype)
    swap_module(model, pair.down, PrunedLinear(weight, down.bias.detach() if down.bias is not None else None, keep, "columns"))


def block_params(members: list[meta.TargetInfo], count: int) -> list[int]:
    """Each member's parameters when its block keeps `count` neurons: the ups' rows and their bias
    entries, the down projection's columns and its whole bias (`members`: the ups, then the down)."""
    *ups, down = members
    return [count * (t.in_features + (1 if t.bias else 0)) for t in ups] + [down.out_features * (count + (1 if down.bias else 0))]


def marked_pairs(gm: fx.GraphModule, ctx) -> dict[str, MLPPair]:
    """The MLP blocks pruned in this run (Config.mlp == "prune"), by down name; found once, on the
    first call, into ctx.analysis["mlp_pairs"] (with counters mlp.blocks and mlp.refused.<why>);
    empty for the other MLP modes."""
    if ctx.config.mlp != "prune":
        return {}
    if "mlp_pairs" not in ctx.analysis:
        pairs, refused = mlp_pairs(gm)
        ctx.analysis["mlp_pairs"] = {p.down: p for p in pairs}
        ctx.counters["mlp.blocks"] += len(pairs)
        for why, count in refused.items():
            ctx.counters[f"mlp.refused.{why}"] += count
        log.info("mlp: %d blocks pruned by neurons%s", len(pairs),
                 "".join(f"; {n} refused ({why.replace('_', ' ')})" for why, n in sorted(refused.items())))
    return ctx.analysis["mlp_pairs"]


def pair_members(gm: fx.GraphModule, ctx) -> dict[str, MLPPair]:
    """Every target of a pruned block (ups and down) -> its block."""
    return {name: pair for pair in marked_pairs(gm, ctx).values() for name in (*pair.ups, pair.down)}


def block_statistics(gm: fx.GraphModule, ctx, pair: MLPPair) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """(down weight, its input Gram C, its damped output-gradient Gram G or None, the refit's damping
    for C's row count: tngraph.tn.prune.refit_damping) of a pruned block: what tngraph.tn.prune
    chooses neurons on. G is damped as output whitening damps it, and used only when output
    whitening is on."""
    require_calibration(ctx, [pair.down])
    down = next(n for n in meta.targets(gm) if meta.info(n).target.name == pair.down)
    t = meta.info(down).target
    stats, grads = ctx.stats[t.name], ctx.grad_stats.get(t.name)
    gram = stats.gram if stats.gram is not None else stats.whitening.s @ stats.whitening.s.T  # a lean run kept the Cholesky factor
    out_gram = None
    if ctx.config.output_whiten and grads is not None and grads.rows > 0:
        out_gram = grads.gram
        floor = float(out_gram.diagonal().mean().clamp_min(1e-300))
        out_gram = out_gram + grads.damping(ctx.config.output_damping) * floor * torch.eye(out_gram.shape[0], dtype=out_gram.dtype)
    return target_weight(gm, t), gram, out_gram, refit_damping(stats.rows, gram.shape[0])


def record_sweep(ctx, down: str, sweep: Sweep) -> None:
    """Keep a block's sweep (its neurons' removal order, not its refits) for factorize, with the
    statistics it swept (swept_neurons)."""
    ctx.analysis.setdefault("block_sweeps", {})[down] = ((ctx.stats[down], ctx.grad_stats.get(down)), replace(sweep, selections=[]))


def swept_neurons(ctx, down: str, count: int) -> torch.Tensor | None:
    """The neurons the allocation's sweep of this block kept at `count` (record_sweep), or None when
    it did not stop there or swept other statistics than the block's current ones."""
    found = ctx.analysis.get("block_sweeps", {}).get(down)
    if found is None or count not in found[1].counts:
        return None
    same = all(a is b for a, b in zip(found[0], (ctx.stats[down], ctx.grad_stats.get(down))))
    return found[1].kept(count) if same else None


def require_calibration(ctx, downs) -> None:
    """Refuse, by name, pruned blocks whose down projection saw no calibration rows."""
    missing = [down for down in downs if getattr(ctx.stats.get(down), "rows", 0) <= 0]
    if missing:
        raise ConfigError(f"mlp='prune' chooses neurons on calibration data, and {missing[0]} saw none",
                          "pass calibration data (texts, inputs or --calibration FILE), or mlp='lowrank'")
