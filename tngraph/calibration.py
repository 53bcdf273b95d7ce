"""Streaming per-target input statistics (X^T X, rows, mean |x|), never keeping activations."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CountStats:
    """How often each row of an embedding table was looked up."""

    num_embeddings: int
    counts: torch.Tensor = field(init=False)
    rows: int = 0

    def __post_init__(self) -> None:
        self.counts = torch.zeros(self.num_embeddings, dtype=torch.float64)

    def update(self, indices: torch.Tensor) -> None:
        flat = indices.detach().reshape(-1).to("cpu", torch.long)
        self.counts += torch.bincount(flat, minlength=self.num_embeddings)[: self.num_embeddings].to(torch.float64)
        self.rows += flat.numel()

    def row_weights(self, smoothing: float = 1.0) -> torch.Tensor:
        """Counts plus `smoothing` times the mean count, so rows never seen keep some weight."""
        return self.counts + smoothing * max(self.rows / self.num_embeddings, 1e-12)


@dataclass
class GramStats:
    """Running sums over the rows x (last dimension = in_features) that reach one target."""

    in_features: int
    gram: torch.Tensor | None = field(init=False)  # None once a memory-bound run traded it for `whitening`
    abs_sum: torch.Tensor = field(init=False)
    rows: int = 0
    whitening: Any = field(default=None, init=False)  # its Cholesky factor, when made in place of the Gram

    def __post_init__(self) -> None:
        self.gram = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
        self.abs_sum = torch.zeros(self.in_features, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        if self.rows == 0 and self.gram.device != x.device:  # accumulate where the activations live
            self.gram, self.abs_sum = self.gram.to(x.device), self.abs_sum.to(x.device)
        rows = x.detach().reshape(-1, self.in_features)
        # one batch's product in (at least) float32, the running sum in float64: several times
        # faster than a float64 product, and a batch's few thousand rows lose nothing that matters
        rows = rows.to(torch.float32) if rows.dtype in (torch.float16, torch.bfloat16) else rows
        self.gram.add_(rows.T @ rows)  # promoted to float64 element by element: no float64 copy of the product
        self.abs_sum += rows.abs().sum(0, dtype=torch.float64)
        self.rows += rows.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)


@dataclass
class OutputStats:
    """Running sums of a target's outputs y (last dimension = out_features): per-channel sum of y^2."""

    out_features: int
    sq_sum: torch.Tensor = field(init=False)
    rows: int = 0

    def __post_init__(self) -> None:
        self.sq_sum = torch.zeros(self.out_features, dtype=torch.float64)

    def update(self, y: torch.Tensor) -> None:
        rows = y.detach().reshape(-1, self.out_features)
        if self.rows == 0 and self.sq_sum.device != rows.device:
            self.sq_sum = self.sq_sum.to(rows.device)
        self.sq_sum += rows.to(torch.float32).pow(2).sum(0).to(torch.float64)
        self.rows += rows.shape[0]

    @property
    def rms(self) -> torch.Tensor:
        """Root mean square of each output channel."""
        return (self.sq_sum / max(self.rows, 1)).sqrt()


@dataclass
class GradStats:
    """Running sums over the output gradients g (last dimension = out_features) of one target:
    G = sum g g^T, with the rows counted, the objective's samples (its rows: one per sentence for
    a pooled embedding) and its energy over the same batches."""

    out_features: int
    diagonal: bool = False  # keep only G's diagonal (a memory plan's choice for wide outputs: tngraph.memory)
    sums: torch.Tensor = field(init=False)
    rows: int = 0
    samples: int = 0
    energy: float = 0.0

    def __post_init__(self) -> None:
        shape = (self.out_features,) if self.diagonal else (self.out_features, self.out_features)
        self.sums = torch.zeros(shape, dtype=torch.float64)

    @property
    def gram(self) -> torch.Tensor:
        """G (out x out, float64); diagonal statistics give diag(G), made on demand."""
        return torch.diag(self.sums) if self.diagonal else self.sums

    def update(self, g: torch.Tensor, scale: float = 1.0) -> None:
        rows = g.detach().reshape(-1, self.out_features).to(torch.float32)
        if self.diagonal:
            self.sums += rows.pow(2).sum(0).to(torch.float64) * scale
        else:
            self.sums += (rows.T @ rows).to(torch.float64) * scale

    @staticmethod
    def bytes(out_features: int, diagonal: bool = False) -> int:
        """What the statistics of a target with `out_features` outputs hold."""
        return 8 * (out_features if diagonal else out_features * out_features)

    def damping(self, floor: float) -> float:
        """Relative damping of G: at least `floor`, more when G is estimated from few independent
        samples. The rows of one sample (the tokens of a sentence under a pooled objective) share
        nearly the same gradient, so G has about `samples` independent terms; with fewer than its
        size it is rank-deficient and noisy. 0.25 p / samples was best on the MiniLM at 96 and 2048
        calibration sentences (tools/bench_allocation.py)."""
        return max(floor, 0.25 * self.out_features / max(self.samples, 1))
