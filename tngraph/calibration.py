"""Streaming per-target input statistics (X^T X, rows, mean |x|), never keeping activations."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

TRIANGLE_FROM = 1024  # sums of products this wide or wider keep their lower triangle only
TRIANGLE_BLOCK = 512  # ... made a block column at a time: about (1 + 1/k) / 2 of the full product's work


def add_products(total: torch.Tensor, rows: torch.Tensor, scale: float = 1.0) -> None:
    """total += scale * rows^T rows (rows: n x d, total: d x d). From TRIANGLE_FROM columns on, only
    the lower triangle's block columns are made (read them with `symmetric`): a symmetric sum needs
    half the product, and the product is the calibration's largest cost after the forwards.
    (scipy's BLAS syrk makes the triangle alone, but its threads, spinning after each call, halved
    the speed of torch's products beside them: measured 2026-12-06.)"""
    d = rows.shape[-1]
    if d < TRIANGLE_FROM:
        total.add_(rows.T @ rows, alpha=scale)
        return
    for start in range(0, d, TRIANGLE_BLOCK):
        stop = min(start + TRIANGLE_BLOCK, d)
        total[start:, start:stop].add_(rows[:, start:].T @ rows[:, start:stop], alpha=scale)


def symmetric(total: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The full sum that `add_products` accumulated into `total`'s lower triangle (a new tensor in `dtype`)."""
    full = total.to(dtype, copy=True)
    full.tril_()
    full.add_(full.T.triu(1))  # the strict lower triangle mirrored (triu makes it a new tensor first)
    return full


def channels_last(y: torch.Tensor) -> torch.Tensor:
    """A convolution's output (N, C, ...) as rows of C channels."""
    return y.movedim(1, -1).reshape(-1, y.shape[1])


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
    """Running sums over the rows x (last dimension = in_features) that reach one target.

    The sum X^T X is kept in `dtype`: float64 by default, float32 where a memory plan needs the room
    and block by block (half the bytes; each batch's product is float32 either way). `gram` reads it
    in float64."""

    in_features: int
    dtype: torch.dtype = torch.float64
    abs_sum: torch.Tensor = field(init=False)
    rows: int = 0
    whitening: Any = field(default=None, init=False)  # its Cholesky factor, when made in place of the Gram

    def __post_init__(self) -> None:
        self._sum: torch.Tensor | None = torch.zeros(self.in_features, self.in_features, dtype=self.dtype)
        self.abs_sum = torch.zeros(self.in_features, dtype=torch.float64)

    @property
    def gram(self) -> torch.Tensor | None:
        """X^T X in float64, a new tensor (None once a memory-bound run traded it for `whitening`)."""
        return None if self._sum is None else symmetric(self._sum)

    @gram.setter
    def gram(self, value: torch.Tensor | None) -> None:
        self._sum = value if value is None else value.to(self.dtype, copy=True)

    @staticmethod
    def bytes(in_features: int, dtype: torch.dtype = torch.float64) -> int:
        """What the sum of a target with `in_features` inputs holds."""
        return (torch.finfo(dtype).bits // 8) * in_features * in_features

    def update(self, x: torch.Tensor) -> None:
        if self.rows == 0 and self._sum.device != x.device:  # accumulate where the activations live
            self._sum, self.abs_sum = self._sum.to(x.device), self.abs_sum.to(x.device)
        rows = x.detach().reshape(-1, self.in_features)
        # one batch's product in (at least) float32, the running sum in self.dtype: several times
        # faster than a float64 product, and a batch's few thousand rows lose nothing that matters
        rows = rows.to(torch.float32) if rows.dtype in (torch.float16, torch.bfloat16) else rows
        add_products(self._sum, rows)  # promoted element by element: no float64 copy of the product
        self.abs_sum += rows.abs().sum(0).to(torch.float64)  # (a float32 batch sum: half the time of one in float64)
        self.rows += rows.shape[0]

    def release(self) -> None:
        """Drop X^T X and its whitening (rows and mean |x| stay): for when no pass will read them."""
        self._sum, self.whitening = None, None

    def finite(self) -> bool:
        """Whether every sum is finite (NaN or Inf inputs make them not)."""
        return self._sum is None or bool(torch.isfinite(self._sum).all())

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)


@dataclass
class OutputGramStats:
    """A target's calibration statistics seen from its outputs: C = sum (y - b)(y - b)^T = W (X^T X) W^T
    (out x out), with the rows, mean |x| and sum ||x||^2 of its inputs (the damping's scale).

    For a low-rank target narrower out than in (an MLP's down projection: 896 x 4,864 in a 0.5 B
    Qwen2) this is all its whitened decomposition needs: the whitened weight W S (X^T X + λI = S S^T)
    has the left singular vectors and values of C + λ W W^T, and the best rank-r factors under
    ||(W - W') X^T|| are U_r U_r^T W. Summing C costs out^2 per row instead of in^2 (a 30th here)."""

    out_features: int
    in_features: int
    bias: torch.Tensor | None = None  # subtracted from the observed outputs
    dtype: torch.dtype = torch.float64
    abs_sum: torch.Tensor = field(init=False)
    sq_total: float = 0.0  # sum over rows of ||x||^2: trace(X^T X)
    rows: int = 0

    def __post_init__(self) -> None:
        self._sum: torch.Tensor | None = torch.zeros(self.out_features, self.out_features, dtype=self.dtype)
        self.abs_sum = torch.zeros(self.in_features, dtype=torch.float64)
        if self.bias is not None:
            self.bias = self.bias.detach().to(torch.float32)

    @property
    def output_gram(self) -> torch.Tensor | None:
        """C = W (X^T X) W^T in float64, a new tensor (None once released)."""
        return None if self._sum is None else symmetric(self._sum)

    @property
    def scale(self) -> float:
        """The mean of X^T X's diagonal: what the damping is relative to (as whitening_from_gram's)."""
        return self.sq_total / max(self.in_features, 1)

    @staticmethod
    def bytes(out_features: int, dtype: torch.dtype = torch.float64) -> int:
        return GramStats.bytes(out_features, dtype)

    def update_inputs(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, self.in_features)
        if self.rows == 0 and self.abs_sum.device != rows.device:
            self.abs_sum = self.abs_sum.to(rows.device)
        self.abs_sum += rows.abs().sum(0).to(torch.float64)
        self.sq_total += float(torch.linalg.vector_norm(rows.to(torch.float32))) ** 2
        self.rows += rows.shape[0]

    def update(self, y: torch.Tensor) -> None:
        """The outputs of the rows update_inputs saw (the observer after the target calls this)."""
        if self._sum.device != y.device:
            self._sum = self._sum.to(y.device)
        rows = y.detach().reshape(-1, self.out_features).to(torch.float32)
        if self.bias is not None:
            rows = rows - self.bias.to(rows.device)
        add_products(self._sum, rows)

    def release(self) -> None:
        self._sum = None

    def finite(self) -> bool:
        return math.isfinite(self.sq_total) and (self._sum is None or bool(torch.isfinite(self._sum).all()))

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
        return torch.diag(self.sums) if self.diagonal else symmetric(self.sums)

    def diag(self) -> torch.Tensor:
        """diag(G) (out, float64), without making G."""
        return self.sums.clone() if self.diagonal else torch.diagonal(self.sums).clone()

    def update(self, g: torch.Tensor, scale: float = 1.0) -> None:
        rows = g.detach().reshape(-1, self.out_features).to(torch.float32)
        if self.diagonal:
            self.sums.add_(rows.pow(2).sum(0), alpha=scale)
        else:
            add_products(self.sums, rows, scale)

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


@dataclass
class ProjectedGradStats(GradStats):
    """A wide target's output-gradient statistics seen from its inputs: H = sum (g W)(g W)^T = W^T G W
    (in x in), with sum ||g||^2 (G's trace: the damping's scale) and GradStats' counts.

    For a low-rank target wider out than in (an MLP's gate and up projections: 4,864 x 896 in a
    0.5 B Qwen2) this is all its two-sided whitened decomposition needs: T = L^T W S (G + μI = L L^T)
    has the right singular vectors and values of S^T (H + μ W^T W) S, and its best rank-r truncation
    is W S V_r V_r^T S^-1 (tngraph.tn.lowrank.lowrank_from_gradients). Summing H costs in x out + in^2
    per row and in^2 memory instead of out^2 (a 30th of G's here)."""

    in_features: int = 0
    sq_total: float = 0.0  # sum over rows of ||g||^2: trace(G)

    def __post_init__(self) -> None:
        if self.diagonal:
            raise ValueError("projected gradient statistics are never diagonal: their in x in sums are the small side")
        self.sums = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)

    @property
    def gram(self) -> torch.Tensor:
        """H = W^T G W (in x in, float64)."""
        return symmetric(self.sums)

    def diag(self) -> torch.Tensor:
        raise TypeError("projected gradient statistics hold W^T G W, not G: diag(G) is not known")

    @property
    def scale(self) -> float:
        """The mean of G's diagonal: what the damping is relative to (as whitening_from_gram's)."""
        return self.sq_total / max(self.out_features, 1)

    def update(self, g: torch.Tensor, scale: float = 1.0, weight: torch.Tensor | None = None) -> None:
        """Add the gradients `g` (rows of out_features) projected through `weight` (out x in)."""
        if weight is None:
            raise TypeError("ProjectedGradStats.update needs the target's weight to project the gradients through")
        rows = g.detach().reshape(-1, self.out_features).to(torch.float32)
        if self.sums.device != rows.device:
            self.sums = self.sums.to(rows.device)
        add_products(self.sums, rows @ weight.detach().to(rows.device, torch.float32), scale)
        self.sq_total += scale * float(torch.linalg.vector_norm(rows)) ** 2

    @staticmethod
    def bytes(in_features: int, diagonal: bool = False) -> int:
        return 8 * in_features * in_features
