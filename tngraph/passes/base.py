"""Core types of the pass pipeline: PassContext, PassResult, the Pass signature and its contract.

A pass is a function (gm, ctx) -> PassResult declared with @declare: its kind (analysis passes leave
the graph's computation as it was, rewrite passes change it), what it requires (products of passes
before it, checked by the pass manager before it runs) and what it produces. Products name what a
pass leaves for others: in node.meta["tngraph"] (targets, plan) or in the context's typed fields
(calibration -> ctx.stats, gradients -> ctx.grad_stats, sensitivity -> ctx.curves). A pass keeps no
state between calls: everything it learns goes to the graph or the context.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.fx as fx

from ..calibration import GradStats, GramStats, OutputStats
from ..config import Config
from ..plan import TargetPlan


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool
    summary: dict[str, Any] = field(default_factory=dict)


class Pass(Protocol):
    __name__: str
    kind: str  # "analysis" or "rewrite"
    requires: frozenset[str]
    produces: frozenset[str]

    def __call__(self, gm: fx.GraphModule, ctx: "PassContext") -> PassResult: ...


PRODUCTS = frozenset({"targets", "calibration", "gradients", "sensitivity", "plan", "factorized", "fused"})


def declare(*, kind: str, requires: tuple[str, ...] = (), produces: tuple[str, ...] = ()) -> Callable[[Callable], Pass]:
    """Declare a pass's contract on its function (see the module docstring)."""
    unknown = (set(requires) | set(produces)) - PRODUCTS
    if kind not in ("analysis", "rewrite") or unknown:
        raise ValueError(f"bad pass declaration: kind {kind!r}, unknown products {sorted(unknown)}")

    def mark(fn: Callable) -> Pass:
        fn.kind, fn.requires, fn.produces = kind, frozenset(requires), frozenset(produces)
        return fn

    return mark


@dataclass
class PassContext:
    """Everything a pass may read or add to besides the graph itself."""

    config: Config
    # calibration batches, each (args, kwargs) accepted by the captured module
    calibration: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stats: dict[str, GramStats] = field(default_factory=dict)
    output_stats: dict[str, OutputStats] = field(default_factory=dict)  # output channel norms (calibrate)
    grad_stats: dict[str, GradStats] = field(default_factory=dict)  # output gradients (fisher pass)
    plan: dict[str, TargetPlan] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict)  # sensitivity.Curve per target name
    # other analysis products by kind, then target name (e.g. "measured_points", "patch_sensitivity")
    analysis: dict[str, dict[str, Any]] = field(default_factory=dict)
    # (outputs, args, kwargs) -> the tensor whose error measures the model's (default: every float output)
    objective: Callable[..., torch.Tensor] | None = None
    counters: collections.Counter = field(default_factory=collections.Counter)
    timings: dict[str, float] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)
    current_pass: str = ""
    produced: set[str] = field(default_factory=set)  # products of the passes run so far (see declare)
    # the names of the passes this run runs (run_passes sets them): a pass may do a later one's work in its loop
    passes: tuple[str, ...] = ()
    # control: targets only layers called as modules (the result is the user's module with them swapped)
    module_targets_only: bool = False
    # control: plans decided before (name -> (PlanInfo, TargetPlan)), put in place as they are
    preset: dict[str, tuple[Any, TargetPlan]] = field(default_factory=dict)
    # control: low-rank factors from the eigen-decomposition of the smaller Gram matrix instead of a
    # full SVD, and the calibration sums in float32 (less work memory and time, for drivers that
    # bound them: block by block)
    lean: bool = False
    # torch.distributed: the ranks sharing per-target work (tngraph.distributed.Group); None: this process alone
    group: Any = None
    # instruments' own state that outlives one run_passes call (e.g. the dump folder's), by instrument
    instrument_state: dict[str, Any] = field(default_factory=dict)


PassFn = Callable[[fx.GraphModule, PassContext], PassResult]


def spread(batches: list[Any], n: int) -> list[Any]:
    """`n` of `batches` (all when fewer), evenly spread: calibration texts come sorted by length, so
    the first few would all be short."""
    take = min(n, len(batches))
    return [batches[(2 * k + 1) * len(batches) // (2 * take)] for k in range(take)]


def recorded(ctx: PassContext, name: str, work: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """(work(), what it recorded about target `name`: its new ctx.analysis entries and the counters
    it moved), for another rank to replay when `work` ran on this one only."""
    before = dict(ctx.counters)
    had = {kind for kind, entries in ctx.analysis.items() if name in entries}
    value = work()
    analysis = {kind: entries[name] for kind, entries in ctx.analysis.items() if name in entries and kind not in had}
    counters = {k: v - before.get(k, 0) for k, v in ctx.counters.items() if v != before.get(k, 0)}
    return value, {"analysis": analysis, "counters": counters}


def replay(ctx: PassContext, name: str, effects: dict[str, Any]) -> None:
    """Record here what `recorded` saw another rank's work record about target `name`."""
    ctx.counters.update(effects["counters"])
    for kind, value in effects["analysis"].items():
        ctx.analysis.setdefault(kind, {})[name] = value
