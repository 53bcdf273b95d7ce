"""Small nn.Modules that take a factorized target's place in the user's model."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LOWRANK, NETWORK, LayerLinear
from .layers.network import equation_of

if TYPE_CHECKING:
    from .tn.network import TensorNetwork


class LowRankLinear(LayerLinear):
    """y = x @ B^T @ A^T + bias: a rank-r stand-in for an nn.Linear (A: out x r, B: r x in), the
    low-rank layer's module (tngraph.layers.lowrank: its forward, op and kernels).

    Patch level: with `dense` (k x in) and `order` (a permutation of the out rows), k output rows
    stay dense: y = cat(x B^T A^T, x D^T)[..., order] + bias, A holding the other out - k rows.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                 dense: torch.Tensor | None = None, order: torch.Tensor | None = None):
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"factors do not chain: A {tuple(a.shape)}, B {tuple(b.shape)}")
        if (dense is None) != (order is None):
            raise ValueError("dense rows need their order (and the other way round)")
        rows = a.shape[0] + (dense.shape[0] if dense is not None else 0)
        if dense is not None and (dense.dim() != 2 or dense.shape[1] != b.shape[1] or order.shape != (rows,) or order.is_floating_point()):
            raise ValueError(f"dense rows {tuple(dense.shape)} and order {tuple(order.shape)} do not fit A {tuple(a.shape)}, B {tuple(b.shape)}")
        if order is not None and not torch.equal(order.sort().values.cpu(), torch.arange(rows)):
            raise ValueError("order is not a permutation of the output rows")
        super().__init__(LOWRANK, {"a": a, "b": b}, b.shape[1], rows, bias)
        self.dense = nn.Parameter(dense) if dense is not None else None
        self.register_buffer("order", order if order is not None else None)
        self.rank = a.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is None:
            return super().forward(x)
        y = torch.cat([LOWRANK(x, self.factors(), None), F.linear(x, self.dense)], -1).index_select(-1, self.order)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        dense = f", dense_rows={self.dense.shape[0]}" if self.dense is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}{dense}, bias={self.bias is not None}"


class LowRankEmbedding(nn.Module):
    """y = A[indices] @ B: a rank-r stand-in for an nn.Embedding (A: rows x r, B: r x width) that
    gathers rows of A and never builds the table."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, padding_idx: int | None = None):
        super().__init__()
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"factors do not chain: A {tuple(a.shape)}, B {tuple(b.shape)}")
        self.a = nn.Parameter(a)
        self.b = nn.Parameter(b)
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim, self.rank = a.shape[0], b.shape[1], a.shape[1]

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.a, self.padding_idx) @ self.b

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"


class NetworkLinear(LayerLinear):
    """y = contract(x, cores) + bias: a TensorNetwork stand-in for an nn.Linear, the network layer's
    module (tngraph.layers.network: its forward, op, kernels and ONNX translation); the cores are
    parameters core0, core1, ..."""

    def __init__(self, network: "TensorNetwork", bias: torch.Tensor | None = None):
        statics = {"equation": equation_of(network), "in_dims": [int(d) for d in network.in_dims],
                   "out_features": int(network.out_features)}
        super().__init__(NETWORK, {f"core{k}": c for k, c in enumerate(network.cores)}, network.in_features, network.out_features,
                         bias, statics)
        self.spec = network.spec()

    @property
    def network(self) -> "TensorNetwork":
        """The cores as they are now, as a TensorNetwork."""
        from .tn.network import TensorNetwork

        return TensorNetwork.from_spec(self.factors(), self.spec)

    def extra_repr(self) -> str:
        shapes = ", ".join("x".join(map(str, c.shape)) for c in self.factors())
        return f"{self.spec['format']}: in_features={self.in_features}, out_features={self.out_features}, cores=[{shapes}]"


class PrunedLinear(nn.Linear):
    """A member of an MLP block pruned by whole hidden neurons (Config.mlp == "prune"): an up
    projection that keeps the output rows `index` of the original (side "rows"), or the down
    projection that reads only those neurons (side "columns", its weight refitted). A plain
    nn.Linear of the smaller shape (export and kernels see a Linear); `index` says which neurons of
    the original it holds, so the recipe can rebuild it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor, side: str):
        if side not in ("rows", "columns") or weight.dim() != 2 or index.dim() != 1 or index.is_floating_point():
            raise ValueError(f"a pruned layer needs a 2-D weight, integer neuron indices and side rows or columns, got "
                             f"{tuple(weight.shape)}, {tuple(index.shape)} {index.dtype}, {side!r}")
        if weight.shape[0 if side == "rows" else 1] != index.numel():
            raise ValueError(f"weight {tuple(weight.shape)} does not hold the {index.numel()} kept neurons on its {side}")
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        self.register_buffer("index", index.to(torch.long))
        self.side = side

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pruned {self.side}"
