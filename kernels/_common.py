"""What the kernel modules share: the interpreter switch, autotune configs and the row bucket."""
from __future__ import annotations

import os

import triton

# triton's interpreter (CPU tests) runs every autotune candidate at numpy speed: one config there
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def configs(candidates: list[dict], warps: list[int]) -> list[triton.Config]:
    """Autotune configurations, only the first under the interpreter."""
    if INTERPRET:
        candidates, warps = candidates[:1], warps[:1]
    return [triton.Config(c, num_warps=w) for c, w in zip(candidates, warps)]


def row_bucket(rows: int) -> int:
    """Autotuning is keyed on the row count's power-of-two bucket, not every row count (prefill
    lengths vary; tuning again for each would cost more than it gains)."""
    return 1 << max(0, (rows - 1).bit_length())
