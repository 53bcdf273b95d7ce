"""What Triton kernels load, element by element, counted in triton's interpreter (TRITON_INTERPRET=1).

A memory-bound kernel's time is the bytes it moves; on the CPU the interpreter can say exactly
which it loads and how often, so a design that rereads its weights shows up without a GPU (what
share of the rereads a GPU's caches would serve is not known here). Used by the kernel tests and
by tools/kernel_traffic.py.

    with count_loads(b=b, a=a) as loads:
        kernels.split_rank(x, b, a, None)
    loads["b"]          # per element of b, how many times it was loaded
    loads.other_bytes   # bytes loaded from anything not named (x, scratch, ...)
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch


class Loads(dict):
    """name -> per-element load counts (int64 arrays, flat), plus bytes loaded from elsewhere."""

    other_bytes: int = 0


@contextlib.contextmanager
def count_loads(**tensors: torch.Tensor) -> Iterator[Loads]:
    """Count the loads of interpreted Triton kernels into each named (contiguous CPU) tensor."""
    from triton.runtime import interpreter

    for name, t in tensors.items():
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"count_loads: {name} must be a contiguous CPU tensor (the interpreter runs on the CPU)")
    loads = Loads({name: np.zeros(t.numel(), dtype=np.int64) for name, t in tensors.items()})
    spans = [(name, t.data_ptr(), t.element_size(), t.numel()) for name, t in tensors.items()]
    builder = interpreter.interpreter_builder
    original = builder.create_masked_load

    def load(ptrs, mask, *rest):
        addresses = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.int64).ravel()
        named = np.zeros(addresses.shape, dtype=bool)
        for name, base, size, count in spans:
            inside = (addresses >= base) & (addresses < base + size * count)
            np.add.at(loads[name], (addresses[inside] - base) // size, 1)
            named |= inside
        loads.other_bytes += int((~named).sum()) * (ptrs.get_element_ty().primitive_bitwidth // 8)
        return original(ptrs, mask, *rest)

    builder.create_masked_load = load
    try:
        yield loads
    finally:
        del builder.create_masked_load  # back to the class's method
