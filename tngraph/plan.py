"""The plan: per target, a format, a rank and the factor tensors; what artifacts store and modules apply."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


INDEX_KEYS = ("order", "rows", "columns")  # factors that are indices (patch-level row order, a pruned layer's neurons)


@dataclass
class TargetPlan:
    name: str
    format: str
    rank: int
    in_features: int
    out_features: int
    has_bias: bool
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    # for tensor-network formats: core_labels, in_dims, out_dims, in_labels, out_labels, format
    network: dict | None = None
    kind: str = "linear"  # "linear" (out x in weight) or "embedding" (out = rows, in = width)
    conv: dict | None = None  # a convolution's geometry (meta.Conv.statics()): in is in_channels * prod(kernel)
    tied: tuple[str, ...] = ()  # embedding modules tied to this head: they gather rows of its factors
    quant: dict | None = None  # a quantized plan (format quant / qlowrank): {"bits", "group" (0: per channel), "act_bits"}

    @property
    def params_before(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.has_bias else 0)

    @property
    def params_after(self) -> int:
        if self.quant is not None:  # every weight kept, as codes, plus the compensating rank
            extra = sum(self.factors[k].numel() for k in ("a", "b") if k in self.factors)
            return self.in_features * self.out_features + extra + (self.out_features if self.has_bias else 0)
        # integer factors (the row order of patch-level plans, a pruned layer's neurons) are indices, not parameters
        return sum(t.numel() for t in self.factors.values() if t.is_floating_point()) + self._bias_values

    @property
    def _bias_values(self) -> int:
        """Bias entries the layer keeps: a pruned up projection keeps those of its kept rows."""
        if not self.has_bias:
            return 0
        return self.factors["rows"].numel() if self.format == "prune" and "rows" in self.factors else self.out_features

    def bytes_after(self, bias_bytes: int = 4) -> int:
        """Bytes its factors store (codes packed as held, fp16 scales, factors in their dtype), plus
        the bias at `bias_bytes` per value; row orders and kept-neuron lists (indices) not counted."""
        stored = sum(t.numel() * t.element_size() for k, t in self.factors.items() if k not in INDEX_KEYS)
        return stored + self._bias_values * bias_bytes

    def recipe(self) -> dict:
        return {
            "name": self.name,
            "format": self.format,
            "rank": self.rank,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.has_bias,
            **({"kind": self.kind} if self.kind != "linear" else {}),
            "factors": {k: list(v.shape) for k, v in sorted(self.factors.items())},
            **({"network": dict(self.network)} if self.network else {}),
            **({"conv": dict(self.conv)} if self.conv else {}),
            **({"tied": list(self.tied)} if self.tied else {}),
            **({"quant": dict(self.quant)} if self.quant else {}),
        }

    def tensor_network(self):
        """The factors as a TensorNetwork (tensor-network formats only)."""
        from .tn.network import TensorNetwork

        spec = self.network or {}
        return TensorNetwork.from_spec([self.factors[f"core{k}"] for k in range(len(spec["core_labels"]))], spec)
