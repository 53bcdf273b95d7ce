"""The dequantizing GEMM kernel of the quantized layers (tngraph/kernels/quant.py) against the
layers' reference: on the GPU when there is one, else in triton's interpreter (TRITON_INTERPRET=1,
set by conftest), fp32 and fp16, odd shapes that exercise every mask, each bit width and grouping."""
import pytest
import torch

from tngraph.layers import QFACTORS, QLOWRANK, QUANT, LayerLinear
from tngraph.layers.quant import cuda as quant_cuda
from tngraph.ops import load_kernels
from tngraph.tn.quant import Choice, layer_weight, quantize_choice

pytest.importorskip("triton", reason="triton is not installed (make test installs it)")
kernels = load_kernels("quant")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(bits, group, out=45, width=96, seed=0, rank=0, factored=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, width, generator=g) / width**0.5
    factors = quantize_choice(w, Choice(bits, group, rank, factored), None)
    return {k: v.to(DEVICE) for k, v in factors.items()}, torch.randn(out, generator=g).to(DEVICE)


def _tol(dtype):
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32), (4, 0), (2, 32), (2, 0)])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_the_kernel_is_the_dequantized_product(rows, bits, group, dtype):
    factors, bias = _layer(bits, group)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)).to(DEVICE, dtype)
    tensors = [factors[k] for k in QUANT.factors]
    expected = x.float() @ layer_weight([t.cpu() for t in tensors], bits).to(DEVICE).T + bias
    y = kernels.quant_matmul(x, *tensors, bits, bias.to(dtype))
    assert y.dtype == dtype and y.shape == (rows, 45)
    torch.testing.assert_close(y.float(), expected, **_tol(dtype))


@pytest.mark.parametrize("config", range(len(kernels.QUANT_CONFIGS)))
def test_every_configuration_takes_a_strided_batched_input(config):
    factors, bias = _layer(4, 32, out=70, width=128)
    base = torch.randn(3, 9, 256, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    x = base[..., ::2]  # every other column: x's strides are not its shape's
    tensors = [factors[k] for k in QUANT.factors]
    expected = x @ layer_weight([t.cpu() for t in tensors], 4).to(DEVICE).T
    y = kernels.quant_matmul(x, *tensors, 4, config=kernels.QUANT_CONFIGS[config])
    assert y.shape == (3, 9, 70)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer,rank,factored", [(QUANT, 0, False), (QLOWRANK, 8, False), (QFACTORS, 16, True)])
def test_the_gpu_implementation_of_each_layer_is_its_reference(layer, rank, factored):
    """What the op runs on CUDA (the layer's `cuda`: the kernel for every quantized product, the
    low-rank branch and the bias around it) equals the reference the CPU runs."""
    factors, bias = _layer(4, 32, out=48, width=64, rank=rank, factored=factored)
    tensors = [factors[k] for k in layer.factors]
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    statics = {"bits": 4, "act_bits": 0}
    expected = layer(x, tensors, bias, statics)
    torch.testing.assert_close(quant_cuda(x, tensors, bias, **statics), expected, atol=1e-4, rtol=1e-4)
    assert layer.cuda and torch._C._dispatch_has_kernel_for_dispatch_key(f"tngraph::{layer.name}", "CUDA")


def test_what_the_kernel_cannot_take_is_named():
    factors, _ = _layer(8, 0)
    tensors = [factors[k] for k in QUANT.factors]
    x = torch.randn(3, 96).to(DEVICE)
    assert "16-bit" in kernels.supported(x, *tensors[:2], 16)
    assert "width" in kernels.supported(x[:, :64], *tensors[:2], 8)
    assert "torch.int32" in kernels.supported(x.to(torch.int32), *tensors[:2], 8)
    assert "stores torch.uint8 codes" in kernels.supported(x, *tensors[:2], 4)  # int8 codes read as packed 4-bit ones
    with pytest.raises(ValueError, match="cannot run"):
        kernels.quant_matmul(x[:, :64], *tensors, 8)


@pytest.mark.gpu
def test_the_module_runs_the_kernel_on_the_gpu():
    factors, bias = _layer(4, 32, out=256, width=512)
    module = LayerLinear(QUANT, factors, 512, 256, bias, {"bits": 4}).cuda()
    x = torch.randn(64, 512, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        y = module(x)
        expected = x.float() @ module.weight.float().T + bias
    torch.testing.assert_close(y.float(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(DEVICE == "cuda", reason="the smoke run is the interpreter's")
def test_the_benchmark_runs_and_checks_the_kernel(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "tools" / "bench_quant_kernel.py"
    spec = importlib.util.spec_from_file_location("bench_quant_kernel", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--device", "cpu", "--dtype", "fp32", "--shapes", "128x40", "--rows", "3"]) == 0
    printed = capsys.readouterr().out
    assert "int8" in printed and "int4 g128" in printed
