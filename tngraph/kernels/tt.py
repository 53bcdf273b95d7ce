"""The two-core tensor-train (MPO) layer y[m, A, B] = sum_{a,b,r} x[m, a, b] G1[A, a, r] G2[r, B, b]
in one kernel, its intermediate t = x_b G1[A] kept on chip.

One program per (row block, output index A, output block of B). For each input index b it forms
t = x[:, :, b] @ G1[A] (rows x rank, rank in blocks) and adds t @ G2[:, B, b] to its accumulator;
bias is added in the epilogue. Every dimension is masked: none needs to be a power of two.
Offsets into x and y, which grow with the rows, are int64 when x or y is addressed at or past
2**31 elements (WIDE, _common.needs_wide), else int32 (_common.tile); the cores' stay int32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import configs, launcher, needs_wide, row_bucket, tile, tuned

CONFIGS = configs([dict(BLOCK_M=32, BLOCK_A=32, BLOCK_R=32, BLOCK_B=32), dict(BLOCK_M=64, BLOCK_A=64, BLOCK_R=64, BLOCK_B=64),
                    dict(BLOCK_M=16, BLOCK_A=64, BLOCK_R=64, BLOCK_B=128)], [4, 4, 8])


@triton.autotune(configs=tuned(CONFIGS), key=["M_BUCKET", "NA", "Na", "R", "NB", "Nb", "WIDE"])
@triton.jit
def _tt2_kernel(x_ptr, g1_ptr, g2_ptr, bias_ptr, y_ptr, M, NA, Na, R, NB, Nb, M_BUCKET,
                sxm, sxk, s1A, s1a, s1r, s2r, s2B, s2b, sym, syn,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_B: tl.constexpr, WIDE: tl.constexpr):
    pid_m = tl.program_id(0)
    out_a = tl.program_id(1)  # the output index A
    pid_b = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ob = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)  # output indices B
    acc = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for ib in range(0, Nb):  # input index b
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for a0 in range(0, Na, BLOCK_A):
                ia = a0 + tl.arange(0, BLOCK_A)
                # x[m, a, b] lives at feature a * Nb + b
                x = tl.load(tile(x_ptr, rows, ia * Nb + ib, sxm, sxk, WIDE), mask=(rows[:, None] < M) & (ia[None, :] < Na), other=0.0)
                g1 = tl.load(g1_ptr + out_a * s1A + ia[:, None] * s1a + rr[None, :] * s1r,
                             mask=(ia[:, None] < Na) & (rr[None, :] < R), other=0.0)
                t += tl.dot(x, g1, input_precision="ieee")
            g2 = tl.load(g2_ptr + rr[:, None] * s2r + ob[None, :] * s2B + ib * s2b,
                         mask=(rr[:, None] < R) & (ob[None, :] < NB), other=0.0)
            acc += tl.dot(t.to(g2.dtype), g2, input_precision="ieee")
    cols = out_a * NB + ob  # y[m, A, B] lives at feature A * NB + B
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=ob < NB, other=0.0)
        acc += bias[None, :].to(tl.float32)
    tl.store(tile(y_ptr, rows, cols, sym, syn, WIDE), acc.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (ob[None, :] < NB))


def tt2(x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, bias: torch.Tensor | None,
        config: triton.Config | None = None) -> torch.Tensor:
    """x: (M, Na * Nb), g1: (NA, Na, R), g2: (R, NB, Nb) -> (M, NA * NB) (autotuned, or with
    `config`, one of CONFIGS)."""
    M = x.shape[0]
    NA, Na, R = g1.shape
    _, NB, Nb = g2.shape
    y = torch.empty((M, NA * NB), device=x.device, dtype=x.dtype)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), NA, triton.cdiv(NB, meta["BLOCK_B"]))

    launcher(_tt2_kernel, config)[grid](x, g1, g2, bias if bias is not None else y, y, M, NA, Na, R, NB, Nb, row_bucket(M),
                      x.stride(0), x.stride(1), g1.stride(0), g1.stride(1), g1.stride(2), g2.stride(0), g2.stride(1), g2.stride(2),
                      y.stride(0), y.stride(1), HAS_BIAS=bias is not None, WIDE=needs_wide(x, y))
    return y
