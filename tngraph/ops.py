"""tngraph's custom ops (namespace `tngraph`), which the fuse pass puts in place of factor chains.

Each op is a `torch.library.custom_op` with a fake (meta) implementation, so dynamo, torch.export
and Inductor see one opaque node of known output shape. The default implementation is the pure-torch
reference (the CPU path, bit-identical to the unfused chain); on CUDA a Triton kernel from
`tngraph.kernels` runs when it supports the inputs, and otherwise the reference does, with the
reason logged once.

- tngraph::lowrank(x, b, a, bias, act) = act(x @ b^T @ a^T + bias), act in ACTIVATIONS.
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
# row-count buckets of the CUDA dispatch: at most SPLIT_RANK_ROWS rows the split-rank kernel, at most
# TILED_ROWS the tiled fused kernel, beyond that the two-GEMM chain (cuBLAS)
SPLIT_RANK_ROWS = 16
TILED_ROWS = 256


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


def load_kernels():
    """The Triton kernels module (tngraph.kernels.lowrank); raises ImportError without triton.

    Installed, kernels/ is the package tngraph.kernels; in a source checkout run without installing
    (PYTHONPATH=.), it is loaded from the kernels/ folder beside tngraph/."""
    try:
        from .kernels import lowrank as module
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.kernels":
            raise
        import importlib.util
        import pathlib
        import sys

        root = pathlib.Path(__file__).resolve().parents[1] / "kernels"
        spec = importlib.util.spec_from_file_location(f"{__package__}.kernels", root / "__init__.py", submodule_search_locations=[str(root)])
        if spec is None or spec.loader is None:
            raise
        package = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = package
        spec.loader.exec_module(package)
        from .kernels import lowrank as module
    return module


@functools.lru_cache(maxsize=None)
def _fallback_once(reason: str) -> None:
    log.warning("tngraph::lowrank runs its torch reference on the GPU: %s", reason)


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


@lowrank.register_kernel("cuda")
def _lowrank_cuda(x, b, a, bias, act):
    reason = kernel_unsupported(x, b, a, bias)
    if reason is not None:
        _fallback_once(reason)
        return lowrank_reference(x, b, a, bias, act)
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > TILED_ROWS:
        return lowrank_reference(x, b, a, bias, act)
    kernels = load_kernels()
    run = kernels.split_rank if rows.shape[0] <= SPLIT_RANK_ROWS else kernels.tiled
    return run(rows, b, a, bias, act).reshape(*x.shape[:-1], a.shape[0])
