"""What the kernel modules share: the interpreter switch, autotune configs, the row bucket and int64
tile offsets."""
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


@triton.jit
def offsets(i, j, si, sj):
    """The element offsets i * si + j * sj of a tile (rows i down, columns j across) in int64: the
    activations and outputs grow with the rows, and past 2**31 elements (or in a view with large
    strides) int32 products would wrap."""
    return i.to(tl.int64)[:, None] * si + j.to(tl.int64)[None, :] * sj
