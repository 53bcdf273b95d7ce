"""TensorNetwork and the formats built on it (svd, tt): properties that hold for every format."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tngraph.tn.formats import FORMATS, rank_for_params
from tngraph.tn.network import TensorNetwork, balanced_factors
from tngraph.tn.whitening import whitening_from_gram

NAMES = sorted(FORMATS)
dims = st.sampled_from([6, 8, 12, 16, 24, 30])


def _weight(o, i, seed=0):
    return torch.randn(o, i, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


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
    errors = [torch.linalg.norm(fmt.decompose(w, r).to_dense() - w).item() for r in range(1, fmt.max_rank(o, i) + 1)]
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:]))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None)
@given(o=dims, i=dims, data=st.data())
def test_num_params_matches_formula_and_contract_matches_dense(name, o, i, data):
    fmt = FORMATS[name]
    rank = data.draw(st.integers(1, fmt.max_rank(o, i)))
    net = fmt.decompose(_weight(o, i), rank)
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


@pytest.mark.parametrize("cores", [2, 3])
def test_tt_refit_never_raises_the_calibration_error(cores):
    from tngraph.tn.formats.tt import refit_last_core

    g = torch.Generator().manual_seed(7)
    w = torch.randn(48, 40, generator=g, dtype=torch.float64)
    x = torch.randn(3000, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 40, generator=g, dtype=torch.float64)
    err = lambda net: torch.linalg.norm(net.contract(x) - x @ w.T)  # noqa: E731
    for rank in (2, 6, 12):
        net = FORMATS["tt"].decompose(w, rank, cores=cores)
        refit = refit_last_core(net, w, x.T @ x)
        assert [c.shape for c in refit.cores] == [c.shape for c in net.cores]
        assert err(refit) <= err(net) * (1 + 1e-9)
