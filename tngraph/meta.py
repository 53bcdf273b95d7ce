"""What passes learn about a node, kept in one place: node.meta["tngraph"], a frozen NodeInfo."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

KEY = "tngraph"


@dataclass(frozen=True)
class Conv:
    """A convolution target's geometry (groups 1): y = conv(x, W), W (out, in_channels, *kernel),
    compressed as the (out x in_channels*prod(kernel)) matrix it unfolds to."""

    in_channels: int
    kernel: tuple[int, ...]  # one size per spatial dim: 1 (conv1d) or 2 (conv2d)
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    @property
    def dims(self) -> int:
        return len(self.kernel)

    def statics(self) -> dict[str, Any]:
        """The conv layer's static arguments (tngraph.layers.conv)."""
        return {"in_channels": self.in_channels, **{k: list(getattr(self, k)) for k in ("kernel", "stride", "padding", "dilation")}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Conv":
        return cls(int(data["in_channels"]), *(tuple(int(v) for v in data[k]) for k in ("kernel", "stride", "padding", "dilation")))


@dataclass(frozen=True)
class TargetInfo:
    """A linear-like node (or embedding lookup) whose weight is a constant of the graph."""

    name: str  # module path of the weight's owner, e.g. "encoder.layer.0.attention.self.query"
    weight: str  # qualified attribute name of the weight
    bias: str | None
    in_features: int  # embedding tables: the embedding width
    out_features: int  # embedding tables: the number of rows
    kind: str = "linear"  # "linear" or "embedding"
    transposed: bool = False  # the weight is stored (in x out): GPT-2's Conv1D, x @ W + b
    conv: Conv | None = None  # a convolution: in_features is in_channels * prod(kernel)
    # embedding tables (module paths) that read this output head's weight (a tied table): they
    # gather rows of its factors, A[indices] @ B, so the tie holds
    lookups: tuple[str, ...] = ()

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class PlanInfo:
    """What the allocation chose for a target."""

    format: str  # "lowrank" or "dense"
    rank: int | None
    params_before: int
    params_after: int
    reason: str = ""
    dense_rows: int = 0  # patch level: output rows kept dense beside the low-rank rest
    # a quantized plan (format quant or qlowrank): {"bits", "group" (0: per output channel), "act_bits"}
    quant: dict | None = None
    bytes_after: int | None = None  # what its tensors store (quantized plans)


@dataclass(frozen=True)
class CalibrationInfo:
    rows: int
    mean_abs: float  # mean |x| of the inputs
    output_rms: float = 0.0  # root mean square of the outputs (linear targets)


@dataclass(frozen=True)
class Provenance:
    """Which pass created a node, and from which original node."""

    created_by: str
    source: str
    role: str = ""


@dataclass(frozen=True)
class SensitivityInfo:
    """How much compressing this target costs (sensitivity pass)."""

    kind: str  # "spectral" or "measured"
    score: float  # predicted squared relative output error at the budget's uniform rank
    uniform_rank: int


@dataclass(frozen=True)
class NodeInfo:
    target: TargetInfo | None = None
    calibration: CalibrationInfo | None = None
    sensitivity: SensitivityInfo | None = None
    plan: PlanInfo | None = None
    provenance: Provenance | None = None

    def summary(self) -> str:
        parts = []
        if self.target:
            parts.append(f"target={self.target.name}")
        if self.calibration:
            parts.append(f"calib_rows={self.calibration.rows}")
        if self.sensitivity:
            parts.append(f"sens={self.sensitivity.kind}:{self.sensitivity.score:.3g}")
        if self.plan:
            rank = f"@{self.plan.rank}" if self.plan.rank else ""
            rank += f"+{self.plan.dense_rows}rows" if self.plan.dense_rows else ""
            parts.append(f"plan={self.plan.format}{rank}")
        if self.provenance:
            role = f":{self.provenance.role}" if self.provenance.role else ""
            parts.append(f"from={self.provenance.created_by}({self.provenance.source}){role}")
        return " ".join(parts)


def info(node: fx.Node) -> NodeInfo:
    return node.meta.get(KEY) or NodeInfo()


def update(node: fx.Node, **changes: Any) -> NodeInfo:
    new = dataclasses.replace(info(node), **changes)
    node.meta[KEY] = new
    return new


def targets(gm: fx.GraphModule) -> list[fx.Node]:
    """One node per target the targets pass marked, in graph order: a weight read by several linear
    nodes (ALBERT's one layer run at every depth) is one target, represented by its first use."""
    seen: set[str] = set()
    first = []
    for n in target_uses(gm):
        name = info(n).target.name
        if name not in seen:
            seen.add(name)
            first.append(n)
    return first


def target_uses(gm: fx.GraphModule) -> list[fx.Node]:
    """Every node the targets pass marked, in graph order: each use of a shared weight."""
    return [n for n in gm.graph.nodes if info(n).target is not None]
