"""The low-rank chain y = act(x @ B^T @ A^T + bias) with its intermediate kept on chip.

Two launch shapes (the dispatcher in tngraph.ops picks one by row count):
- `split_rank` (few rows, decode): programs over (output chunk, rank block). Each forms its rank
  block of t = x B^T in registers once (reading that slice of B), then walks its chunk of the
  outputs, adding t_blk A_blk^T into an fp32 output with atomics. A is read once; a rank block's
  slice of B by the programs that split its outputs, which are launched together (the chunk is
  the fastest grid axis) so that all but the first read it from L2. The number of chunks is the
  smallest that keeps ~4 programs per SM busy (at most one per BLOCK_N outputs): splitting the
  outputs into BLOCK_N-wide programs, as a plain 2-D grid does, would re-read and recompute each
  B slice N / BLOCK_N times. The partial sums go to a persistent fp32 workspace (`workspace`); the
  last rank block to finish a chunk (a per-chunk counter, acquire/release) reads its sums, adds the
  bias, applies the activation, stores y in x's dtype and zeroes the workspace and counter for the
  next call: one launch, no memset before and no cast after.
- `tiled` (more rows): one program per (row block, output block) loops over rank blocks, forming
  each t block over the input dimension and accumulating t_blk A_blk^T; bias and activation are
  applied in the epilogue. t is recomputed for every output block, so for many rows the unfused
  chain of two GEMMs wins; the dispatcher knows.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..ops import activation
from ._common import configs as _configs, row_bucket

ACTIVATIONS = {"none": 0, "gelu": 1, "silu": 2, "relu": 3}


# tl.dot needs every block dimension >= 16
_SPLIT_CONFIGS = _configs([dict(BLOCK_M=16, BLOCK_R=32, BLOCK_N=64, BLOCK_K=64), dict(BLOCK_M=16, BLOCK_R=64, BLOCK_N=128, BLOCK_K=64),
                           dict(BLOCK_M=16, BLOCK_R=32, BLOCK_N=128, BLOCK_K=128), dict(BLOCK_M=16, BLOCK_R=16, BLOCK_N=256, BLOCK_K=128)],
                          [4, 4, 4, 8])
_TILED_CONFIGS = _configs([dict(BLOCK_M=32, BLOCK_R=32, BLOCK_N=64, BLOCK_K=64), dict(BLOCK_M=64, BLOCK_R=64, BLOCK_N=64, BLOCK_K=64),
                           dict(BLOCK_M=64, BLOCK_R=32, BLOCK_N=128, BLOCK_K=64), dict(BLOCK_M=128, BLOCK_R=32, BLOCK_N=128, BLOCK_K=32)],
                          [4, 4, 8, 8])


@triton.jit
def _activate(y, ACT: tl.constexpr):
    if ACT == 1:  # exact GELU (erf), as torch's default
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 2:
        y = y * tl.sigmoid(y)
    elif ACT == 3:
        y = tl.maximum(y, 0.0)
    return y


@triton.autotune(configs=_SPLIT_CONFIGS, key=["M_BUCKET", "K", "R", "N"])
@triton.jit
def _split_rank_kernel(x_ptr, b_ptr, a_ptr, bias_ptr, y_ptr, acc_ptr, count_ptr, M, K, R, N, M_BUCKET,
                       sxm, sxk, sbr, sbk, san, sar, sym, syn, sam,
                       HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)  # output chunk: the fastest axis, so a rank block's chunks run together
    pid_r = tl.program_id(1)
    chunk = tl.cdiv(tl.cdiv(N, tl.num_programs(0)), BLOCK_N) * BLOCK_N
    n_start = pid_n * chunk
    n_end = tl.minimum(n_start + chunk, N)
    rm = tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + rm
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * sxm + rk[None, :] * sxk, mask=(rows[:, None] < M) & (rk[None, :] < K), other=0.0)
            b = tl.load(b_ptr + rr[None, :] * sbr + rk[:, None] * sbk, mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
            t += tl.dot(x, b, input_precision="ieee")
        t_low = t.to(a_ptr.dtype.element_ty)
        for n0 in range(n_start, n_end, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            a = tl.load(a_ptr + rn[None, :] * san + rr[:, None] * sar, mask=(rn[None, :] < n_end) & (rr[:, None] < R), other=0.0)
            part = tl.dot(t_low, a, input_precision="ieee")
            tl.atomic_add(acc_ptr + rows[:, None] * sam + rn[None, :], part, mask=(rows[:, None] < M) & (rn[None, :] < n_end),
                          sem="relaxed")
    # The last rank block to finish this chunk (a counter per chunk) finishes it: it reads the fp32
    # sums from the workspace (from L2, past the SM's own cache) and zeroes them for the next call,
    # adds the bias, applies the activation and stores y in its dtype; then it resets the counter.
    tl.debug_barrier()  # every thread's partial sums are issued before the counter is raised (release)
    arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
    if arrived == tl.num_programs(1) - 1:
        tl.debug_barrier()
        for m0 in range(0, M, BLOCK_M):
            rows = m0 + rm
            for n0 in range(n_start, n_end, BLOCK_N):
                rn = n0 + tl.arange(0, BLOCK_N)
                inside = (rows[:, None] < M) & (rn[None, :] < n_end)
                sums = acc_ptr + rows[:, None] * sam + rn[None, :]
                total = tl.load(sums, mask=inside, other=0.0, cache_modifier=".cg")  # from L2, where the atomics landed
                tl.store(sums, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), mask=inside)
                if HAS_BIAS:
                    bias = tl.load(bias_ptr + rn, mask=rn < n_end, other=0.0)
                    total += bias[None, :].to(tl.float32)
                total = _activate(total, ACT)
                tl.store(y_ptr + rows[:, None] * sym + rn[None, :] * syn, total.to(y_ptr.dtype.element_ty), mask=inside)
        tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed")


@triton.autotune(configs=_TILED_CONFIGS, key=["M_BUCKET", "K", "R", "N"])
@triton.jit
def _tiled_kernel(x_ptr, b_ptr, a_ptr, bias_ptr, y_ptr, M, K, R, N, M_BUCKET,
                  sxm, sxk, sbr, sbk, san, sar, sym, syn,
                  HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * sxm + rk[None, :] * sxk, mask=(rows[:, None] < M) & (rk[None, :] < K), other=0.0)
            b = tl.load(b_ptr + rr[None, :] * sbr + rk[:, None] * sbk, mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
            t += tl.dot(x, b, input_precision="ieee")
        a = tl.load(a_ptr + rn[None, :] * san + rr[:, None] * sar, mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
        acc += tl.dot(t.to(a.dtype), a, input_precision="ieee")
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0)
        acc += bias[None, :].to(tl.float32)
    acc = _activate(acc, ACT)
    tl.store(y_ptr + rows[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (rn[None, :] < N))


def _programs_to_fill(device: torch.device) -> int:
    """Programs that keep the device's streaming multiprocessors busy (4 per SM); 8 off the GPU
    (the interpreter), enough to split the outputs of the tests' small layers into several chunks."""
    if device.type == "cuda":
        return _sm_programs(device.index if device.index is not None else torch.cuda.current_device())
    return 8


