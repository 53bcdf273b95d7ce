"""The GPU side of tngraph's layer ops (tngraph.layers defines the ops; this module runs them on CUDA).

The low-rank and network layers (tngraph/layers/lowrank.py, network.py) register these CUDA
implementations with their ops: a Triton kernel from `tngraph.kernels` runs when it supports the
inputs and is the fastest for the shape, and otherwise the pure-torch reference does (the CPU
path, bit-identical to the unfused chain), with the reason logged once.

- tngraph::lowrank(x, [a, b], bias, act) = act(x @ b^T @ a^T + bias), act in ACTIVATIONS
  (lowrank_cuda: the split-rank or tiled kernel, the chain or the dense product, as `choose` picks).
- tngraph::quant / qlowrank / qfactors (tngraph/layers/quant.py): each quantized weight's product in
  the dequantizing GEMM kernel tngraph/kernels/quant.py (quant_product_cuda), the low-rank branch of
  qlowrank as two GEMMs, the bias after.
- tngraph::network(x, cores, bias, equation, in_dims, out_features) = a tensor-network layer
  (Tucker, TT, TR, CP, Kronecker, Monarch): x's features unflattened to in_dims, contracted with
  the cores by `equation` ("...<in>,<core>,...->...<out>"), flattened to out_features, + bias.
  The reference is torch.einsum (opt_einsum's contraction path); on CUDA the two-mode layers
  (TT, Kronecker, tensor ring, CP, Tucker; see network_plan, made once per layer) can run
  tngraph/kernels/tt.py, where it is faster than the einsum for the layer's row bucket (choose_network).
"""
from __future__ import annotations

import functools
import logging
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ACTIVATIONS = ("none", "gelu", "silu", "relu")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The CUDA dispatch picks, per (device, dtype, shape, bias, activation) and row-count bucket, the
# fastest of the split-rank kernel, the tiled kernel and the two-GEMM chain (cuBLAS), timed once on
# the first call in that bucket (bucket = the smallest of ROW_BUCKETS >= the row count; the last, past
# every kernel's row limit, holds every larger count). Kernels are candidates only up to their row limits
# (KERNEL_ROWS), so past 2048 rows the chain runs untimed, or is timed against the dense product where
# that is allowed. TNGRAPH_LOWRANK=split_rank|tiled|chain|dense forces a choice at any row count.
# "dense" (the product a·b kept as one weight, one cuBLAS GEMM) is a candidate only where allowed
# (TNGRAPH_LOWRANK_DENSE=1 or allow_dense(True)): it holds again the dense weight the factorization
# removed, trading that memory back for speed where the chain loses (many rows at high ranks); the
# product is made once per layer and dropped when the layer's bucket picks another implementation.
# tngraph::network is chosen the same way among its kernel path (tngraph/kernels/tt.py, for the layouts
# network_plan maps), the einsum and, where allowed, the dense matrix; TNGRAPH_NETWORK=kernel|einsum|dense
# forces one.
ROW_BUCKETS = (1, 16, 128, 2048, 4096)  # 4096: more than 2048 rows, timed at 4096
KERNEL_ROWS = {"split_rank": 128, "tiled": 2048}
IMPLEMENTATIONS = ("split_rank", "tiled", "chain", "dense")
NETWORK_IMPLEMENTATIONS = ("kernel", "einsum", "dense")
_choices: dict[tuple, str] = {}
_network_choices: dict[tuple, str] = {}
_allow_dense: bool | None = None


class TensorCache:
    """Values made from tensors (dense products, network plans): made once per set of tensors, again
    after one of them changes in place, and dropped when one is freed. Entries are keyed by the
    tensors' identity, not their addresses (freed memory is reused by other tensors of the same
    shape), and the values must not reference the tensors, or they would never be freed."""

    def __init__(self) -> None:
        self.entries: dict[tuple, tuple] = {}

    def get(self, tag: str, tensors: tuple[torch.Tensor, ...], make):
        key = (tag, *(id(t) for t in tensors))
        versions = tuple(t._version for t in tensors)
        held = self.entries.get(key)
        if held is not None and held[0] == versions and all(ref() is t for ref, t in zip(held[1], tensors)):
            return held[2]
        value = make()
        if held is None:
            for t in tensors:
                weakref.finalize(t, self.entries.pop, key, None)
        self.entries[key] = (versions, tuple(weakref.ref(t) for t in tensors), value)
        return value

    def drop(self, tag: str, tensors: tuple[torch.Tensor, ...]) -> None:
        self.entries.pop((tag, *(id(t) for t in tensors)), None)

    def clear(self) -> None:
        self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)


