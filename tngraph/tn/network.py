"""TensorNetwork: the cores of one weight and their einsum labels; contract(x) never builds the weight.

The input x (..., in) is reshaped to (m, *in_dims) and contracted with every core in one einsum
whose order opt_einsum plans once per row-count bucket (powers of two) and caches.
"""
from __future__ import annotations

import functools
import math
import string
from dataclasses import dataclass, field

import opt_einsum as oe
import torch

ROW_LABEL = "Z"  # reserved for the row dimension of the input


@dataclass
class TensorNetwork:
    """W (out x in) as a network: in_dims / out_dims factor in / out, labelled by in_labels / out_labels;
    each core carries one label per axis. Labels are single letters; "Z" is reserved."""

    cores: list[torch.Tensor]
    core_labels: list[str]
    in_dims: tuple[int, ...]
    out_dims: tuple[int, ...]
    in_labels: str
    out_labels: str
    format: str = ""
    _paths: dict[int, list] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.cores) != len(self.core_labels):
            raise ValueError("one label string per core")
        if len(self.in_dims) != len(self.in_labels) or len(self.out_dims) != len(self.out_labels):
            raise ValueError("one label per input/output dimension")
        sizes: dict[str, int] = dict(zip(self.in_labels, self.in_dims)) | dict(zip(self.out_labels, self.out_dims))
        for core, labels in zip(self.cores, self.core_labels):
            if core.dim() != len(labels) or ROW_LABEL in labels:
                raise ValueError(f"core of shape {tuple(core.shape)} does not fit labels {labels!r}")
            for label, size in zip(labels, core.shape):
                if sizes.setdefault(label, size) != size:
                    raise ValueError(f"label {label!r} has sizes {sizes[label]} and {size}")

    def spec(self) -> dict:
        """Everything but the cores, JSON-ready: what a recipe stores and from_spec() takes back."""
        return dict(core_labels=list(self.core_labels), in_dims=list(self.in_dims), out_dims=list(self.out_dims),
                    in_labels=self.in_labels, out_labels=self.out_labels, format=self.format)

    @classmethod
    def from_spec(cls, cores: list[torch.Tensor], spec: dict) -> "TensorNetwork":
        return cls(list(cores), list(spec["core_labels"]), tuple(spec["in_dims"]), tuple(spec["out_dims"]),
                   spec["in_labels"], spec["out_labels"], format=spec.get("format", ""))

    @property
    def in_features(self) -> int:
        return math.prod(self.in_dims)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_dims)

    @property
    def equation(self) -> str:
        inputs = [ROW_LABEL + self.in_labels, *self.core_labels]
        return ",".join(inputs) + "->" + ROW_LABEL + self.out_labels

    @property
    def num_params(self) -> int:
        return sum(c.numel() for c in self.cores)

    def _path(self, rows: int) -> list:
        bucket = 1 << max(0, math.ceil(math.log2(max(rows, 1))))
        path = self._paths.get(bucket)
        if path is None:
            shapes = [(bucket, *self.in_dims)] + [tuple(c.shape) for c in self.cores]
            path, _ = oe.contract_path(self.equation, *shapes, shapes=True, optimize="optimal" if len(shapes) <= 6 else "greedy")
            self._paths[bucket] = path
        return path

    def flops(self, rows: int) -> int:
        """Multiply-adds x2 of the planned contraction for `rows` input rows."""
        shapes = [(rows, *self.in_dims)] + [tuple(c.shape) for c in self.cores]
        _, info = oe.contract_path(self.equation, *shapes, shapes=True, optimize=self._path(rows))
        return int(info.opt_cost)

    def contract(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) = x @ W^T, without forming W."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the network expects {self.in_features}")
        lead = x.shape[:-1]
        rows = math.prod(lead)
        flat = x.reshape(rows, *self.in_dims)
        out = oe.contract(self.equation, flat, *self.cores, optimize=self._path(rows), backend="torch")
        return out.reshape(*lead, self.out_features)

    def to_dense(self) -> torch.Tensor:
        """W (out x in); for tests and small layers only."""
        eq = ",".join(self.core_labels) + "->" + self.out_labels + self.in_labels
        return oe.contract(eq, *self.cores, backend="torch").reshape(self.out_features, self.in_features)


def labels(count: int, skip: str = "") -> str:
    """`count` distinct single letters, avoiding the row label and `skip`."""
    pool = [c for c in string.ascii_letters if c != ROW_LABEL and c not in skip]
    if count > len(pool):
        raise ValueError(f"a network with more than {len(pool)} labels is not supported")
    return "".join(pool[:count])


@functools.lru_cache(maxsize=None)
def balanced_factors(n: int, parts: int) -> tuple[int, ...]:
    """n as a product of `parts` factors as equal as possible (largest first), e.g. 384, 2 -> (24, 16)."""
    if parts == 1:
        return (n,)
    best: tuple[int, ...] | None = None
    for d in (d for d in range(1, n + 1) if n % d == 0):
        rest = balanced_factors(n // d, parts - 1)
        cand = tuple(sorted((d, *rest), reverse=True))
        if best is None or max(cand) / min(cand) < max(best) / min(best):
            best = cand
    assert best is not None
    return best