@functools.lru_cache(maxsize=None)
def _sm_programs(index: int) -> int:
    return 4 * torch.cuda.get_device_properties(index).multi_processor_count


_workspaces: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(device: torch.device, rows: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """split-rank's fp32 sums (rows x n) and per-chunk counters, zero between calls (each call's
    finishing programs zero what they used), one pair per device, stream and output width, grown
    (by powers of two) when more rows come."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream, n)
    held = _workspaces.get(key)
    if held is None or held[0].shape[0] < rows:
        capacity = max(16, row_bucket(rows))
        held = (torch.zeros((capacity, n), device=device, dtype=torch.float32),
                torch.zeros(triton.cdiv(n, 16), device=device, dtype=torch.int32))
        _workspaces[key] = held
    return held


def split_rank(x: torch.Tensor, b: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None, act: str = "none") -> torch.Tensor:
    """x: (M, K), b: (R, K), a: (N, R) -> act(x b^T a^T + bias), (M, N), x's dtype; one launch."""
    M, K = x.shape
    R, N = b.shape[0], a.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    sums, counts = workspace(x.device, M, N)
    busy = _programs_to_fill(x.device)

    def grid(meta):
        rank_blocks = triton.cdiv(R, meta["BLOCK_R"])
        return (max(1, min(triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(busy, rank_blocks))), rank_blocks)

    _split_rank_kernel[grid](x, b, a, bias if bias is not None else y, y, sums, counts, M, K, R, N, row_bucket(M),
                             x.stride(0), x.stride(1), b.stride(0), b.stride(1), a.stride(0), a.stride(1), y.stride(0), y.stride(1),
                             sums.stride(0), HAS_BIAS=bias is not None, ACT=ACTIVATIONS[act])
    return y


def tiled(x: torch.Tensor, b: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None, act: str = "none") -> torch.Tensor:
    """x: (M, K), b: (R, K), a: (N, R) -> act(x b^T a^T + bias), (M, N), x's dtype."""
    M, K = x.shape
    R, N = b.shape[0], a.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))

    _tiled_kernel[grid](x, b, a, bias if bias is not None else y, y, M, K, R, N, row_bucket(M),
                        x.stride(0), x.stride(1), b.stride(0), b.stride(1), a.stride(0), a.stride(1), y.stride(0), y.stride(1),
                        HAS_BIAS=bias is not None, ACT=ACTIVATIONS[act])
    return y
