"""The arithmetic under the calibration statistics: the symmetric sums of products (the full product
below TRIANGLE_FROM columns, lower-triangle blocks from there), read back whole in float64."""
import pytest
import torch

from tngraph.calibration import TRIANGLE_BLOCK, TRIANGLE_FROM, GramStats, add_products, symmetric


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
    if width >= TRIANGLE_FROM:  # the blocks above the diagonal blocks were never made
        assert not total[:TRIANGLE_BLOCK, -TRIANGLE_BLOCK // 2:].any()
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
