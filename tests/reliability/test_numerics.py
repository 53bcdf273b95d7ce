"""Numerics: fp16 / bf16 models, rank-deficient, all-zero and ill-conditioned layers, NaN and Inf."""
import pytest
import torch

import tngraph
from tests.conftest import MLP
from tngraph.errors import TngraphError


def _data(dtype=torch.float32, n=4, rows=64, width=24, seed=0, basis=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(rows, width if basis is None else basis.shape[0], generator=g)
        out.append(((x @ basis if basis is not None else x).to(dtype),))
    return [(args, {}) for args in out]


def _config(**options):
    return tngraph.Config(**{"budget": 0.5, "heal_steps": 0, "progress": False, "sensitivity": "fisher", **options})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_compress_in_float64_and_keep_their_dtype(dtype):
    reference = tngraph.compress(MLP().eval(), calibration=_data(), config=_config())
    model = MLP().eval().to(dtype)
    result = tngraph.compress_with_result(model, calibration=_data(dtype), config=_config())
    assert all(p.dtype == dtype for p in result.module.parameters())
    x = _data(seed=5)[0][0][0]
    with torch.no_grad():
        out = result.module(x.to(dtype)).float()
        want = reference(x)
    assert torch.isfinite(out).all()
    # the same decomposition as the float32 model's, up to the dtype's rounding
    assert float((out - want).norm() / want.norm()) < (2e-2 if dtype == torch.float16 else 6e-2)


def test_rank_deficient_and_all_zero_layers():
    model = MLP().eval()
    with torch.no_grad():
        w = model.layers[1].weight
        w.copy_(torch.randn(w.shape[0], 2) @ torch.randn(2, w.shape[1]))  # rank 2
        model.layers[2].weight.zero_()  # all zero: the output is its bias
    result = tngraph.compress_with_result(model, calibration=_data(), config=_config(allocation="uniform"))
    errors = result.context.analysis["guard"]
    assert errors["layers.1"] < 1e-6 and errors["layers.2"] == 0.0
    x = _data(seed=7)[0][0][0]
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), atol=1e-4, rtol=1e-4)


def test_ill_conditioned_calibration_inputs():
    """Inputs confined to a 3-dimensional subspace: the first layer's Gram matrix is singular (it is
    damped); its rank-5 factors are exact where the data lies, and nothing turns non-finite."""
    basis = torch.randn(3, 24, generator=torch.Generator().manual_seed(2))
    model = MLP().eval()
    result = tngraph.compress_with_result(model, calibration=_data(basis=basis), config=_config(budget=0.3, allocation="uniform"))
    assert result.context.analysis["guard"]["layers.0"] < 1e-4
    x = _data(basis=basis, seed=11)[0][0][0]
    with torch.no_grad():
        first = result.module.layers[0](x)
        torch.testing.assert_close(first, model.layers[0](x), atol=1e-4, rtol=1e-4)
        assert torch.isfinite(result.module(x)).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_a_clear_error(bad):
    model = MLP().eval()
    with torch.no_grad():
        model.layers[1].weight[3, 4] = bad
    with pytest.raises(TngraphError, match=r"layers\.1.*(NaN|Inf|non-finite)") as err:
        tngraph.compress(model, calibration=_data(), config=_config())
    assert err.value.fix


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_inputs_are_a_clear_error(bad):
    data = _data()
    data[1][0][0][5, 2] = bad
    with pytest.raises(TngraphError, match="calibration sample 1 holds NaN or Inf") as err:
        tngraph.compress(MLP().eval(), calibration=data, config=_config())
    assert err.value.fix
    # produced inside the model (an overflowing activation): named by the layer it reaches
    model = MLP().eval()
    with torch.no_grad():
        model.layers[0].bias[0] = 3e38
        model.layers[0].weight[0] = 3e38
    with pytest.raises(TngraphError, match=r"calibration inputs reaching layers\.1 hold NaN or Inf"):
        tngraph.compress(model, calibration=_data(), config=_config())
