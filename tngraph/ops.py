"""tngraph's custom ops (namespace `tngraph`), which the fuse pass puts in place of factor chains.

Each op is a `torch.library.custom_op` with a fake (meta) implementation, so dynamo, torch.export
and Inductor see one opaque node of known output shape. The default implementation is the pure-torch
reference (the CPU path, bit-identical to the unfused chain); on CUDA a Triton kernel from
`tngraph.kernels` runs when it supports the inputs, and otherwise the reference does, with the
reason logged once.

- tngraph::lowrank(x, b, a, bias, act) = act(x @ b^T @ a^T + bias), act in ACTIVATIONS.
- tngraph::network(x, cores, equation, in_dims, out_features, bias) = a tensor-network layer
  (Tucker, TT, TR, CP, Kronecker, Monarch): x's features unflattened to in_dims, contracted with
  the cores by `equation` ("...<in>,<core>,...->...<out>"), flattened to out_features, + bias.
  The reference is torch.einsum (opt_einsum's contraction path); on CUDA two-core tensor trains
  run kernels/tt.py.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ACTIVATIONS = ("none", "gelu", "silu", "relu")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The CUDA dispatch picks, per (device, dtype, shape, bias, activation) and row-count bucket, the
# fastest of the split-rank kernel, the tiled kernel and the two-GEMM chain (cuBLAS), timed once on
# the first call in that bucket (bucket = the smallest of ROW_BUCKETS >= the row count). Kernels are
# candidates only up to their row limits. TNGRAPH_LOWRANK=split_rank|tiled|chain forces a choice.
ROW_BUCKETS = (1, 16, 128, 2048)
KERNEL_ROWS = {"split_rank": 64, "tiled": 2048}
_choices: dict[tuple, str] = {}
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


@torch.library.custom_op("tngraph::lowrank", mutates_args=())
def lowrank(x: torch.Tensor, b: torch.Tensor, a: torch.Tensor, bias: Optional[torch.Tensor], act: str) -> torch.Tensor:
    """act(x @ b^T @ a^T + bias): x (..., K), b (R, K), a (N, R), bias (N,) or None."""
    return lowrank_reference(x, b, a, bias, act)


@lowrank.register_fake
def _lowrank_fake(x, b, a, bias, act):
    torch._check(x.shape[-1] == b.shape[1], lambda: f"tngraph::lowrank: x has {x.shape[-1]} features, b expects {b.shape[1]}")
    torch._check(a.shape[1] == b.shape[0], lambda: f"tngraph::lowrank: a has rank {a.shape[1]}, b has {b.shape[0]}")
    return x.new_empty((*x.shape[:-1], a.shape[0]))


def load_kernels(name: str = "lowrank"):
    """A Triton kernels module (tngraph.kernels.<name>: lowrank, tt); raises ImportError without triton.

    Installed, kernels/ is the package tngraph.kernels; in a source checkout run without installing
    (PYTHONPATH=.), it is loaded from the kernels/ folder beside tngraph/."""
    import importlib
    import sys

    package = f"{__package__}.kernels"
    if package not in sys.modules:
        try:
            importlib.import_module(package)
        except ModuleNotFoundError as exc:
            if exc.name != package:
                raise
            import importlib.util
            import pathlib

            root = pathlib.Path(__file__).resolve().parents[1] / "kernels"
            spec = importlib.util.spec_from_file_location(package, root / "__init__.py", submodule_search_locations=[str(root)])
            if spec is None or spec.loader is None:
                raise
            module = importlib.util.module_from_spec(spec)
            sys.modules[package] = module
            spec.loader.exec_module(module)
    return importlib.import_module(f"{package}.{name}")


def _lowrank_setup(ctx, inputs, output) -> None:
    x, b, a, bias, act = inputs
    ctx.save_for_backward(x, b, a, bias)
    ctx.act = act


def _lowrank_backward(ctx, grad):
    """Gradients of act(x b^T a^T + bias): the intermediate is recomputed, not kept (memory)."""
    x, b, a, bias = ctx.saved_tensors
    hidden = F.linear(x, b)
    if ctx.act != "none":
        with torch.enable_grad():
            z = F.linear(hidden, a, bias).detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(activation(z, ctx.act), z, grad)
    flat_grad = grad.reshape(-1, a.shape[0])
    grad_hidden = grad @ a
    grad_a = flat_grad.T @ hidden.reshape(-1, a.shape[1])
    grad_b = grad_hidden.reshape(-1, b.shape[0]).T @ x.reshape(-1, b.shape[1])
    grad_bias = flat_grad.sum(0) if bias is not None else None
    return grad_hidden @ b, grad_b, grad_a, grad_bias, None


lowrank.register_autograd(_lowrank_backward, setup_context=_lowrank_setup)


@functools.lru_cache(maxsize=None)
def _fallback_once(reason: str, op: str = "lowrank") -> None:
    log.warning("tngraph::%s runs its torch reference on the GPU: %s", op, reason)


def kernel_unsupported(x: torch.Tensor, b: torch.Tensor, a: torch.Tensor, bias: Optional[torch.Tensor]) -> str | None:
    """Why the Triton kernel cannot take these inputs, or None."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'tngraph[gpu]')"
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} (kernels take float16, bfloat16, float32)"
    tensors = [t for t in (x, b, a, bias) if t is not None]
    if any(t.dtype != x.dtype for t in tensors):
        return "inputs of mixed dtypes"
    if any(t.device != x.device for t in tensors):
        return "inputs on different devices"
    return None


