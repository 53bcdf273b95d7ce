"""Core types of the pass pipeline: PassContext, PassResult and the Pass signature."""
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

    def __call__(self, gm: fx.GraphModule, ctx: "PassContext") -> PassResult: ...


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


PassFn = Callable[[fx.GraphModule, PassContext], PassResult]


def spread(batches: list[Any], n: int) -> list[Any]:
    """`n` of `batches` (all when fewer), evenly spread: calibration texts come sorted by length, so
    the first few would all be short."""
    take = min(n, len(batches))
    return [batches[(2 * k + 1) * len(batches) // (2 * take)] for k in range(take)]
