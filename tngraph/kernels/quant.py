"""y = x W'^T (+ bias) with W' = scale * (codes - zero) dequantized tile by tile inside the GEMM.

The weight never exists in float in memory: each program loads, per K step, its (BLOCK_K x
BLOCK_N) tile of the codes as stored by tngraph.layers.quant (int8 at 8 bits; uint8 holding 8 /
BITS codes along the input, first in the low bits, at 4 and 2), unpacks it in registers, applies
the tile's per-group scales and zero points (GROUP input columns share one; per channel: GROUP =
K), and accumulates x_tile @ w_tile in fp32. The bias is added in the epilogue and y is stored
in x's dtype. Weight-only: the activations stay in their float type (fp16 / bf16 / fp32; under
TRITON_INTERPRET=1 fp16 and fp32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, configs as _configs, launcher, needs_wide, row_bucket, tile, tuned

# tl.dot needs every block dimension >= 16; BLOCK_K divides every group offered (32/64/128) or is
# masked at the edge of a per-channel row
QUANT_CONFIGS = _configs([dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32), dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
                          dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64), dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32)],
                         [4, 4, 4, 8])


@triton.autotune(configs=tuned(QUANT_CONFIGS), key=["M_BUCKET", "K", "N", "BITS", "GROUP", "WIDE"])
@triton.jit
def _quant_kernel(x_ptr, c_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, M, K, N, M_BUCKET, GROUP,
                  sxm, sxk, scn, sck, ssn, ssg, szn, szg, sym, syn,
                  BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, WIDE: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    PER: tl.constexpr = 8 // BITS
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(tile(x_ptr, rm, rk, sxm, sxk, WIDE), mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        wmask = (rk[:, None] < K) & (rn[None, :] < N)
        # the (BLOCK_K x BLOCK_N) tile of W'^T: codes[n, k // PER] >> (k % PER) * BITS
        raw = tl.load(c_ptr + rn[None, :] * scn + (rk // PER)[:, None] * sck, mask=wmask, other=0)
        if BITS == 8:
            q = raw.to(tl.float32)  # int8 codes, signed
        else:
            q = ((raw.to(tl.int32) >> ((rk % PER) * BITS)[:, None]) & ((1 << BITS) - 1)).to(tl.float32)
        g = rk // GROUP
        scale = tl.load(s_ptr + rn[None, :] * ssn + g[:, None] * ssg, mask=wmask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + rn[None, :] * szn + g[:, None] * szg, mask=wmask, other=0).to(tl.float32)
        w = (q - zero) * scale
        if x.dtype == tl.float32:
            acc += tl.dot(x, w)
        else:
            acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(tile(y_ptr, rm, rn, sym, syn, WIDE), acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def supported(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int) -> str | None:
    """Why the kernel cannot run these inputs (None: it can)."""
    if not x.is_cuda and not INTERPRET:
        return "x is not on a GPU"
    if bits not in (8, 4, 2):
        return f"{bits}-bit codes (the kernel unpacks 8, 4 and 2)"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"x is {x.dtype}"
    stored = torch.int8 if bits == 8 else torch.uint8
    if codes.dtype != stored or not scales.is_floating_point():
        return f"codes of {codes.dtype} and scales of {scales.dtype} (the layer stores {stored} codes at {bits} bits, float scales)"
    width = codes.shape[1] * (8 // bits)
    if x.shape[-1] != width or width % scales.shape[1]:
        return f"x's width {x.shape[-1]} does not match the codes' {width} in {scales.shape[1]} groups"
    return None


def quant_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 bias: torch.Tensor | None = None, config: triton.Config | None = None) -> torch.Tensor:
    """x (..., K) @ W'^T (+ bias), W' (N x K) the quantized layer's weight (tngraph.tn.quant.layer_tensors);
    `config` runs one configuration of QUANT_CONFIGS instead of autotuning (tests)."""
    reason = supported(x, codes, scales, bits)
    if reason is not None:
        raise ValueError(f"the quantized GEMM kernel cannot run this: {reason}")
    rows = x.reshape(-1, x.shape[-1])
    m, k = rows.shape
    n = codes.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    group = k // scales.shape[1]
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    launcher(_quant_kernel, config)[grid](
        rows, codes, scales, zeros, bias if bias is not None else y, y, m, k, n, row_bucket(m), group,
        rows.stride(0), rows.stride(1), codes.stride(0), codes.stride(1), scales.stride(0), scales.stride(1),
        zeros.stride(0), zeros.stride(1), y.stride(0), y.stride(1),
        BITS=bits, HAS_BIAS=bias is not None, WIDE=needs_wide(rows, y))
    return y.reshape(*x.shape[:-1], n)
