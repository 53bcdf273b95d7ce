"""GPU checks (skipped without CUDA): compression on the device, in fp32 and fp16."""
import pytest
import torch

import tngraph
from tests.conftest import MLP

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_compress_on_cuda(dtype):
    model = MLP().to("cuda", dtype).eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    data = [((torch.randn(64, 24, device="cuda", generator=g).to(dtype),), {}) for _ in range(4)]
    result = tngraph.compress_with_result(model, calibration=data, config=tngraph.Config(budget=0.5, progress=False))
    x = data[0][0][0]
    out = result.module(x)
    assert out.device.type == "cuda" and out.dtype == dtype
    assert result.module.layers[0].a.device.type == "cuda"
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(result.graph(x), out, atol=tol, rtol=tol)
    err = ((out.float() - model(x).float()).norm() / model(x).float().norm()).item()
    assert err < 0.6
