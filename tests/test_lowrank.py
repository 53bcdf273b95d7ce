import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tngraph.tn import decompose_lowrank, lowrank_params, rank_for_budget, whitening_from_gram


def _weight(out_f=48, in_f=32, seed=0):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


def test_full_rank_reproduces_the_weight():
    w = _weight()
    a, b = decompose_lowrank(w, 32)
    assert a.shape == (48, 32) and b.shape == (32, 32)
    torch.testing.assert_close(a @ b, w, atol=1e-4, rtol=0)


def test_full_rank_whitened_reproduces_the_weight():
    w = _weight()
    x = torch.randn(500, 32, dtype=torch.float64)
    a, b = decompose_lowrank(w, 32, whitening_from_gram(x.T @ x, damping=0.0))
    torch.testing.assert_close(a @ b, w, atol=1e-4, rtol=0)


def test_error_does_not_grow_with_rank():
    w = _weight()
    errors = [torch.linalg.norm(w - torch.matmul(*decompose_lowrank(w, r))).item() for r in range(1, 33)]
    assert all(e2 <= e1 + 1e-5 for e1, e2 in zip(errors, errors[1:]))
    assert errors[-1] < 1e-4 < errors[0]


def test_whitening_lowers_the_error_on_the_activations():
    w = _weight()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1000, 32, generator=g) @ torch.randn(32, 32, generator=g)  # correlated inputs
    gram = (x.T @ x).double()
    for rank in (4, 8, 16):
        plain = torch.matmul(*decompose_lowrank(w, rank))
        white = torch.matmul(*decompose_lowrank(w, rank, whitening_from_gram(gram, damping=1e-6)))
        err_plain = torch.linalg.norm(x @ (w - plain).T)
        err_white = torch.linalg.norm(x @ (w - white).T)
        assert err_white < err_plain


def test_rank_deficient_gram_falls_back_cleanly():
    w = _weight()
    x = torch.randn(10, 32)  # only 10 rows: X^T X has rank 10
    whitening = whitening_from_gram((x.T @ x).double(), damping=0.0)
    a, b = decompose_lowrank(w, 8, whitening)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    zero = whitening_from_gram(torch.zeros(32, 32, dtype=torch.float64))
    torch.testing.assert_close(torch.matmul(*decompose_lowrank(w, 32, zero)), w, atol=1e-4, rtol=0)


def test_factors_keep_the_weight_dtype():
    w = _weight().half()
    a, b = decompose_lowrank(w, 8)
    assert a.dtype == b.dtype == torch.float16


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 600), st.integers(1, 600), st.floats(0.01, 1.0), st.booleans())
def test_rank_for_budget_respects_the_budget(out_f, in_f, budget, bias):
    r = rank_for_budget(out_f, in_f, budget, bias=bias)
    assert 1 <= r <= min(out_f, in_f)
    dense = out_f * in_f + (out_f if bias else 0)
    kept = lowrank_params(out_f, in_f, r) + (out_f if bias else 0)
    if r > 1:  # rank 1 is the floor even when the budget asks for less
        assert kept <= budget * dense + 1e-6
    # the next rank up would exceed the budget (or is not available)
    if r < min(out_f, in_f):
        assert lowrank_params(out_f, in_f, r + 1) + (out_f if bias else 0) > budget * dense - 1e-6


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 40), st.integers(2, 40), st.data())
def test_parameter_formula_matches_factor_sizes(out_f, in_f, data):
    rank = data.draw(st.integers(1, min(out_f, in_f)))
    a, b = decompose_lowrank(torch.randn(out_f, in_f), rank)
    assert a.numel() + b.numel() == lowrank_params(out_f, in_f, rank)
