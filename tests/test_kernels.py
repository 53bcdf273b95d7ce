"""Triton kernels against their torch references: on the GPU when there is one, else in triton's
interpreter on the CPU (TRITON_INTERPRET=1, set by conftest), fp32 and fp16, odd shapes that
exercise every mask."""
import os

import pytest
import torch

from tngraph.ops import ACTIVATIONS, load_kernels, lowrank_reference

pytest.importorskip("triton", reason="triton is not installed (make test installs it)")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

kernels = load_kernels()
offsets = load_kernels("_common").offsets
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (rows, in, rank, out): one row (decode), a few, more than a row block; none a multiple of a block
SHAPES = [(1, 37, 19, 45), (5, 70, 33, 100), (40, 65, 20, 70)]


def _inputs(shape, dtype, bias, seed=0):
    m, k, r, n = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    b = torch.randn(r, k, generator=g) / k**0.5
    a = torch.randn(n, r, generator=g) / r**0.5
    c = torch.randn(n, generator=g) if bias else None
    return [t.to(DEVICE, dtype) if t is not None else None for t in (x, b, a, c)]


def _check(out, x, b, a, c, act, dtype):
    # the reference in fp32 from the same (rounded) inputs; fp16 kernels accumulate in fp32 too
    ref = lowrank_reference(*(t.float() if t is not None else None for t in (x, b, a, c)), act)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_split_rank_matches_the_reference(shape, dtype, bias):
    x, b, a, c = _inputs(shape, dtype, bias)
    _check(kernels.split_rank(x, b, a, c), x, b, a, c, "none", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("busy", [1, 3, 6, 64])
def test_split_rank_chunks_cover_every_input_and_output_once(busy, dtype, monkeypatch):
    """split-rank splits K among the t-forming programs and the outputs among the y-forming ones, as
    many as keep the device busy: with 1 program to fill, one K chunk and one output chunk; with 3,
    two K chunks (192 + 108 of 300) per rank block (2 here) and three output chunks (128, 128, 44);
    with 6 and 64, more, down to one block each. Every product is summed exactly once."""
    monkeypatch.setattr(kernels, "_programs_to_fill", lambda device: busy)
    x, b, a, c = _inputs((7, 300, 40, 300), dtype, True)
    _check(kernels.split_rank(x, b, a, c), x, b, a, c, "none", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kernel", ["split_rank", "tiled"])
def test_every_lowrank_configuration_matches_the_reference(kernel, dtype, monkeypatch):
    """Autotuning may pick any configuration on the GPU (the interpreter tunes over the first only):
    each one, launched as given, on 40 rows (more than a 16- or 32-row tile) with bias and GELU."""
    monkeypatch.setattr(kernels, "_programs_to_fill", lambda device: 6)
    x, b, a, c = _inputs((40, 300, 70, 150), dtype, True)
    for config in getattr(kernels, {"split_rank": "SPLIT_CONFIGS", "tiled": "TILED_CONFIGS"}[kernel]):
        _check(getattr(kernels, kernel)(x, b, a, c, "gelu", config=config), x, b, a, c, "gelu", dtype)


def test_split_rank_plan():
    assert kernels.split_plan(300, 40, 300, 32, 64, 64, busy=3) == (2, 2, 3)
    assert kernels.split_plan(300, 40, 300, 32, 64, 64, busy=1) == (2, 1, 1)
    assert kernels.split_plan(300, 40, 300, 32, 64, 64, busy=64) == (2, 5, 5)  # at most one block each
    # Qwen3-32B's 5120 -> 5120 at 25 % kept (rank 640) on an H200 (132 SMs, 528 programs to fill):
    # 20 rank blocks x 27 K chunks of 192 form t, 80 output chunks of 64 form y
    assert kernels.split_plan(5120, 640, 5120, 32, 64, 64, busy=528) == (20, 27, 80)


@pytest.mark.skipif(DEVICE == "cuda", reason="counts loads in triton's interpreter")
@pytest.mark.parametrize("busy", [3, 64])
def test_split_rank_reads_every_weight_once(busy, monkeypatch):
    """The few-rows kernel is memory-bound: its cost is the bytes it reads. Counted load by load in
    the interpreter, every element of B and of A is loaded exactly once per call (16 rows or fewer),
    x once per rank block; the design before this one loaded B once per output chunk."""
    from tngraph.debug.traffic import count_loads

    monkeypatch.setattr(kernels, "_programs_to_fill", lambda device: busy)
    x, b, a, c = _inputs((5, 300, 40, 300), torch.float32, True)
    with count_loads(x=x, b=b, a=a, c=c) as loads:
        _check(kernels.split_rank(x, b, a, c), x, b, a, c, "none", torch.float32)
    rank_blocks = kernels.split_plan(300, 40, 300, 32, 64, 64, busy)[0]
    assert set(loads["b"]) == {1} and set(loads["a"]) == {1} and set(loads["c"]) == {1}
    assert set(loads["x"]) == {rank_blocks}
    # and what else it reads (fp32 here): the K-chunk partials of t once, t (5 x 40) once per block of
    # 64 outputs, and the ready count once per output chunk (the interpreter never waits)
    _, k_chunks, n_chunks = kernels.split_plan(300, 40, 300, 32, 64, 64, busy)
    chunk = -(-(-(-300 // busy)) // 64) * 64  # the kernel's output chunk: whole 64-blocks of ceil(300 / busy)
    n_blocks = sum(-(-min(chunk, 300 - i * chunk) // 64) for i in range(n_chunks))
    assert loads.other_bytes == 4 * 5 * 40 * (k_chunks + n_blocks) + 4 * n_chunks


@pytest.mark.skipif(DEVICE == "cuda", reason="counts loads in triton's interpreter")
def test_the_traffic_tool_counts_a_real_grid(tmp_path, capsys):
    """tools/kernel_traffic.py at a small shape on an H200's grid (528 programs): weights loaded once."""
    import importlib.util
    import json
    import pathlib

    spec = importlib.util.spec_from_file_location("kernel_traffic", pathlib.Path(__file__).parents[1] / "tools" / "kernel_traffic.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    fill = kernels._programs_to_fill
    assert tool.main(["--shapes", "300x200", "--kept", "0.5", "--rows", "3", "--json", str(tmp_path / "t.json")]) == 0
    assert kernels._programs_to_fill is fill  # put back
    (row,) = json.loads((tmp_path / "t.json").read_text())
    assert row["weight_bytes_loaded"] == row["weight_bytes"] and row["weight_max_loads"] == 1 and row["rel_error"] < 2e-2
    assert "split_rank" in capsys.readouterr().out


def test_split_rank_leaves_its_counters_zero_for_the_next_call(monkeypatch):
    """One launch, no clearing around it: each call overwrites what it reads of its scratch (partial
    products, t) and its last program returns the tickets and counts to zero, so calls in a row
    (other inputs, other row counts and activations, a grown scratch) are each exact."""
    monkeypatch.setattr(kernels, "_workspaces", {})
    monkeypatch.setattr(kernels, "_programs_to_fill", lambda device: 6)
    for seed, rows, act in ((0, 5, "gelu"), (1, 5, "none"), (2, 40, "silu"), (3, 2, "relu")):
        x, b, a, c = _inputs((rows, 300, 40, 300), torch.float32, True, seed=seed)
        _check(kernels.split_rank(x, b, a, c, act), x, b, a, c, act, torch.float32)
        (scratch,) = kernels._workspaces.values()
        assert scratch.t.numel() >= rows * 40 and not scratch.counts.any()
    assert scratch.t.numel() == 2048  # grown once, to the power of two above 40 x 40


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", ["none", "gelu"])
def test_tiled_matches_the_reference(shape, dtype, act):
    x, b, a, c = _inputs(shape, dtype, True)
    _check(kernels.tiled(x, b, a, c, act), x, b, a, c, act, dtype)


@pytest.mark.parametrize("act", [a for a in ACTIVATIONS if a != "none"])
def test_epilogues(act):
    x, b, a, c = _inputs((3, 40, 17, 33), torch.float32, True)
    _check(kernels.tiled(x, b, a, c, act), x, b, a, c, act, torch.float32)
    _check(kernels.split_rank(x, b, a, c, act), x, b, a, c, act, torch.float32)


def test_strided_input():
    x, b, a, c = _inputs((6, 48, 20, 30), torch.float32, True)
    wide = torch.zeros(6, 96, device=DEVICE)
    wide[:, ::2] = x
    view = wide[:, ::2]  # not contiguous: the kernels take strides
    _check(kernels.tiled(view, b, a, c), x, b, a, c, "none", torch.float32)


@triton.jit
def _offsets_kernel(i_ptr, j_ptr, out_ptr, si, sj, N: tl.constexpr, WIDE: tl.constexpr):
    r = tl.arange(0, N)
    tl.store(out_ptr + r[:, None] * N + r[None, :], offsets(tl.load(i_ptr + r), tl.load(j_ptr + r), si, sj, WIDE))


def test_tile_offsets_past_2_to_the_31_elements_do_not_wrap():
    """tngraph/kernels/_common.offsets, which every activation and output tile of a WIDE launch goes through
    (_common.tile): row 70000 at a row stride of 40000 is element 2,800,000,000, past int32, as is
    column 3 at a stride of 2**30 + 1.
    WIDE=True (int64) gets them right; WIDE=False is the int32 arithmetic, which wraps there (and
    so is only launched for tensors under 2**31 elements, test_the_launchers_pick_wide_by_extent)."""
    i = torch.tensor([0, 1, 53_687, 70_000], dtype=torch.int32, device=DEVICE)
    j = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=DEVICE)
    for si, sj in ((40_000, 1), (1, 2**30 + 1), (40_000, 2**30 + 1)):
        out = torch.empty(4, 4, dtype=torch.int64, device=DEVICE)
        _offsets_kernel[(1,)](i, j, out, si, sj, N=4, WIDE=True)
        assert torch.equal(out, i.long()[:, None] * si + j.long()[None, :] * sj)
    assert out[3, 0] == 2_800_000_000
    narrow = torch.empty(4, 4, dtype=torch.int64, device=DEVICE)
    _offsets_kernel[(1,)](i, j, narrow, 40_000, 1, N=4, WIDE=False)
    exact = i.long()[:, None] * 40_000 + j.long()[None, :]
    assert torch.equal(narrow[:3], exact[:3])  # under 2**31: the same offsets
    assert narrow[3, 0] == 2_800_000_000 - 2**32  # int32: wrapped


def test_needs_wide_by_addressed_extent():
    """tngraph/kernels/_common.needs_wide, the launchers' WIDE: True only when some tensor (or scratch extent)
    is addressed at or past element 2**31 from its data pointer, 1 + sum((size - 1) * stride)."""
    common = load_kernels("_common")
    meta = dict(device="meta", dtype=torch.float16)  # shapes and strides without memory
    assert not common.needs_wide(torch.empty(4096, 5120, **meta), torch.empty(4096, 1280, **meta), None, 3 * 4096 * 1280)
    assert not common.needs_wide(torch.empty(2**31 - 1, **meta), 2**31 - 1, torch.empty(0, 2**40, **meta))
    assert common.needs_wide(torch.empty(2**31, **meta))
    assert common.needs_wide(torch.empty(2**20, 2**11, **meta))  # rows past 2**31 elements (a long prefill)
    assert common.needs_wide(torch.empty(3, 42, **meta).as_strided((3, 42), (2**30 + 64, 1)))  # a strided view
    assert not common.needs_wide(torch.empty(1, 42, **meta).as_strided((1, 42), (2**40, 1)))  # one row: the stride is never used
    assert not common.needs_wide(torch.empty(42, **meta).expand(2**33, 42))  # a broadcast (stride 0)
    assert common.needs_wide(None, 2**31)  # split-rank's scratch extent


def _launched_wide(monkeypatch, module):
    """WIDE as the module's launchers pass it to the kernel, one entry per launch."""
    passed, launcher = [], module.launcher

    def spy(kernel, config):
        launch = launcher(kernel, config)

        class Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    passed.append(kwargs["WIDE"])
                    return launch[grid](*args, **kwargs)

                return run

        return Grid()

    monkeypatch.setattr(module, "launcher", spy)
    return passed


def test_the_launchers_pick_wide_by_extent(monkeypatch):
    """Ordinary tensors launch WIDE=False (int32 offsets, fewer registers) for every kernel, with
    and without an explicit `config=`."""
    tt = load_kernels("tt")
    passed = _launched_wide(monkeypatch, kernels)
    passed_tt = _launched_wide(monkeypatch, tt)
    x, b, a, c = _inputs((5, 70, 33, 100), torch.float32, True)
    _check(kernels.split_rank(x, b, a, c, "gelu"), x, b, a, c, "gelu", torch.float32)
    _check(kernels.tiled(x, b, a, c, "gelu", config=kernels.TILED_CONFIGS[0]), x, b, a, c, "gelu", torch.float32)
    g = torch.Generator().manual_seed(0)
    g1, g2 = torch.randn(5, 7, 4, generator=g).to(DEVICE), torch.randn(4, 3, 10, generator=g).to(DEVICE)
    tt.tt2(x, g1, g2, None)
    tt.tt2(x, g1, g2, None, config=tt.CONFIGS[0])
    assert passed == [False, False] and passed_tt == [False, False]


@pytest.mark.parametrize("kernel", ["split_rank", "tiled", "tt2"])
def test_kernels_read_rows_past_2_to_the_31_elements(kernel, monkeypatch):
    """x a view of 3 rows 2**30 + 64 elements apart: row 2 starts past element 2**31, where an
    int32 offset wraps (an out-of-bounds read), so the launcher picks WIDE=True (int64 offsets).
    The storage is 4 GiB of fp16 but only the 3 rows are touched (untouched pages take no memory,
    and the interpreter reads the tensors in place)."""
    stride, k = 2**30 + 64, 42
    base = torch.empty(2 * stride + k, dtype=torch.float16, device=DEVICE)
    x = torch.as_strided(base, (3, k), (stride, 1))
    g = torch.Generator().manual_seed(0)
    x.copy_(torch.randn(3, k, generator=g))
    if kernel == "tt2":
        from tngraph.ops import network_reference

        tt = load_kernels("tt")
        passed = _launched_wide(monkeypatch, tt)
        g1, g2 = torch.randn(5, 6, 4, generator=g) / 6, torch.randn(4, 3, 7, generator=g) / 7
        g1, g2 = g1.to(DEVICE, torch.float16), g2.to(DEVICE, torch.float16)
        out = tt.tt2(x, g1, g2, None)
        ref = network_reference(x.float(), [g1.float(), g2.float()], "...ab,Aar,rBb->...AB", [6, 7], 15, None)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    else:
        passed = _launched_wide(monkeypatch, kernels)
        _, b, a, c = _inputs((1, k, 17, 33), torch.float16, True)
        _check(getattr(kernels, kernel)(x, b, a, c, "gelu"), x, b, a, c, "gelu", torch.float16)
    assert passed == [True]


def test_the_dispatch_times_each_candidate_once_per_row_bucket(monkeypatch):
    from tngraph import ops

    monkeypatch.setattr(ops, "_choices", {})
    monkeypatch.delenv("TNGRAPH_LOWRANK", raising=False)
    x, b, a, c = _inputs((3, 40, 17, 33), torch.float32, True)
    timed = []

    def timer(fn):  # a stand-in for triton.testing.do_bench: tiled is "fastest" here
        timed.append(fn)
        return {0: 2.0, 1: 1.5, 2: 1.0}[len(timed) - 1]

    assert ops.choose(x, b, a, c, "none", timer=timer) == "tiled" and len(timed) == 3  # chain, split_rank, tiled
    assert ops.choose(x[:2], b, a, c, "none", timer=timer) == "tiled" and len(timed) == 3  # same bucket (<= 16 rows): cached
    big = torch.randn(100, 40, device=DEVICE)
    ops.choose(big, b, a, c, "none", timer=lambda fn: timed.append(fn) or 1.0)
    assert len(timed) == 6  # bucket 128: chain, split_rank and tiled again
    ops.choose(torch.randn(200, 40, device=DEVICE), b, a, c, "none", timer=lambda fn: timed.append(fn) or 1.0)
    assert len(timed) == 8  # bucket 2048: chain and tiled (split-rank takes at most 128 rows)
    monkeypatch.setenv("TNGRAPH_LOWRANK", "chain")
    assert ops.choose(x, b, a, c, "none", timer=timer) == "chain"
    monkeypatch.setenv("TNGRAPH_LOWRANK", "magic")
    with pytest.raises(ValueError, match="TNGRAPH_LOWRANK='magic'"):
        ops.choose(x, b, a, c, "none")


@pytest.mark.parametrize("rows", [2049, 4096, 100_000])
def test_no_kernel_is_a_candidate_past_its_row_limit(rows, monkeypatch):
    """Past 2048 rows (the tiled kernel's limit; split-rank's is 128) the dispatch takes the chain
    untimed, or times it against the dense product where that is allowed; TNGRAPH_LOWRANK still
    forces a kernel at any row count."""
    from tngraph import ops

    monkeypatch.setattr(ops, "_choices", {})
    monkeypatch.setattr(ops, "_dense", ops.TensorCache())
    monkeypatch.setattr(ops, "_allow_dense", None)
    monkeypatch.delenv("TNGRAPH_LOWRANK", raising=False)
    monkeypatch.delenv("TNGRAPH_LOWRANK_DENSE", raising=False)
    ran = []
    for name in ("split_rank", "tiled"):  # what a timing would run, without running it
        monkeypatch.setattr(kernels, name, lambda *args, name=name: ran.append(name))
    timed = []

    def timer(fn):
        timed.append(fn)
        fn()
        return float(len(timed))  # the first timed is the "fastest"

    x, b, a, c = _inputs((rows, 40, 17, 33), torch.float32, True)
    assert ops.choose(x, b, a, c, "gelu", timer=timer) == "chain" and not timed  # the only candidate
    monkeypatch.setenv("TNGRAPH_LOWRANK_DENSE", "1")
    assert ops.choose(x, b, a, c, "gelu", timer=timer) == "chain" and len(timed) == 2 and not ran  # chain and dense
    for forced in ("split_rank", "tiled"):
        monkeypatch.setenv("TNGRAPH_LOWRANK", forced)
        assert ops.choose(x, b, a, c, "gelu", timer=timer) == forced and len(timed) == 2


def test_the_dense_product_is_a_candidate_only_where_allowed(monkeypatch):
    """allow_dense: the dispatch also times the dense product a·b (one GEMM) and keeps it for the
    layers whose bucket it wins; the product is made once, dropped when no bucket runs it, and the
    dense implementation computes the op."""
    from tngraph import ops

    monkeypatch.setattr(ops, "_choices", {})
    monkeypatch.setattr(ops, "_dense", ops.TensorCache())
    monkeypatch.setattr(ops, "_allow_dense", None)
    monkeypatch.delenv("TNGRAPH_LOWRANK", raising=False)
    monkeypatch.delenv("TNGRAPH_LOWRANK_DENSE", raising=False)
    x, b, a, c = _inputs((200, 40, 17, 33), torch.float32, True)
    times = [3.0, 2.0, 3.0, 1.0, 2.0]  # per call: chain, tiled; then chain, dense, tiled (200 rows: no split-rank)

    def timer(fn):
        return times.pop(0)

    ops.allow_dense(None)
    assert ops.choose(x, b, a, c, "gelu", timer=timer) == "tiled" and len(times) == 3 and not ops._dense
    monkeypatch.setenv("TNGRAPH_LOWRANK_DENSE", "1")
    assert ops.choose(x, b, a, c, "gelu", timer=timer) == "dense" and not times and len(ops._dense) == 1
    weight = ops.dense_weight(b, a)
    assert weight is ops.dense_weight(b, a)  # made once
    torch.testing.assert_close(weight, a @ b)
    ref = ops.lowrank_reference(x, b, a, c, "gelu")
    torch.testing.assert_close(ops.lowrank_cuda(x, b, a, c, "gelu"), ref, rtol=1e-5, atol=1e-5)  # the dense path computes the op
    with torch.no_grad():
        a.mul_(2.0)  # factors changed in place: the product is made again
    torch.testing.assert_close(ops.dense_weight(b, a), a @ b)
    ops.allow_dense(False)
    assert not ops._dense and ops.choose(x, b, a, c, "gelu", timer=lambda fn: 1.0) != "dense"
    ops.allow_dense(None)
    monkeypatch.setenv("TNGRAPH_LOWRANK", "dense")
    assert ops.choose(x, b, a, c, "gelu") == "dense"


def test_a_dense_product_is_not_taken_for_another_layers_at_the_same_address(monkeypatch):
    """Memory a freed layer held is reused by new tensors of the same shape (and version): the
    cache goes by the tensors themselves, so a new layer there gets its own product, and entries
    leave with their tensors."""
    import gc

    from tngraph import ops

    monkeypatch.setattr(ops, "_dense", ops.TensorCache())
    storage = torch.randn(6 * 4).untyped_storage()
    a = torch.randn(5, 6)

    def factor():  # a (6, 4) tensor over the same memory each time, as after a reuse
        return torch.empty(0).set_(storage, 0, (6, 4))

    old = factor()
    torch.testing.assert_close(ops.dense_weight(old, a), a @ old)
    del old
    gc.collect()
    assert len(ops._dense) == 0
    factor().copy_(torch.randn(6, 4))  # the new layer's values, written through another tensor
    new = factor()
    torch.testing.assert_close(ops.dense_weight(new, a), a @ new)


def test_the_network_dispatch_times_kernel_einsum_and_dense_once_per_row_bucket(monkeypatch):
    """tngraph::network on CUDA: per layer shape and row bucket the faster of its kernel path and the
    einsum (and the dense matrix where allowed), timed once; layers without a kernel take the einsum
    untimed; each implementation computes the op."""
    from tngraph import ops

    monkeypatch.setattr(ops, "_network_choices", {})
    monkeypatch.setattr(ops, "_dense", ops.TensorCache())
    monkeypatch.setattr(ops, "_allow_dense", None)
    monkeypatch.delenv("TNGRAPH_NETWORK", raising=False)
    monkeypatch.delenv("TNGRAPH_LOWRANK_DENSE", raising=False)
    g = torch.Generator().manual_seed(5)
    equation, cores, in_dims = _network("tt", torch.randn(35, 42, generator=g), 4)
    plan = ops.cached_network_plan(equation, cores)
    x = torch.randn(9, 42, generator=g).to(DEVICE)
    bias = torch.randn(35, generator=g).to(DEVICE)
    timed = []

    def timer(fn):
        timed.append(fn)
        return {1: 2.0, 2: 1.0, 3: 0.5}[len(timed) % 4 or 3]

    assert ops.choose_network(x, cores, equation, in_dims, 35, bias, plan, timer=timer) == "kernel" and len(timed) == 2
    assert ops.choose_network(x[:3], cores, equation, in_dims, 35, bias, plan, timer=timer) == "kernel" and len(timed) == 2
    ops.choose_network(torch.randn(100, 42, device=DEVICE), cores, equation, in_dims, 35, bias, plan, timer=timer)
    assert len(timed) == 4  # bucket 128: timed again
    monarch, monarch_cores, monarch_dims = _network("monarch", torch.randn(35, 42, generator=g), 2)
    monarch_plan = ops.cached_network_plan(monarch, monarch_cores)
    assert isinstance(monarch_plan, str)
    assert ops.choose_network(x, monarch_cores, monarch, monarch_dims, 35, None, monarch_plan, timer=timer) == "einsum"
    assert len(timed) == 4  # nothing to choose: not timed
    ops.allow_dense(True)
    try:
        timed.clear()
        assert ops.choose_network(x, cores, equation, in_dims, 35, bias, plan, timer=timer) == "dense" and len(timed) == 3
        weight = ops.network_dense_weight(cores, equation, 35)
        assert weight is ops.network_dense_weight(cores, equation, 35) and weight.shape == (35, 42)  # made once
        ref = ops.network_reference(x, cores, equation, in_dims, 35, bias)
        for forced in ops.NETWORK_IMPLEMENTATIONS:
            monkeypatch.setenv("TNGRAPH_NETWORK", forced)
            torch.testing.assert_close(ops.network_cuda(x, cores, equation, in_dims, 35, bias), ref, atol=1e-4, rtol=1e-4)
        monkeypatch.setenv("TNGRAPH_NETWORK", "kernel")
        assert ops.choose_network(x, monarch_cores, monarch, monarch_dims, 35, None, monarch_plan) == "einsum"  # no kernel to force
        monkeypatch.setenv("TNGRAPH_NETWORK", "fast")
        with pytest.raises(ValueError, match="TNGRAPH_NETWORK='fast'"):
            ops.choose_network(x, cores, equation, in_dims, 35, bias, plan)
    finally:
        ops.allow_dense(None)
    assert not ops._network_choices


TT_SHAPES = [(1, 3, 5, 7, 4, 6), (9, 6, 7, 20, 5, 4), (40, 2, 33, 40, 3, 17)]  # (rows, A, a, rank, B, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", TT_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_tt2_matches_the_reference(shape, dtype, bias):
    from tngraph.ops import network_reference

    m, na, a, r, nb, b = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, a * b, generator=g)
    g1 = torch.randn(na, a, r, generator=g) / a**0.5
    g2 = torch.randn(r, nb, b, generator=g) / (r * b) ** 0.5
    c = torch.randn(na * nb, generator=g) if bias else None
    x, g1, g2, c = (t.to(DEVICE, dtype) if t is not None else None for t in (x, g1, g2, c))
    out = load_kernels("tt").tt2(x, g1, g2, c)
    ref = network_reference(x.float(), [g1.float(), g2.float()], "...ab,Aar,rBb->...AB", [a, b], na * nb, c.float() if bias else None)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_tt2_configuration_matches_the_reference(dtype):
    from tngraph.ops import network_reference

    m, na, a, r, nb, b = 20, 2, 70, 40, 130, 3  # more than a tile of rows (16), of a, of the rank and of B
    g = torch.Generator().manual_seed(2)
    x, g1, g2 = torch.randn(m, a * b, generator=g), torch.randn(na, a, r, generator=g) / a**0.5, torch.randn(r, nb, b, generator=g) / (r * b) ** 0.5
    c = torch.randn(na * nb, generator=g)
    ref = network_reference(x, [g1, g2], "...ab,Aar,rBb->...AB", [a, b], na * nb, c)
    tt = load_kernels("tt")
    x, g1, g2, c = (t.to(DEVICE, dtype) for t in (x, g1, g2, c))
    for config in tt.CONFIGS:
        out = tt.tt2(x, g1, g2, c, config=config)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(out.float(), ref.to(DEVICE), atol=tol, rtol=tol)


def test_the_tt_format_is_recognised_and_its_kernel_matches_the_op():
    import tngraph
    from tests.conftest import MLP
    from tngraph.ops import network_plan
    from tngraph.passes.fuse import NETWORK

    data = [torch.randn(16, 24, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    result = tngraph.compress_with_result(MLP().eval(), calibration=data, config=tngraph.Config(budget=0.6, format="tt", progress=False))
    nodes = [n for n in result.graph.graph.nodes if n.target == NETWORK]
    assert nodes
    for node in nodes:
        x_node, core_nodes, bias_node, equation, in_dims, out_features = node.args
        cores = [getattr(result.graph, c.target) if "." not in c.target else result.graph.get_parameter(c.target) for c in core_nodes]
        plan = network_plan(equation, cores)
        assert plan[0] == "tt2" and plan[1][0].data_ptr() == cores[0].data_ptr()  # the TT cores as they are, no copy
        x = torch.randn(5, int(torch.tensor(in_dims).prod()))
        bias = result.graph.get_parameter(bias_node.target) if bias_node is not None else None
        with torch.no_grad():
            torch.testing.assert_close(load_kernels("tt").tt2(x, *cores, bias), torch.ops.tngraph.network(x, cores, bias, equation, in_dims, out_features),
                                       atol=1e-4, rtol=1e-4)
    assert isinstance(network_plan("...ab,Aar,rBb->...BA", cores), str) and isinstance(network_plan("...abc,Aar,rBb->...AB", cores), str)


def _network(fmt: str, weight: torch.Tensor, rank: int, **opts):
    from tngraph.tn.formats import FORMATS

    net = FORMATS[fmt].decompose(weight, rank, **opts)
    equation = "..." + net.in_labels + "," + ",".join(net.core_labels) + "->..." + net.out_labels
    return equation, [c.to(DEVICE) for c in net.cores], list(net.in_dims)


# every two-mode format the network kernels take, with the plan it gets; odd sizes (35 = 7 x 5, 42 = 7 x 6)
NETWORKS = [("tt", 5, {}, "tt2"), ("kron", 3, {}, "tt2"), ("tr", 3, {"cores": 2}, "tt2"), ("cp", 4, {"modes": 2}, "tt2"),
            ("tucker", 3, {"modes": 2}, "tucker2")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt,rank,opts,kind", NETWORKS)
def test_network_kernels_match_the_reference_for_every_two_mode_format(fmt, rank, opts, kind, dtype):
    from tngraph.ops import network_kernel, network_plan, network_reference

    g = torch.Generator().manual_seed(3)
    equation, cores, in_dims = _network(fmt, torch.randn(35, 42, generator=g), rank, **opts)
    cores = [c.to(dtype) for c in cores]
    x = torch.randn(9, 42, generator=g).to(DEVICE, dtype)
    bias = torch.randn(35, generator=g).to(DEVICE, dtype)
    plan = network_plan(equation, cores)
    assert plan[0] == kind
    out = network_kernel(x, cores, equation, 35, bias, plan)
    ref = network_reference(x.float(), [c.float() for c in cores], equation, in_dims, 35, bias.float())
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("fmt", ["tt", "tucker", "monarch"])
def test_network_plans_are_made_once_per_set_of_cores(fmt, monkeypatch):
    """The CUDA path of tngraph::network plans a layer once (TT: views of its cores; Tucker: merged
    cores; Monarch: the reason it has no kernel), again after a core changes in place, and forgets
    the plan when the cores are freed (the cached plan holds no reference to them)."""
    import gc

    from tngraph import ops

    made = []
    plan_of = ops.network_plan
    monkeypatch.setattr(ops, "network_plan", lambda equation, cores: made.append(equation) or plan_of(equation, cores))
    monkeypatch.setattr(ops, "_plans", ops.TensorCache())
    monkeypatch.setenv("TNGRAPH_NETWORK", "kernel")
    g = torch.Generator().manual_seed(4)
    equation, cores, in_dims = _network(fmt, torch.randn(35, 42, generator=g), 3, **({"modes": 2} if fmt == "tucker" else {}))
    x = torch.randn(6, 42, generator=g).to(DEVICE)

    def run():
        return ops.network_cuda(x, cores, equation, in_dims, 35, None)

    first = run()
    torch.testing.assert_close(run(), first)
    assert len(made) == 1 and len(ops._plans) == 1
    with torch.no_grad():
        cores[0].mul_(2)  # every format here is linear in each core
    torch.testing.assert_close(run(), 2 * first, atol=1e-4, rtol=1e-4)
    assert len(made) == 2
    del cores
    gc.collect()
    assert not ops._plans


@pytest.mark.parametrize("fmt,rank,opts,reason", [("monarch", 2, {}, "no kernel"), ("tt", 3, {"cores": 3}, "two-mode"),
                                                  ("tucker", 2, {"modes": 3}, "two-mode")])
def test_networks_without_a_kernel_say_why(fmt, rank, opts, reason):
    from tngraph.ops import network_plan

    equation, cores, _ = _network(fmt, torch.randn(35, 42), rank, **opts)
    plan = network_plan(equation, cores)
    assert isinstance(plan, str) and reason in plan


@pytest.mark.parametrize("fmt", ["tt", "tr", "cp", "tucker"])
def test_the_kernel_benchmark_builds_networks_the_kernels_take(fmt):
    """tools/bench_kernels.py times random cores of each format's shapes on the GPU: they must be
    layouts network_plan maps (a benchmark that fails there wastes the GPU session)."""
    import importlib.util
    import pathlib

    from tngraph.ops import network_kernel, network_plan, network_reference

    spec = importlib.util.spec_from_file_location("bench_kernels", pathlib.Path(__file__).parents[1] / "tools" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    equation, cores, in_dims, rank = bench.random_network(fmt, 40, 36, 0.5, DEVICE, torch.float32)
    plan = network_plan(equation, cores)
    assert not isinstance(plan, str), plan
    x = torch.randn(3, 36, device=DEVICE)
    torch.testing.assert_close(network_kernel(x, cores, equation, 40, None, plan),
                               network_reference(x, cores, equation, in_dims, 40, None), atol=1e-4, rtol=1e-4)


def test_the_kernel_benchmark_runs_end_to_end_in_the_interpreter(tmp_path, capsys, monkeypatch):
    """A smoke run of tools/bench_kernels.py on the CPU (--device cpu, triton's interpreter): every
    step the GPU run takes, both tables, the JSON rows (the GPU session has minutes: no typo may cost them)."""
    import importlib.util
    import json
    import pathlib

    if DEVICE == "cuda":
        pytest.skip("the GPU runs the real benchmark (tools/gpu_check.sh)")
    spec = importlib.util.spec_from_file_location("bench_kernels", pathlib.Path(__file__).parents[1] / "tools" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    assert bench.main(["--device", "cpu", "--dtype", "fp16", "--shapes", "40x24", "--rows", "2", "--kept", "0.5",
                       "--formats", "tt", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and rows[0]["rank"] > 0 and rows[1]["format"] == "tt"
    assert {"dense_us", "chain_us", "split_us", "tiled_us", "op_us", "op_over_chain", "op_bw_frac"} <= set(rows[0])
    assert rows[0]["split_rel_err"] < 2e-2 and rows[1]["kernel_rel_err"] < 2e-2
    printed = capsys.readouterr()
    assert "smoke run" in printed.out and "every kernel result within 0.02" in printed.out
    # a kernel that is off is named, and the run fails
    split = kernels.split_rank
    monkeypatch.setattr(kernels, "split_rank", lambda *args: split(*args) * 1.5)
    assert bench.main(["--device", "cpu", "--dtype", "fp16", "--shapes", "40x24", "--rows", "2", "--kept", "0.5", "--formats"]) == 1
    assert "split 40x24 kept 0.5 m 2: relative error" in capsys.readouterr().err


def test_every_kernel_compiles_for_hopper_in_bf16_without_a_gpu(tmp_path):
    """tools/compile_kernels.py: triton's whole CUDA pipeline down to a cubin for sm_90 (H100/H200),
    no GPU needed. The interpreter does not do bf16, so this is the CPU's check of the bf16 kernels;
    it also catches what the interpreter lets through (tl.dot shape rules, MLIR lowering, ptxas)."""
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, "tools/compile_kernels.py", "--first", "--dtypes", "bf16", "--json", str(out)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())
    assert {r["kernel"] for r in rows} == {"lowrank.split_rank", "lowrank.tiled", "tt.tt2", "quant.int4", "quant.int8"}
    assert sorted(r["wide"] for r in rows) == [False] * 5 + [True] * 5  # int32 and int64 tile offsets, each kernel
    for r in rows:
        assert "error" not in r and r["cubin_bytes"] > 0 and r["local"] == 0 and 0 < r["regs"] <= 255, r
        assert r["mma"] in ("mma", "wgmma"), r  # bf16 dots run on tensor cores
