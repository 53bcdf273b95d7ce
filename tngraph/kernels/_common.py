"""What the kernel modules share: the interpreter switch, autotune configs, the row bucket and tile
offsets (int64 only where a tensor reaches 2**31 elements: `needs_wide` on the host picks WIDE)."""
from __future__ import annotations

import os

import triton
import triton.language as tl

# triton's interpreter (CPU tests) runs every autotune candidate at numpy speed: one config there
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# TNGRAPH_AUTOTUNE=0: the first configuration only, untimed (tests on a GPU, which run every
# configuration explicitly and need not compile all of them for each shape they try)
AUTOTUNE = not INTERPRET and os.environ.get("TNGRAPH_AUTOTUNE", "1") != "0"


def configs(candidates: list[dict], warps: list[int]) -> list[triton.Config]:
    """A kernel's configurations (the tests run each one, `config=` of the launchers)."""
    return [triton.Config(c, num_warps=w) for c, w in zip(candidates, warps)]


def tuned(every: list[triton.Config]) -> list[triton.Config]:
    """The configurations autotuning times: all of them, only the first under the interpreter or
    with TNGRAPH_AUTOTUNE=0."""
    return every if AUTOTUNE else every[:1]


def launcher(kernel, config: triton.Config | None):
    """kernel[grid](...) autotuned, or with `config` as given (the JIT function under the autotuner)."""
    if config is None:
        return kernel
    return _Fixed(kernel.fn, config)


class _Fixed:
    def __init__(self, fn, config: triton.Config):
        self.fn, self.config = fn, config

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            return self.fn[grid](*args, **kwargs, **self.config.kwargs, num_warps=self.config.num_warps)

        return launch


def row_bucket(rows: int) -> int:
    """Autotuning is keyed on the row count's power-of-two bucket, not every row count (prefill
    lengths vary; tuning again for each would cost more than it gains)."""
    return 1 << max(0, (rows - 1).bit_length())


# elements a tensor's offsets must reach before the kernels address it in int64 (int32 wraps past it)
WIDE_ELEMENTS = 2**31


def extent(t: "torch.Tensor | int | None") -> int:
    """Elements addressed from a tensor's data pointer, 1 + sum((size - 1) * stride) (0 when empty,
    the storage offset excluded: the kernels get data_ptr); an int is taken as an extent already."""
    if t is None:
        return 0
    if isinstance(t, int):
        return t
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def needs_wide(*tensors: "torch.Tensor | int | None") -> bool:
    """WIDE for a launch: whether any of these (tensors, or element extents such as a scratch's
    used part) is addressed at or past 2**31 elements, where int32 offsets would wrap. Otherwise
    the kernels keep int32 offsets, which take fewer registers (every tile offset is two registers
    in int64, e.g. split-rank 16/16/32/256 in fp16 on sm_90: 168 registers, 255 all in int64)."""
    return any(extent(t) >= WIDE_ELEMENTS for t in tensors)


@triton.jit
def wide(i, WIDE: tl.constexpr):
    """i in int64 when WIDE, as it is otherwise (an index multiplied before it goes into `tile`)."""
    if WIDE:
        return tl.cast(i, tl.int64)  # tl.cast: under the interpreter a loop index is a Python int
    else:
        return i


@triton.jit
def offsets(i, j, si, sj, WIDE: tl.constexpr):
    """The element offsets i * si + j * sj of a tile (rows i down, columns j across), in int64 when
    WIDE (the launcher's `needs_wide`: the activations, outputs and scratch grow with the rows, and
    past 2**31 elements, or in a view with large strides, int32 products would wrap), else int32."""
    if WIDE:
        return i.to(tl.int64)[:, None] * si + j.to(tl.int64)[None, :] * sj
    else:
        return i[:, None] * si + j[None, :] * sj


@triton.jit
def tile(ptr, i, j, si, sj, WIDE: tl.constexpr):
    """The pointers ptr + offsets(i, j, si, sj, WIDE) of a tile. Not WIDE, the rows' offsets are
    added to ptr before the columns', in two int32 steps as the kernels did before WIDE: one int32
    sum added once takes more registers in some configurations (split-rank 16/64/32/128 in fp16 on
    sm_90: 162 against 128) and fewer in others, so the int32 kernels stay as they were."""
    if WIDE:
        return ptr + offsets(i, j, si, sj, WIDE)
    else:
        return ptr + i[:, None] * si + j[None, :] * sj
