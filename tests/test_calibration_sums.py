"""The arithmetic under the calibration statistics: the symmetric sums of products (BLAS syrk in
place on the CPU, triangle blocks otherwise) and the triangular whitening product (BLAS trmm)."""
import pytest
import torch

from tngraph.calibration import TRIANGLE_FROM, GramStats, add_products, symmetric
from tngraph.tn.whitening import Whitening, whitening_from_gram


@pytest.mark.parametrize("width", [7, TRIANGLE_FROM + 37])
@pytest.mark.parametrize("rows_dtype,sum_dtype", [(torch.float32, torch.float32), (torch.float32, torch.float64),
                                                  (torch.float64, torch.float64)])
def test_sums_of_products_read_back_as_the_full_symmetric_sum(width, rows_dtype, sum_dtype):
    g = torch.Generator().manual_seed(0)
    total = torch.zeros(width, width, dtype=sum_dtype)
    batches = [torch.randn(n, width, generator=g, dtype=torch.float64) for n in (5, 40, 1)]
    for k, x in enumerate(batches):
        add_products(total, x.to(rows_dtype), scale=1.0 + k)
    reference = sum((1.0 + k) * x.T @ x for k, x in enumerate(batches))
    tolerance = 1e-5 if rows_dtype == torch.float32 else 1e-12
    assert torch.allclose(symmetric(total), reference, rtol=tolerance, atol=tolerance * float(reference.abs().max()))
    if rows_dtype == sum_dtype:  # syrk in place: only the lower triangle was written
        assert torch.equal(total.triu(1), torch.zeros_like(total).triu(1))
    # the statistics read it in float64, symmetric, whichever dtype summed it
    stats = GramStats(width, sum_dtype)
    for x in batches:
        stats.update(x.to(rows_dtype))
    gram = stats.gram
    assert gram.dtype == torch.float64 and torch.equal(gram, gram.T)


def test_a_strided_batch_is_summed_as_its_values():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 16, generator=g)[::2, ::2]  # not contiguous
    total = torch.zeros(8, 8)
    add_products(total, x)
    assert torch.allclose(symmetric(total), (x.T @ x).double(), rtol=1e-5)


def test_the_triangular_whitening_product_equals_the_dense_one():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 12, generator=g, dtype=torch.float64)
    white = whitening_from_gram(x.T @ x)
    assert white.lower and torch.equal(white.s, white.s.tril())
    for w in (torch.randn(9, 12, generator=g), torch.randn(12, 20, generator=g, dtype=torch.float64).T):  # float32; a strided view
        product = white.apply(w)
        assert product.dtype == torch.float64 and product.is_contiguous()
        assert torch.allclose(product, w.double() @ white.s, rtol=1e-12, atol=1e-12)
    dense = Whitening(white.s + 0.1, lower=False)  # not triangular: the plain product
    assert torch.allclose(dense.apply(w), w.double() @ dense.s)