def bucket(rows: int) -> int:
    return next((b for b in ROW_BUCKETS if rows <= b), ROW_BUCKETS[-1])


def network_reference(x: torch.Tensor, cores: list[torch.Tensor], equation: str, in_dims: list[int], out_features: int,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The unfused tensor-network layer, op for op as the factorize pass writes it."""
    n_out = len(equation.split("->")[1].replace("...", ""))
    y = torch.flatten(torch.einsum(equation, [torch.unflatten(x, -1, in_dims), *cores]), -n_out, -1)
    return y + bias if bias is not None else y


@torch.library.custom_op("tngraph::network", mutates_args=())
def network(x: torch.Tensor, cores: list[torch.Tensor], equation: str, in_dims: list[int], out_features: int,
            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A tensor-network linear layer: x (..., prod(in_dims)) -> (..., out_features)."""
    return network_reference(x, cores, equation, in_dims, out_features, bias)


@network.register_fake
def _network_fake(x, cores, equation, in_dims, out_features, bias):
    size = 1
    for d in in_dims:
        size *= d
    torch._check(x.shape[-1] == size, lambda: f"tngraph::network: x has {x.shape[-1]} features, the network takes {size}")
    return x.new_empty((*x.shape[:-1], out_features))


def tt2_layout(equation: str, cores: list[torch.Tensor]) -> bool:
    """Whether `equation` is a two-core tensor train "...pq,Ppr,rQq->...PQ" (the TT format's own
    layout), which kernels/tt.py contracts in one kernel."""
    lhs, out = equation.replace("...", "").split("->")
    parts = lhs.split(",")
    if len(parts) != 3 or len(cores) != 2 or any(len(p) != n for p, n in zip(parts, (2, 3, 3))) or len(out) != 2:
        return False
    (p, q), (P, p1, r), (r2, Q, q1) = parts
    return (p1, q1, r2) == (p, q, r) and out == P + Q and len(set(P + Q + p + q + r)) == 5


@network.register_kernel("cuda")
def _network_cuda(x, cores, equation, in_dims, out_features, bias):
    reason = kernel_unsupported(x, cores[0], cores[-1], bias)
    if reason is None and not tt2_layout(equation, cores):
        reason = "only two-core tensor trains have a kernel so far"
    if reason is not None:
        _fallback_once(reason, "network")
        return network_reference(x, cores, equation, in_dims, out_features, bias)
    rows = x.reshape(-1, x.shape[-1])
    return load_kernels("tt").tt2(rows, cores[0], cores[1], bias).reshape(*x.shape[:-1], out_features)


def _do_bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn)


def choose(x: torch.Tensor, b: torch.Tensor, a: torch.Tensor, bias: Optional[torch.Tensor], act: str, *, timer=None) -> str:
    """The implementation of tngraph::lowrank for these 2-D inputs: "split_rank", "tiled" or "chain";
    measured once per shape and row bucket (timer(fn) -> time), then cached."""
    import os

    forced = os.environ.get("TNGRAPH_LOWRANK")
    if forced:
        if forced not in ("split_rank", "tiled", "chain"):
            raise ValueError(f"TNGRAPH_LOWRANK={forced!r}: choose split_rank, tiled or chain")
        return forced
    rows = bucket(x.shape[0])
    key = (str(x.device), x.dtype, x.shape[1], b.shape[0], a.shape[0], bias is not None, act, rows)
    if key in _choices:
        return _choices[key]
    kernels = load_kernels("lowrank")
    probe = torch.randn(rows, x.shape[1], device=x.device, dtype=x.dtype)
    candidates = {"chain": lambda: lowrank_reference(probe, b, a, bias, act)}
    if rows <= KERNEL_ROWS["split_rank"]:
        candidates["split_rank"] = lambda: kernels.split_rank(probe, b, a, bias, act)
    if rows <= KERNEL_ROWS["tiled"]:
        candidates["tiled"] = lambda: kernels.tiled(probe, b, a, bias, act)
    timed = {name: (timer or _do_bench)(fn) for name, fn in candidates.items()}
    _choices[key] = min(timed, key=timed.get)
    log.info("tngraph::lowrank %s, %d rows: %s (%s)", key[:7], rows, _choices[key], ", ".join(f"{k} {v:.4g}" for k, v in timed.items()))
    return _choices[key]


@lowrank.register_kernel("cuda")
def _lowrank_cuda(x, b, a, bias, act):
    reason = kernel_unsupported(x, b, a, bias)
    if reason is not None:
        _fallback_once(reason)
        return lowrank_reference(x, b, a, bias, act)
    rows = x.reshape(-1, x.shape[-1])
    how = choose(rows, b, a, bias, act)
    if how == "chain":
        return lowrank_reference(x, b, a, bias, act)
    kernels = load_kernels("lowrank")
    return getattr(kernels, how)(rows, b, a, bias, act).reshape(*x.shape[:-1], a.shape[0])
