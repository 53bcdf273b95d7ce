"""TensorNetwork and the formats built on it: properties that hold for every format."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tngraph.tn.formats import FORMATS, rank_for_params
from tngraph.tn.network import TensorNetwork, balanced_factors
from tngraph.tn.whitening import whitening_from_gram

NAMES = sorted(name for name, f in FORMATS.items() if f.layer is None)  # a defined layer's format: tests/test_layers.py
dims = st.sampled_from([6, 8, 12, 16, 24, 30])


def _weight(o, i, seed=0):
    return torch.randn(o, i, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# CP is fitted by ALS: tol=1 stops after one sweep where a test is about structure, not fit
STRUCTURE = {"cp": {"tol": 1.0}}


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None)
@given(o=dims, i=dims)
def test_full_rank_reproduces_the_weight(name, o, i):
    fmt = FORMATS[name]
    w = _weight(o, i)
    net = fmt.decompose(w, fmt.max_rank(o, i))
    assert torch.linalg.norm(net.to_dense() - w) <= 1e-5 * torch.linalg.norm(w)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15, deadline=None)
@given(o=dims, i=dims)
def test_error_does_not_grow_with_rank(name, o, i):
    fmt = FORMATS[name]
    w = _weight(o, i, seed=1)
    if name == "cp":
        pytest.skip("ALS is a local method: test_cp_error_falls_with_rank checks CP on fixed shapes")
    ranks = range(1, fmt.max_rank(o, i) + 1)
    errors = [torch.linalg.norm(fmt.decompose(w, r).to_dense() - w).item() for r in ranks]
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:]))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None)
@given(o=dims, i=dims, data=st.data())
def test_num_params_matches_formula_and_contract_matches_dense(name, o, i, data):
    fmt = FORMATS[name]
    rank = data.draw(st.integers(1, fmt.max_rank(o, i)))
    net = fmt.decompose(_weight(o, i), rank, **STRUCTURE.get(name, {}))
    assert net.num_params == sum(c.numel() for c in net.cores) == fmt.params(o, i, rank)
    rows = data.draw(st.sampled_from([(1,), (5,), (2, 3)]))
    x = torch.randn(*rows, i, dtype=torch.float64)
    torch.testing.assert_close(net.contract(x), x @ net.to_dense().T, atol=1e-9, rtol=1e-9)
    assert net.flops(5) > 0


@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_raise_value_errors(name):
    fmt = FORMATS[name]
    w = _weight(12, 8).float()
    top = fmt.max_rank(12, 8)
    for rank in (0, -1, top + 1, 2.5):
        with pytest.raises(ValueError, match="rank must be an integer"):
            fmt.decompose(w, rank)
    with pytest.raises(ValueError, match="2-D"):
        fmt.decompose(torch.randn(2, 3, 4), 1)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fmt.decompose(bad, 1)


@pytest.mark.parametrize("name", NAMES)
def test_rank_for_params_stays_within_budget(name):
    fmt = FORMATS[name]
    for o, i in ((384, 384), (1536, 384), (384, 1536)):
        for kept in (0.25, 0.5):
            r = rank_for_params(fmt, o, i, kept * o * i)
            assert fmt.params(o, i, r) <= kept * o * i
            if r < fmt.max_rank(o, i):
                assert fmt.params(o, i, r + 1) > kept * o * i


def test_svd_network_is_whitened_when_asked():
    w = _weight(16, 12).float()
    x = torch.randn(200, 12) @ torch.randn(12, 12)
    white = FORMATS["svd"].decompose(w, 4, whitening_from_gram((x.T @ x).double()))
    plain = FORMATS["svd"].decompose(w, 4)
    assert torch.linalg.norm(white.contract(x) - x @ w.T) < torch.linalg.norm(plain.contract(x) - x @ w.T)


@pytest.mark.parametrize("name", NAMES)
def test_whitened_full_rank_reproduces_and_low_rank_beats_plain(name):
    fmt = FORMATS[name]
    w = _weight(24, 24, seed=2)
    g = torch.Generator().manual_seed(4)
    # inputs whose covariance is a Kronecker product, as the per-axis whitening assumes
    x = torch.randn(2000, 24, generator=g, dtype=torch.float64) @ torch.kron(torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64))
    white = fmt.whitening(x.T @ x, 24, 24, 0.0)
    full = fmt.decompose(w, fmt.max_rank(24, 24), white)
    assert torch.linalg.norm(full.to_dense() - w) <= 1e-5 * torch.linalg.norm(w)
    rank = max(1, fmt.max_rank(24, 24) // 4)
    err = lambda net: torch.linalg.norm(net.contract(x) - x @ w.T)  # noqa: E731
    assert err(fmt.decompose(w, rank, white)) < err(fmt.decompose(w, rank))
    assert white is not None and fmt.whitening_kind in ("full", "axes", "blocks")


def test_tt_cores_and_shapes():
    net = FORMATS["tt"].decompose(_weight(384, 1536).float(), 10, cores=3)
    assert net.in_dims == (16, 12, 8) and net.out_dims == (8, 8, 6)
    assert [tuple(c.shape) for c in net.cores] == [(8, 16, 10), (10, 8, 12, 10), (10, 6, 8)]
    with pytest.raises(ValueError, match="one whitening per input axis"):
        FORMATS["tt"].decompose(_weight(8, 8), 2, whitening=[whitening_from_gram(torch.eye(8, dtype=torch.float64))])


def test_contraction_paths_are_cached_per_row_bucket():
    net = FORMATS["tt"].decompose(_weight(64, 64).float(), 4)
    net.contract(torch.randn(3, 64))
    net.contract(torch.randn(4, 64))
    net.contract(torch.randn(100, 64))
    assert sorted(net._paths) == [4, 128]


def test_network_checks_its_labels():
    with pytest.raises(ValueError, match="does not fit labels"):
        TensorNetwork([torch.randn(3, 4)], ["abc"], (4,), (3,), "b", "a")
    with pytest.raises(ValueError, match="has sizes"):
        TensorNetwork([torch.randn(3, 5)], ["ab"], (4,), (3,), "b", "a")
    assert balanced_factors(384, 2) == (24, 16) and balanced_factors(7, 2) == (7, 1)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "svd"])
def test_refit_never_raises_the_calibration_error(name):
    from tngraph.tn.refit import refit_core

    g = torch.Generator().manual_seed(7)
    w = torch.randn(48, 40, generator=g, dtype=torch.float64)
    x = torch.randn(3000, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 40, generator=g, dtype=torch.float64)
    err = lambda net: torch.linalg.norm(net.contract(x) - x @ w.T)  # noqa: E731
    fmt = FORMATS[name]
    refitted = 0
    for rank in sorted({1, max(1, fmt.max_rank(48, 40) // 4), max(1, fmt.max_rank(48, 40) // 2)}):
        net = fmt.decompose(w, rank, **STRUCTURE.get(name, {}))
        refit = refit_core(net, w, x.T @ x)
        if refit is None:
            continue
        refitted += 1
        assert [c.shape for c in refit.cores] == [c.shape for c in net.cores]
        assert err(refit) <= err(net) * (1 + 1e-9)
    # monarch's input blocks are shared by both factors, so no single core owns them
    assert refitted > 0 or name == "monarch"


def test_als_never_raises_the_error_and_refines_a_tensor_ring():
    from tngraph.tn.als import als, relative_error

    w = _weight(36, 48, seed=3)
    net = FORMATS["tr"].decompose(w, 3, cores=3)
    target = w.reshape(*net.out_dims, *net.in_dims)
    fit = als(net, target, sweeps=5)
    assert all(b <= a + 1e-12 for a, b in zip(fit.errors, fit.errors[1:]))
    assert fit.errors[-1] < fit.errors[0] and abs(relative_error(fit.network, target) - fit.errors[-1]) < 1e-9
    refined = FORMATS["tr"].decompose(w, 3, cores=3, als=5)
    assert torch.linalg.norm(refined.to_dense() - w) < torch.linalg.norm(net.to_dense() - w)


@pytest.mark.parametrize("shape", [(12, 8), (24, 16), (16, 30)])
def test_cp_error_falls_with_rank(shape):
    w = _weight(*shape, seed=1)
    fmt = FORMATS["cp"]
    top = fmt.max_rank(*shape)
    ranks = [1, 2, 4, top // 4, top // 2, top]
    errors = [torch.linalg.norm(fmt.decompose(w, r, tol=1e-4, max_iter=3000).to_dense() - w).item() for r in ranks]
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] <= 1e-9 * torch.linalg.norm(w)


def test_cp_reports_non_convergence_clearly():
    from tngraph.tn.formats.cp import CPConvergenceError

    with pytest.raises(CPConvergenceError, match="did not converge.*relative error") as info:
        FORMATS["cp"].decompose(_weight(24, 24), 20, max_iter=2, tol=0.0)
    assert "cp_max_iter" in info.value.fix


def test_tucker_hooi_never_worse_than_hosvd():
    w = _weight(36, 40, seed=5)
    for rank in (2, 3, 5):
        hosvd = torch.linalg.norm(FORMATS["tucker"].decompose(w, rank).to_dense() - w)
        hooi = torch.linalg.norm(FORMATS["tucker"].decompose(w, rank, iters=3).to_dense() - w)
        assert hooi <= hosvd * (1 + 1e-9)


def test_kron_is_a_sum_of_kronecker_products_of_the_chosen_shape():
    w = _weight(12, 20, seed=6)
    net = FORMATS["kron"].decompose(w, 3, shape=(3, 4))
    a, b = net.cores  # (o1, i1, r), (r, o2, i2)
    rebuilt = sum(torch.kron(a[:, :, r], b[r]) for r in range(3))
    torch.testing.assert_close(rebuilt, net.to_dense())
    assert a.shape[:2] == (3, 4) and b.shape[1:] == (4, 5)
    with pytest.raises(ValueError, match="must divide"):
        FORMATS["kron"].decompose(w, 1, shape=(5, 4))


def test_monarch_is_block_diagonal_times_block_diagonal():
    w = _weight(24, 24, seed=8)
    net = FORMATS["monarch"].decompose(w, 2)
    r_core, l_core = net.cores  # R[p, k, r, q], L[k, s, p, r]
    p, k, r, q = r_core.shape
    x = torch.randn(5, 24, dtype=torch.float64)
    blocks = x.reshape(5, p, q)
    # first factor: each input block p mixed on its own (block-diagonal), then a permutation
    y = torch.einsum("zpq,pkrq->zkpr", blocks, r_core)
    # second factor: each output group k mixes only its own slice (block-diagonal)
    out = torch.einsum("zkpr,kspr->zks", y, l_core).reshape(5, 24)
    torch.testing.assert_close(out, net.contract(x))
