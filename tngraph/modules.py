"""Small nn.Modules that take a factorized target's place in the user's model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops  # noqa: F401  (registers torch.ops.tngraph)


class LowRankLinear(nn.Module):
    """y = x @ B^T @ A^T + bias: a rank-r stand-in for an nn.Linear (A: out x r, B: r x in).

    Patch level: with `dense` (k x in) and `order` (a permutation of the out rows), k output rows
    stay dense: y = cat(x B^T A^T, x D^T)[..., order] + bias, A holding the other out - k rows.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                 dense: torch.Tensor | None = None, order: torch.Tensor | None = None):
        super().__init__()
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"factors do not chain: A {tuple(a.shape)}, B {tuple(b.shape)}")
        if (dense is None) != (order is None):
            raise ValueError("dense rows need their order (and the other way round)")
        rows = a.shape[0] + (dense.shape[0] if dense is not None else 0)
        if dense is not None and (dense.dim() != 2 or dense.shape[1] != b.shape[1] or order.shape != (rows,) or order.is_floating_point()):
            raise ValueError(f"dense rows {tuple(dense.shape)} and order {tuple(order.shape)} do not fit A {tuple(a.shape)}, B {tuple(b.shape)}")
        if order is not None and not torch.equal(order.sort().values.cpu(), torch.arange(rows)):
            raise ValueError("order is not a permutation of the output rows")
        self.a = nn.Parameter(a)
        self.b = nn.Parameter(b)
        self.dense = nn.Parameter(dense) if dense is not None else None
        self.register_buffer("order", order if order is not None else None)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.in_features = b.shape[1]
        self.out_features = rows
        self.rank = a.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is None:
            if x.is_cuda and not torch.is_grad_enabled():
                # GPU inference: one fused op (a Triton kernel); on the CPU the op would run this
                # same chain plus a dispatch, so the chain is called directly
                return torch.ops.tngraph.lowrank(x, self.b, self.a, self.bias, "none")
            # training (healing): the chain, whose backward autograd already knows
            return F.linear(F.linear(x, self.b), self.a, self.bias)
        y = torch.cat([F.linear(F.linear(x, self.b), self.a), F.linear(x, self.dense)], -1).index_select(-1, self.order)
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


class NetworkLinear(nn.Module):
    """y = contract(x, cores) + bias: a TensorNetwork stand-in for an nn.Linear."""

    def __init__(self, network: "TensorNetwork", bias: torch.Tensor | None = None):
        super().__init__()
        from .tn.network import TensorNetwork

        self.cores = nn.ParameterList(nn.Parameter(c) for c in network.cores)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self._spec = network.spec()
        self._network = TensorNetwork.from_spec(list(self.cores), self._spec)
        self.in_features = network.in_features
        self.out_features = network.out_features

    @property
    def network(self) -> "TensorNetwork":
        self._network.cores = list(self.cores)  # follow .to() and training of the parameters
        return self._network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.network
        if (x.is_cuda and not torch.is_grad_enabled()) or torch.compiler.is_exporting():
            # GPU inference: the tngraph::network op (Triton kernels for the two-mode layouts);
            # export: one opaque node (the contraction path below is chosen per row count, which
            # would pin the batch size), translated by each exporter (ONNX: Einsum)
            equation = "..." + net.in_labels + "," + ",".join(net.core_labels) + "->..." + net.out_labels
            return torch.ops.tngraph.network(x, list(self.cores), equation, list(net.in_dims), net.out_features, self.bias)
        y = net.contract(x)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        shapes = ", ".join("x".join(map(str, c.shape)) for c in self.cores)
        return f"{self._spec['format']}: in_features={self.in_features}, out_features={self.out_features}, cores=[{shapes}]"
