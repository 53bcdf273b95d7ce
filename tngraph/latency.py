"""Measured latency of a linear layer, dense and as a low-rank chain, for latency budgets.

The cost of a candidate is what the allocator spends its budget on. For budget_kind="latency" it
is the time of the layer on this machine at `rows` input rows: the dense linear, and the low-rank
chain x·Bᵀ·Aᵀ at a few ranks with linear interpolation in between (the chain's work grows
linearly with the rank). Timings are cached per shape, so a model with a few distinct layer shapes
is timed a few times. Timings vary from run to run: allocations under a latency budget may too.
"""
from __future__ import annotations

import logging
import statistics
import time
from functools import lru_cache

import torch

log = logging.getLogger(__name__)

REPEATS = 7


def _time(fn, repeats: int = REPEATS) -> float:
    fn()  # warm-up (allocations, kernel choice)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@lru_cache(maxsize=256)
def dense_seconds(out_features: int, in_features: int, bias: bool, rows: int, dtype: torch.dtype = torch.float32) -> float:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    w = torch.randn(out_features, in_features, generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    with torch.no_grad():
        return _time(lambda: torch.nn.functional.linear(x, w, b))


@lru_cache(maxsize=4096)
def lowrank_seconds(out_features: int, in_features: int, rank: int, bias: bool, rows: int, dtype: torch.dtype = torch.float32) -> float:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    a = torch.randn(out_features, rank, generator=gen).to(dtype)
    bmat = torch.randn(rank, in_features, generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    f = torch.nn.functional.linear
    with torch.no_grad():
        return _time(lambda: f(f(x, bmat), a, b))


def lowrank_curve(out_features: int, in_features: int, ranks: list[int], bias: bool, rows: int,
                  dtype: torch.dtype = torch.float32, points: int = 5) -> list[float]:
    """Seconds of the low-rank chain at each of `ranks`: measured at `points` ranks spread over
    them, linear in between (and flat beyond the ends)."""
    if not ranks:
        return []
    lo, hi = min(ranks), max(ranks)
    anchors = sorted({lo + (hi - lo) * k // max(points - 1, 1) for k in range(points)})
    times = [lowrank_seconds(out_features, in_features, r, bias, rows, dtype) for r in anchors]
    result = []
    for r in ranks:
        if r <= anchors[0] or len(anchors) == 1:
            result.append(times[0])
            continue
        for (r0, t0), (r1, t1) in zip(zip(anchors, times), zip(anchors[1:], times[1:])):
            if r <= r1:
                result.append(t0 + (t1 - t0) * (r - r0) / max(r1 - r0, 1))
                break
        else:
            result.append(times[-1])
    return result