_dense = TensorCache()


def allow_dense(allowed: bool | None = True) -> None:
    """Let the CUDA dispatch of tngraph::lowrank and tngraph::network pick the dense matrix (a·b,
    the cores contracted) where it is fastest (None: follow TNGRAPH_LOWRANK_DENSE). Clears the
    cached choices."""
    global _allow_dense
    _allow_dense = allowed
    _choices.clear()
    _network_choices.clear()
    if not dense_allowed():
        _dense.clear()


def dense_allowed() -> bool:
    import os

    return _allow_dense if _allow_dense is not None else os.environ.get("TNGRAPH_LOWRANK_DENSE", "") not in ("", "0")


def dense_weight(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """a @ b (N, K), made once per pair of factors (and again after they change in place)."""
    return _dense.get("lowrank", (b, a), lambda: a @ b)


def activation(y: torch.Tensor, act: str) -> torch.Tensor:
    if act == "none":
        return y
    if act == "gelu":
        return F.gelu(y)
    if act == "silu":
        return F.silu(y)
    if act == "relu":
        return torch.relu(y)
    raise ValueError(f"unknown activation {act!r}; tngraph::lowrank takes one of {', '.join(ACTIVATIONS)}")


def lowrank_reference(x: torch.Tensor, b: torch.Tensor, a: torch.Tensor, bias: Optional[torch.Tensor], act: str) -> torch.Tensor:
    """The unfused chain, op for op: linear(linear(x, b), a, bias), then the activation."""
    return activation(F.linear(F.linear(x, b), a, bias), act)


def load_kernels(name: str = "lowrank"):
    """A Triton kernels module (tngraph.kernels.<name>: lowrank, tt); raises ImportError without triton."""
    import importlib

    return importlib.import_module(f"{__package__}.kernels.{name}")


@functools.lru_cache(maxsize=None)
def _fallback_once(reason: str, op: str = "lowrank") -> None:
    log.warning("tngraph::%s runs its torch reference on the GPU: %s", op, reason)


def kernel_unsupported(x: torch.Tensor, *others: Optional[torch.Tensor]) -> str | None:
    """Why the Triton kernels cannot take x with these weights (None entries skipped), or None."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'tngraph[gpu]')"
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} (kernels take float16, bfloat16, float32)"
    tensors = [t for t in (x, *others) if t is not None]
    if any(t.dtype != x.dtype for t in tensors):
        return "inputs of mixed dtypes"
    if any(t.device != x.device for t in tensors):
        return "inputs on different devices"
    return None


def quant_product_cuda(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                       op: str = "quant") -> torch.Tensor | None:
    """x W'^T of one quantized tensor (tngraph.layers.quant) on CUDA by the dequantizing GEMM kernel
    (tngraph/kernels/quant.py): the weight unpacked tile by tile inside the GEMM, never in memory;
    None where the kernel cannot take these inputs (the reason logged once; the caller runs the
    reference)."""
    reason = kernel_unsupported(x)
    kernels = load_kernels("quant") if reason is None else None
    if kernels is not None:
        if any(t.device != x.device for t in (codes, scales, zeros)):
            reason = "inputs on different devices"
        else:
            reason = kernels.supported(x, codes, scales, bits)
    if reason is not None:
        _fallback_once(reason, op)
        return None
    return kernels.quant_matmul(x, codes, scales, zeros, bits)


def bucket(rows: int) -> int:
    """The row bucket the dispatch times and keys on: the smallest of ROW_BUCKETS >= rows, the last
    one for any more (past every kernel's limit)."""
    return next((b for b in ROW_BUCKETS if rows <= b), ROW_BUCKETS[-1])


def network_reference(x: torch.Tensor, cores: list[torch.Tensor], equation: str, in_dims: list[int], out_features: int,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The unfused tensor-network layer, op for op as the factorize pass writes it."""
    n_out = len(equation.split("->")[1].replace("...", ""))
    y = torch.flatten(torch.einsum(equation, [torch.unflatten(x, -1, in_dims), *cores]), -n_out, -1)
    return y + bias if bias is not None else y


def parse_equation(equation: str) -> tuple[str, list[str], str]:
    lhs, out = equation.replace("...", "").split("->")
    x_labels, *core_labels = lhs.split(",")
    return x_labels, core_labels, out


def network_plan(equation: str, cores: list[torch.Tensor]) -> tuple[str, tuple] | str:
    """How tngraph/kernels/tt.py runs this tensor-network layer: ("tt2", (g1, g2)), ("tucker2", (...)), or the
    reason it cannot (a string).

    - "tt2": the cores split into two groups, one holding the first input and output modes (p, P), the
      other the second (q, Q), joined only by bond labels. Each group is contracted into one core
      (a view for the TT and Kronecker formats; the ring bond of a two-core tensor ring and the shared
      rank of a two-mode CP are merged into the bond), and the two-core kernel runs.
    - "tucker2": a two-mode Tucker core G[c, d, a, b] with factors U_p[p, a], U_q[q, b], U_P[P, c],
      U_Q[Q, d]: the input projection x -> z[m, a, b] and the output expansion w[m, c, d] -> y are
      Kronecker matmuls (the two-core kernel with a bond of 1), the core in between one small GEMM
      (m x rank-sized intermediates only).
    Monarch and networks of more than two modes per side run the torch reference."""
    x_labels, core_labels, out = parse_equation(equation)
    if len(x_labels) != 2 or len(out) != 2:
        return f"only two-mode layers have a kernel ({len(x_labels)} input modes)"
    (p, q), (P, Q) = x_labels, out
    side = {p: 0, P: 0, q: 1, Q: 1}
    groups: list[list[int]] = [[], []]
    for i, labels_ in enumerate(core_labels):
        sides = {side[c] for c in labels_ if c in side}
        if len(sides) != 1:
            break
        groups[sides.pop()].append(i)
    else:
        if all(groups):
            own = [set("".join(core_labels[i] for i in g)) for g in groups]
            bonds = "".join(sorted((own[0] & own[1]) - set(side)))
            if not ({p, P} <= own[0] and {q, Q} <= own[1]):
                return "a mode without a core"
            g1 = torch.einsum(",".join(core_labels[i] for i in groups[0]) + "->" + P + p + bonds, *(cores[i] for i in groups[0]))
            g2 = torch.einsum(",".join(core_labels[i] for i in groups[1]) + "->" + bonds + Q + q, *(cores[i] for i in groups[1]))
            return "tt2", (g1.reshape(g1.shape[0], g1.shape[1], -1), g2.reshape(-1, g2.shape[-2], g2.shape[-1]))
    return _tucker2_plan(x_labels, core_labels, out, cores)


def _tucker2_plan(x_labels: str, core_labels: list[str], out: str, cores: list[torch.Tensor]) -> tuple[str, tuple] | str:
    factor_of: dict[str, int] = {}
    for i, labels_ in enumerate(core_labels):
        modes = [c for c in labels_ if c in x_labels + out]
        if len(labels_) == 2 and len(modes) == 1:
            factor_of[modes[0]] = i
    rest = [i for i in range(len(cores)) if i not in factor_of.values()]
    if len(factor_of) != 4 or len(rest) != 1:
        return "no kernel for this network's layout (monarch, or more than two cores per side)"
    (p, q), (P, Q) = x_labels, out
    rank = {m: core_labels[i].replace(m, "") for m, i in factor_of.items()}
    core = core_labels[rest[0]]
    if sorted(core) != sorted(rank[P] + rank[Q] + rank[p] + rank[q]):
        return "no kernel for this network's layout"

    def view(m: str, order: str) -> torch.Tensor:  # the factor of mode m with its axes in `order`
        return torch.einsum(core_labels[factor_of[m]] + "->" + order, cores[factor_of[m]])

    g = torch.einsum(core + "->" + rank[P] + rank[Q] + rank[p] + rank[q], cores[rest[0]])
    return "tucker2", (view(p, rank[p] + p)[:, :, None], view(q, rank[q] + q)[None], g.reshape(g.shape[0] * g.shape[1], -1),
                       view(P, P + rank[P])[:, :, None], view(Q, Q + rank[Q])[None])


def network_kernel(x: torch.Tensor, cores: list[torch.Tensor], equation: str, out_features: int,
                   bias: Optional[torch.Tensor], plan: tuple[str, tuple]) -> torch.Tensor:
    """Run a network_plan() on x (..., in) with the Triton kernels of tngraph/kernels/tt.py."""
    tt = load_kernels("tt")
    rows = x.reshape(-1, x.shape[-1])
    how, parts = plan
    if how == "tt2":
        y = tt.tt2(rows, *parts, bias)
    else:
        in_p, in_q, core, out_p, out_q = parts
        z = tt.tt2(rows, in_p, in_q, None)  # (m, ra * rb)
        y = tt.tt2(z @ core.T, out_p, out_q, bias)  # (m, rA * rB) -> (m, out)
    return y.reshape(*x.shape[:-1], out_features)


_plans = TensorCache()


def cached_network_plan(equation: str, cores: list[torch.Tensor]) -> tuple[str, tuple] | str:
    """network_plan(equation, cores), made once per set of cores and again after any of them
    changes in place: the plan merges cores with small einsums (TR, CP, Tucker), launches that a
    forward on the GPU should not pay every time. Parts that are views of a core (TT, Kronecker)
    are kept as their strides, so the cache holds no reference to the cores."""
    def make():
        plan = network_plan(equation, cores)
        if isinstance(plan, str):
            return None, plan
        storages = [c.untyped_storage().data_ptr() for c in cores]

        def kept(part: torch.Tensor):  # a view of core i as (i, size, stride, offset), anything else itself
            ptr = part.untyped_storage().data_ptr()
            return (storages.index(ptr), part.size(), part.stride(), part.storage_offset()) if ptr in storages else part

        return plan[0], tuple(kept(part) for part in plan[1])

    how, parts = _plans.get(equation, tuple(cores), make)
    if how is None:
        return parts
    return how, tuple(cores[p[0]].as_strided(*p[1:]) if isinstance(p, tuple) else p for p in parts)


def network_matrix(cores: list[torch.Tensor], equation: str, out_features: int) -> torch.Tensor:
    """The layer's matrix (out_features, in): the cores contracted without x."""
    x_labels, core_labels, out = parse_equation(equation)
    return torch.einsum(",".join(core_labels) + "->" + out + x_labels, *cores).reshape(out_features, -1)


def network_dense_weight(cores: list[torch.Tensor], equation: str, out_features: int) -> torch.Tensor:
    """network_matrix, contiguous, made once per set of cores (and again after they change in place)."""
    return _dense.get("network:" + equation, tuple(cores), lambda: network_matrix(cores, equation, out_features).contiguous())


def choose_network(x: torch.Tensor, cores: list[torch.Tensor], equation: str, in_dims: list[int], out_features: int,
                   bias: Optional[torch.Tensor], plan: tuple[str, tuple] | str, *, timer=None) -> str:
    """The implementation of tngraph::network for these 2-D inputs: "kernel" (tngraph/kernels/tt.py, where
    `plan` is one), "einsum" or, where allowed (allow_dense), "dense"; measured once per layer shape
    and row bucket (timer(fn) -> time), then cached."""
    forced = _forced("TNGRAPH_NETWORK", NETWORK_IMPLEMENTATIONS)
    if forced:
        return "einsum" if forced == "kernel" and isinstance(plan, str) else forced
    rows = bucket(x.shape[0])
    shape = (str(x.device), x.dtype, equation, tuple(tuple(c.shape) for c in cores), bias is not None)
    key = (*shape, rows, dense_allowed())
    if key in _network_choices:
        return _network_choices[key]
    probe = torch.randn(rows, x.shape[1], device=x.device, dtype=x.dtype)
    candidates = {"einsum": lambda: network_reference(probe, cores, equation, in_dims, out_features, bias)}
    if not isinstance(plan, str):
        candidates["kernel"] = lambda: network_kernel(probe, cores, equation, out_features, bias, plan)
    if dense_allowed():
        weight = network_dense_weight(cores, equation, out_features)
        candidates["dense"] = lambda: F.linear(probe, weight, bias)
    return _fastest("network", _network_choices, shape, rows, candidates, timer, ("network:" + equation, tuple(cores)))


def network_cuda(x: torch.Tensor, cores: list[torch.Tensor], equation: str, in_dims: list[int], out_features: int,
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
    """tngraph::network on CUDA (tngraph.layers.network): the kernel path, the einsum or the dense matrix, as choose_network picks."""
    reason = kernel_unsupported(x, *cores, bias)
    if reason is not None:
        _fallback_once(reason, "network")
        return network_reference(x, cores, equation, in_dims, out_features, bias)
    plan = cached_network_plan(equation, cores)
    rows = x.reshape(-1, x.shape[-1])
    how = choose_network(rows, cores, equation, in_dims, out_features, bias, plan)
    if how == "kernel":
        return network_kernel(x, cores, equation, out_features, bias, plan)
    if how == "dense":
        return F.linear(x, network_dense_weight(cores, equation, out_features), bias)
    if isinstance(plan, str):
        _fallback_once(plan, "network")
    return network_reference(x, cores, equation, in_dims, out_features, bias)


def _forced(variable: str, allowed: tuple[str, ...]) -> str | None:
    """The implementation an environment variable forces (None when unset), checked."""
    import os

    forced = os.environ.get(variable)
    if forced and forced not in allowed:
        raise ValueError(f"{variable}={forced!r}: choose {', '.join(allowed)}")
    return forced or None


def _fastest(op: str, choices: dict[tuple, str], shape: tuple, rows: int, candidates: dict, timer, dense: tuple) -> str:
    """Time each candidate once (nothing to time when there is one), keep the fastest for this
    layer shape and row bucket in `choices`, and drop the layer's dense matrix (`dense`: its
    TensorCache tag and tensors) when no bucket of its shape runs it."""
    timed = {name: (timer or _do_bench)(fn) for name, fn in candidates.items()} if len(candidates) > 1 else dict.fromkeys(candidates, 0.0)
    best = choices[(*shape, rows, dense_allowed())] = min(timed, key=timed.get)
    if not any(v == "dense" and k[:len(shape)] == shape for k, v in choices.items()):
        _dense.drop(*dense)
    log.info("tngraph::%s %s, %d rows: %s (%s)", op, shape, rows, best, ", ".join(f"{k} {v:.4g}" for k, v in timed.items()))
    return best


def _do_bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn)


def choose(x: torch.Tensor, b: torch.Tensor, a: torch.Tensor, bias: Optional[torch.Tensor], act: str, *, timer=None) -> str:
    """The implementation of tngraph::lowrank for these 2-D inputs: "split_rank", "tiled", "chain" or,
    where allowed (allow_dense), "dense"; measured once per shape and row bucket (timer(fn) -> time),
    then cached."""
    forced = _forced("TNGRAPH_LOWRANK", IMPLEMENTATIONS)
    if forced:
        return forced
    rows = bucket(x.shape[0])
    shape = (str(x.device), x.dtype, x.shape[1], b.shape[0], a.shape[0], bias is not None, act)
    key = (*shape, rows, dense_allowed())
    if key in _choices:
        return _choices[key]
    kernels = load_kernels("lowrank")
    probe = torch.randn(rows, x.shape[1], device=x.device, dtype=x.dtype)
    candidates = {"chain": lambda: lowrank_reference(probe, b, a, bias, act)}
    if dense_allowed():
        weight = dense_weight(b, a)
        candidates["dense"] = lambda: activation(F.linear(probe, weight, bias), act)
    if rows <= KERNEL_ROWS["split_rank"]:
        candidates["split_rank"] = lambda: kernels.split_rank(probe, b, a, bias, act)
    if rows <= KERNEL_ROWS["tiled"]:
        candidates["tiled"] = lambda: kernels.tiled(probe, b, a, bias, act)
    return _fastest("lowrank", _choices, shape, rows, candidates, timer, ("lowrank", (b, a)))


def lowrank_cuda(x: torch.Tensor, b: torch.Tensor, a: torch.Tensor, bias: Optional[torch.Tensor], act: str) -> torch.Tensor:
    """tngraph::lowrank on CUDA (tngraph.layers.lowrank): a Triton kernel, the chain or the dense product, as choose picks."""
    reason = kernel_unsupported(x, b, a, bias)
    if reason is not None:
        _fallback_once(reason)
        return lowrank_reference(x, b, a, bias, act)
    rows = x.reshape(-1, x.shape[-1])
    how = choose(rows, b, a, bias, act)
    if how == "chain":
        return lowrank_reference(x, b, a, bias, act)
    if how == "dense":
        return activation(F.linear(x, dense_weight(b, a), bias), act)
    kernels = load_kernels("lowrank")
    return getattr(kernels, how)(rows, b, a, bias, act).reshape(*x.shape[:-1], a.shape[0])
