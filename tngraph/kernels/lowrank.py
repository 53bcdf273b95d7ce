"""The low-rank chain y = act(x @ B^T @ A^T + bias) with its intermediate kept on chip.

Two launch shapes (the dispatcher in tngraph.ops picks one by row count):
- `split_rank` (few rows, decode: memory-bound, so the aim is every weight byte read once, by
  all SMs at once, in one launch). Its programs do one of two kinds of work, by a ticket each
  takes on arrival: the first rank blocks x K chunks tickets each form one tile's share of
  t = x B^T (reading that tile of B, and only it) into an fp32 slab; the last K chunk of a rank
  block to finish sums the slabs into t (M x R, a few KiB). The remaining tickets, one per output
  chunk, wait until t is complete and form act(t A_chunk^T + bias), reading their rows of A and
  storing y in x's dtype. So B and A are each read once (t is reread, from L2), the chunk counts
  keep ~4 programs per SM busy in each phase, and nothing is cleared or cast around the launch
  (the last program returns the counters to zero). Waiting on tickets rather than program ids
  cannot deadlock: a waiting program took its ticket after all t-forming tickets were taken by
  running programs, which wait on nothing. The earlier design (each program forming its rank
  block's t over all of K, then adding into a slice of the outputs) read B once per output chunk
  from L2: about 4 x SMs x BLOCK_R x K elements a call whatever the rank, 13 times the weights of
  a 5120-wide layer at 25 % kept on an H200.
- `tiled` (more rows): one program per (row block, output block) loops over rank blocks, forming
  each t block over the input dimension and accumulating t_blk A_blk^T; bias and activation are
  applied in the epilogue. t is recomputed for every output block, so for many rows the unfused
  chain of two GEMMs wins; the dispatcher knows.

Offsets into x, y and the scratch, which grow with the rows, are int64 when the launch needs it
(WIDE: x, y or the scratch addressed at or past 2**31 elements, _common.needs_wide) and int32
otherwise, as they take fewer registers (_common.tile); the weights' stay int32 (a factor holds
far fewer than 2**31 elements).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import configs as _configs, launcher, needs_wide, row_bucket, tile, tuned, wide

ACTIVATIONS = {"none": 0, "gelu": 1, "silu": 2, "relu": 3}


# tl.dot needs every block dimension >= 16
# split-rank: small output blocks give the y-forming phase more programs (N / BLOCK_N of them at
# most); the 64-row tile is for more than 16 rows, where a 16-row tile rereads each weight tile
# (from cache) once per 16 rows
SPLIT_CONFIGS = _configs([dict(BLOCK_M=16, BLOCK_R=32, BLOCK_N=64, BLOCK_K=64), dict(BLOCK_M=16, BLOCK_R=64, BLOCK_N=32, BLOCK_K=128),
                           dict(BLOCK_M=16, BLOCK_R=32, BLOCK_N=128, BLOCK_K=128), dict(BLOCK_M=16, BLOCK_R=16, BLOCK_N=32, BLOCK_K=256),
                           dict(BLOCK_M=64, BLOCK_R=32, BLOCK_N=64, BLOCK_K=64)],
                          [4, 4, 4, 2, 4])
TILED_CONFIGS = _configs([dict(BLOCK_M=32, BLOCK_R=32, BLOCK_N=64, BLOCK_K=64), dict(BLOCK_M=64, BLOCK_R=64, BLOCK_N=64, BLOCK_K=64),
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


@triton.jit
def _chunking(size, parts, BLOCK: tl.constexpr):
    """(chunk, chunks): `size` split into at most `parts` chunks, each a whole number of BLOCKs
    (at least one); split_plan() is the same on the host."""
    chunk = tl.cdiv(tl.cdiv(size, tl.maximum(parts, 1)), BLOCK) * BLOCK
    return chunk, tl.cdiv(size, chunk)


@triton.autotune(configs=tuned(SPLIT_CONFIGS), key=["M_BUCKET", "K", "R", "N", "WIDE"])
@triton.jit
def _split_rank_kernel(x_ptr, b_ptr, a_ptr, bias_ptr, y_ptr, part_ptr, t_ptr, count_ptr, M, K, R, N, M_BUCKET, BUSY,
                       sxm, sxk, sbr, sbk, san, sar, sym, syn,
                       HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WIDE: tl.constexpr):
    rank_blocks = tl.cdiv(R, BLOCK_R)
    k_chunk, k_chunks = _chunking(K, tl.cdiv(BUSY, rank_blocks), BLOCK_K)
    n_chunk, n_chunks = _chunking(N, BUSY, BLOCK_N)
    first = rank_blocks * k_chunks  # tickets below this form t; the rest form y
    rm = tl.arange(0, BLOCK_M)
    # Work goes by ticket, taken in arrival order, not by program id: a program waiting for t
    # (ticket >= first) took its ticket after every t-forming ticket was taken by a running
    # program, and those never wait, so the wait always ends (no assumption on launch order).
    # count_ptr: [0] tickets, [1] rank blocks of t complete, [2] output chunks done, [3 + j]
    # K chunks of rank block j done; all zero again when the call ends.
    ticket = tl.atomic_add(count_ptr, 1, sem="relaxed")
    if ticket < first:
        # t[:, block] over one K chunk: this program's tile of B, read once
        block = ticket // k_chunks
        piece = ticket % k_chunks
        rr = block * BLOCK_R + tl.arange(0, BLOCK_R)
        k_start = piece * k_chunk
        k_end = tl.minimum(k_start + k_chunk, K)
        for m0 in range(0, M, BLOCK_M):
            rows = m0 + rm
            t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(k_start, k_end, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(tile(x_ptr, rows, rk, sxm, sxk, WIDE), mask=(rows[:, None] < M) & (rk[None, :] < k_end), other=0.0)
                b = tl.load(b_ptr + rr[None, :] * sbr + rk[:, None] * sbk, mask=(rr[None, :] < R) & (rk[:, None] < k_end),
                            other=0.0)
                t += tl.dot(x, b, input_precision="ieee")
            tl.store(tile(part_ptr, wide(piece, WIDE) * M + rows, rr, R, 1, WIDE), t, mask=(rows[:, None] < M) & (rr[None, :] < R))
        # the last K chunk of this rank block to finish sums the partial products into t
        tl.debug_barrier()  # every thread's stores are issued before the count is raised (release)
        arrived = tl.atomic_add(count_ptr + 3 + block, 1, sem="acq_rel")
        if arrived == k_chunks - 1:
            tl.debug_barrier()
            for m0 in range(0, M, BLOCK_M):
                rows = m0 + rm
                inside = (rows[:, None] < M) & (rr[None, :] < R)
                t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for p in range(0, k_chunks):  # from L2 (.cg): other programs wrote them
                    t += tl.load(tile(part_ptr, wide(p, WIDE) * M + rows, rr, R, 1, WIDE), mask=inside, other=0.0,
                                 cache_modifier=".cg")
                tl.store(tile(t_ptr, rows, rr, R, 1, WIDE), t.to(t_ptr.dtype.element_ty), mask=inside)
            tl.atomic_xchg(count_ptr + 3 + block, 0, sem="relaxed")
            tl.debug_barrier()
            tl.atomic_add(count_ptr + 1, 1, sem="release")
    else:
        # y[:, chunk] = act(t A[chunk]^T + bias) once t is complete: this program's rows of A, read once
        piece = ticket - first
        n_start = piece * n_chunk
        n_end = tl.minimum(n_start + n_chunk, N)
        ready = tl.load(count_ptr + 1, volatile=True)
        while ready < rank_blocks:
            ready = tl.load(count_ptr + 1, volatile=True)
        tl.atomic_add(count_ptr + 1, 0, sem="acquire")
        tl.debug_barrier()
        for m0 in range(0, M, BLOCK_M):
            rows = m0 + rm
            for n0 in range(n_start, n_end, BLOCK_N):
                rn = n0 + tl.arange(0, BLOCK_N)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for r0 in range(0, R, BLOCK_R):
                    rr = r0 + tl.arange(0, BLOCK_R)
                    t = tl.load(tile(t_ptr, rows, rr, R, 1, WIDE), mask=(rows[:, None] < M) & (rr[None, :] < R), other=0.0,
                                cache_modifier=".cg")
                    a = tl.load(a_ptr + rn[None, :] * san + rr[:, None] * sar, mask=(rn[None, :] < n_end) & (rr[:, None] < R),
                                other=0.0)
                    acc += tl.dot(t, a, input_precision="ieee")
                if HAS_BIAS:
                    bias = tl.load(bias_ptr + rn, mask=rn < n_end, other=0.0)
                    acc += bias[None, :].to(tl.float32)
                acc = _activate(acc, ACT)
                tl.store(tile(y_ptr, rows, rn, sym, syn, WIDE), acc.to(y_ptr.dtype.element_ty),
                         mask=(rows[:, None] < M) & (rn[None, :] < n_end))
        # the last output chunk: every ticket is taken and t is read, so the counters go back to zero
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + 2, 1, sem="acq_rel")
        if done == n_chunks - 1:
            tl.atomic_xchg(count_ptr + 1, 0, sem="relaxed")
            tl.atomic_xchg(count_ptr + 2, 0, sem="relaxed")
            tl.atomic_xchg(count_ptr, 0, sem="relaxed")


@triton.autotune(configs=tuned(TILED_CONFIGS), key=["M_BUCKET", "K", "R", "N", "WIDE"])
@triton.jit
def _tiled_kernel(x_ptr, b_ptr, a_ptr, bias_ptr, y_ptr, M, K, R, N, M_BUCKET,
                  sxm, sxk, sbr, sbk, san, sar, sym, syn,
                  HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WIDE: tl.constexpr):
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
            x = tl.load(tile(x_ptr, rows, rk, sxm, sxk, WIDE), mask=(rows[:, None] < M) & (rk[None, :] < K), other=0.0)
            b = tl.load(b_ptr + rr[None, :] * sbr + rk[:, None] * sbk, mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
            t += tl.dot(x, b, input_precision="ieee")
        a = tl.load(a_ptr + rn[None, :] * san + rr[:, None] * sar, mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
        acc += tl.dot(t.to(a.dtype), a, input_precision="ieee")
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0)
        acc += bias[None, :].to(tl.float32)
    acc = _activate(acc, ACT)
    tl.store(tile(y_ptr, rows, rn, sym, syn, WIDE), acc.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (rn[None, :] < N))


def _programs_to_fill(device: torch.device) -> int:
    """Programs that keep the device's streaming multiprocessors busy (4 per SM); 8 off the GPU
    (the interpreter), enough to split the outputs of the tests' small layers into several chunks."""
    if device.type == "cuda":
        return _sm_programs(device.index if device.index is not None else torch.cuda.current_device())
    return 8


@functools.lru_cache(maxsize=None)
def _sm_programs(index: int) -> int:
    return 4 * torch.cuda.get_device_properties(index).multi_processor_count


def split_plan(K: int, R: int, N: int, block_r: int, block_k: int, block_n: int, busy: int) -> tuple[int, int, int]:
    """(rank blocks, K chunks, output chunks) of one split_rank launch: the t-forming programs are
    rank blocks x K chunks (about `busy` of them), the y-forming ones the output chunks (at most
    `busy`); each chunk is whole blocks. The kernel computes the same (_chunking)."""
    def chunks(size: int, parts: int, block: int) -> int:
        chunk = triton.cdiv(triton.cdiv(size, max(parts, 1)), block) * block
        return triton.cdiv(size, chunk)

    rank_blocks = triton.cdiv(R, block_r)
    return rank_blocks, chunks(K, triton.cdiv(busy, rank_blocks), block_k), chunks(N, busy, block_n)


@functools.lru_cache(maxsize=None)
def _scratch_shape(K: int, R: int, N: int, busy: int) -> tuple[int, int]:
    """(K chunks, rank blocks) that split_rank's scratch must hold for any of SPLIT_CONFIGS (the
    autotuner's pick is not known before the launch); made once per layer shape, off the hot path."""
    plans = [split_plan(K, R, N, c.kwargs["BLOCK_R"], c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"], busy) for c in SPLIT_CONFIGS]
    return max(kc for _, kc, _ in plans), max(rb for rb, _, _ in plans)


class Workspace(NamedTuple):
    part: torch.Tensor  # fp32 partial products of t, one (M, R) slab per K chunk
    t: torch.Tensor  # t = x B^T (M, R), in x's dtype
    counts: torch.Tensor  # int32 tickets and arrival counts, zero between calls


_workspaces: dict[tuple, Workspace] = {}


def workspace(device: torch.device, dtype: torch.dtype, part: int, t: int, counts: int) -> Workspace:
    """split_rank's scratch of at least these sizes (elements), one per device, stream and dtype,
    grown by powers of two. Nothing in it needs clearing: each launch overwrites what it reads of
    part and t, and its last program returns the counters to zero."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream, dtype)
    held = _workspaces.get(key)
    if held is None or held.part.numel() < part or held.t.numel() < t or held.counts.numel() < counts:
        def size(old: torch.Tensor | None, need: int) -> int:
            return max(old.numel() if old is not None else 0, 1 << max(0, need - 1).bit_length())

        held = Workspace(torch.empty(size(held and held.part, part), device=device, dtype=torch.float32),
                         torch.empty(size(held and held.t, t), device=device, dtype=dtype),
                         torch.zeros(size(held and held.counts, counts), device=device, dtype=torch.int32))
        _workspaces[key] = held
    return held


def split_rank(x: torch.Tensor, b: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None, act: str = "none",
               config: triton.Config | None = None) -> torch.Tensor:
    """x: (M, K), b: (R, K), a: (N, R) -> act(x b^T a^T + bias), (M, N), x's dtype; one launch
    (autotuned, or with `config`, one of SPLIT_CONFIGS)."""
    M, K = x.shape
    R, N = b.shape[0], a.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    busy = _programs_to_fill(x.device)
    k_chunks, rank_blocks = _scratch_shape(K, R, N, busy)
    scratch = workspace(x.device, x.dtype, part=k_chunks * M * R, t=M * R, counts=3 + rank_blocks)

    def grid(meta):
        rank_blocks, k_chunks, n_chunks = split_plan(K, R, N, meta["BLOCK_R"], meta["BLOCK_K"], meta["BLOCK_N"], busy)
        return (rank_blocks * k_chunks + n_chunks,)

    launcher(_split_rank_kernel, config)[grid](x, b, a, bias if bias is not None else y, y, scratch.part, scratch.t, scratch.counts, M, K, R, N,
                             row_bucket(M), busy, x.stride(0), x.stride(1), b.stride(0), b.stride(1), a.stride(0), a.stride(1),
                             y.stride(0), y.stride(1), HAS_BIAS=bias is not None, ACT=ACTIVATIONS[act],
                             WIDE=needs_wide(x, y, k_chunks * M * R))  # the scratch's part any config addresses
    return y


def tiled(x: torch.Tensor, b: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None, act: str = "none",
          config: triton.Config | None = None) -> torch.Tensor:
    """x: (M, K), b: (R, K), a: (N, R) -> act(x b^T a^T + bias), (M, N), x's dtype (autotuned, or
    with `config`, one of TILED_CONFIGS)."""
    M, K = x.shape
    R, N = b.shape[0], a.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))

    launcher(_tiled_kernel, config)[grid](x, b, a, bias if bias is not None else y, y, M, K, R, N, row_bucket(M),
                        x.stride(0), x.stride(1), b.stride(0), b.stride(1), a.stride(0), a.stride(1), y.stride(0), y.stride(1),
                        HAS_BIAS=bias is not None, ACT=ACTIVATIONS[act], WIDE=needs_wide(x, y))
    return y
