"""A layer kind defined once (tngraph.layers): the lrbd format (low rank + block diagonal) end to end
from its format file and its layer's reference alone: the op, the graph factorize writes and fuse
fuses, unfuse, the module, the artifact and the ONNX file all come from that one function."""
import copy

import pytest
import torch
import torch.nn.functional as F

import tngraph
from tngraph.layers import LAYERS, OPS, LayerLinear
from tngraph.tn import conv as conv_formats
from tngraph.tn.quant import Choice, quantize_choice
from tngraph.layers.lrbd import LRBD
from tngraph.passes.fuse import unfuse
from tngraph.tn import decompose_lowrank
from tngraph.tn.formats import FORMATS
from tngraph.tn.formats import lrbd as lrbd_format
from tngraph.tn.whitening import whitening_from_gram

CONFIG = dict(format="lrbd", budget=0.5, heal_steps=0, calibration_samples=32, allocation="uniform", progress=False)


def _factors(out=48, inp=32, rank=4, blocks=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(out, rank, generator=g), "b": torch.randn(rank, inp, generator=g),
            "d": torch.randn(blocks, out // blocks, inp // blocks, generator=g)}


def test_the_op_the_module_and_the_dense_weight_are_the_reference():
    f = _factors()
    x, bias = torch.randn(3, 5, 32), torch.randn(48)
    w = LRBD.weight(f, 32)
    assert w.shape == (48, 32)
    block = torch.block_diag(*f["d"])
    assert torch.allclose(w, f["a"] @ f["b"] + block)
    expected = x @ w.T + bias
    assert torch.allclose(LRBD.reference(x, [f["a"], f["b"], f["d"]], bias), expected, atol=1e-5)
    assert torch.allclose(torch.ops.tngraph.lrbd(x, [f["a"], f["b"], f["d"]], bias), expected, atol=1e-5)
    module = LayerLinear(LRBD, f, 32, 48, bias)
    assert torch.allclose(module(x), expected, atol=1e-5) and "lrbd" in repr(module)
    # the identity probe (the default of a layer without its own weight) gives the same matrix
    probe = tngraph.layers.Layer("probe", LRBD.reference, LRBD.factors, LRBD.op)
    assert torch.allclose(probe.weight(f, 32), w, atol=1e-5)
    with pytest.raises(ValueError, match="needs factors"):
        LayerLinear(LRBD, {"a": f["a"], "b": f["b"]}, 32, 48)
    assert OPS[torch.ops.tngraph.lrbd.default] is LRBD and LAYERS["lrbd"] is LRBD


def test_the_format_beats_its_own_low_rank_part_in_the_whitened_norm():
    """Each alternating step minimises the whitened error exactly, starting from the whitened SVD at
    the same rank: the blocks can only lower it; params count both parts."""
    torch.manual_seed(0)
    local = torch.block_diag(*torch.randn(16, 4, 3)) * 3  # a weight with a strong diagonal-block part
    w = torch.randn(64, 8) @ torch.randn(8, 48) * 0.3 + local + 0.05 * torch.randn(64, 48)
    x = torch.randn(400, 48) * torch.linspace(0.2, 2.0, 48)
    white = whitening_from_gram(x.T.double() @ x.double(), 1e-4)

    def error(m):
        return float(((w - m) @ x.T).norm() / (w @ x.T).norm())

    fmt = FORMATS["lrbd"]
    assert fmt.layer == "lrbd" and fmt.params(64, 48, 8) == 8 * (64 + 48) + 64 * 48 // 16
    factors = fmt.decompose(w, 8, white)
    a, b = decompose_lowrank(w, 8, white)
    assert error(LRBD.weight(factors, 48)) < 0.5 * error(a @ b)
    # the block fit is the closed form: one more fit of the blocks to the residual changes nothing much
    refit = lrbd_format.fit_blocks((w - factors["a"] @ factors["b"]).double(), white.s @ white.s.T, 16).float()
    assert error(factors["a"] @ factors["b"] + torch.block_diag(*refit)) <= error(LRBD.weight(factors, 48)) + 1e-6
    with pytest.raises(ValueError, match="share a divisor"):
        fmt.params(7, 48, 1)


def test_the_format_keeps_the_contract_of_every_format():
    """What the allocator and the guard rely on, as tests/test_network.py checks it for the tensor-network formats."""
    from tngraph.tn.formats import rank_for_params

    fmt = FORMATS["lrbd"]
    for o, i in ((48, 32), (64, 64), (96, 48)):
        w = torch.randn(o, i, dtype=torch.float64, generator=torch.Generator().manual_seed(o))
        full = fmt.decompose(w, fmt.max_rank(o, i))
        assert torch.linalg.norm(LRBD.weight(full, i) - w) <= 1e-6 * torch.linalg.norm(w)
        rank = fmt.max_rank(o, i) // 3
        factors = fmt.decompose(w, rank)
        assert sum(t.numel() for t in factors.values()) == fmt.params(o, i, rank)
    for o, i in ((384, 384), (1536, 384), (384, 1536)):
        for kept in (0.25, 0.5):
            r = rank_for_params(fmt, o, i, kept * o * i)
            assert fmt.params(o, i, r) <= kept * o * i < fmt.params(o, i, r + 1)
    w = torch.randn(12, 8)
    for rank in (0, -1, 9, 2.5):
        with pytest.raises(ValueError, match="rank must be an integer"):
            fmt.decompose(w, rank)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fmt.decompose(bad, 1)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm):
    from tests.conftest import write_tiny_bert
    from tngraph.models import load_model, resolve

    folder = write_tiny_bert(tmp_path_factory.mktemp("bert"), minilm[1])
    model, tokenizer = load_model(resolve(str(folder)))
    return model, tokenizer


@pytest.fixture(scope="module")
def compressed(tiny_bert, sentences):
    model, tokenizer = tiny_bert
    return tngraph.compress_with_result(copy.deepcopy(model), calibration=sentences.calibration[:32], tokenizer=tokenizer, config=tngraph.Config(**CONFIG))


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_the_graph_holds_one_lrbd_op_per_target_and_unfuses_to_the_same_numbers(tiny_bert, compressed, sentences):
    model, tokenizer = tiny_bert
    targets = compressed.recipe["targets"]
    assert targets and {t["format"] for t in targets} == {"lrbd"}
    ops = _ops(compressed.graph)
    assert ops.count(torch.ops.tngraph.lrbd.default) == len(targets)
    assert torch.ops.tngraph.lowrank.default not in ops  # the lowrank rule left the layer's inner chain alone
    counters = compressed.context.counters
    assert counters["layer_linear.applied"] == counters["fuse.lrbd.applied"] == len(targets)
    compressed.graph.graph.lint()
    enc = dict(tokenizer(sentences.evaluation[:4], padding=True, return_tensors="pt"))
    with torch.no_grad():
        fused = compressed.graph(**enc)
        expanded_gm = unfuse(copy.deepcopy(compressed.graph))
        expanded = expanded_gm(**enc)
        module_out = compressed.module(**enc).last_hidden_state
    assert torch.ops.tngraph.lrbd.default not in _ops(expanded_gm) and torch.ops.aten.bmm.default in _ops(expanded_gm)
    first = lambda out: out[0] if isinstance(out, (tuple, list)) else out["last_hidden_state"]  # noqa: E731
    assert torch.allclose(first(fused), first(expanded), atol=1e-5)
    assert torch.allclose(first(fused), module_out, atol=1e-4)
    # the module's layers are the defined layer, holding the factors the recipe lists
    for t in targets:
        sub = compressed.module.get_submodule(t["name"])
        assert isinstance(sub, LayerLinear) and {k: list(v.shape) for k, v in zip(LRBD.factors, sub.factors())} == t["factors"]
        assert sum(p.numel() for p in sub.factors()) == FORMATS["lrbd"].params(t["out_features"], t["in_features"], t["rank"])


def test_the_artifact_and_the_onnx_file_come_from_the_same_definition(tiny_bert, compressed, sentences, tmp_path):
    import onnxruntime as ort

    from tngraph.lowering.onnx import export_onnx

    model, tokenizer = tiny_bert
    tngraph.save(compressed.module, tmp_path / "art")
    loaded = tngraph.load(tmp_path / "art", copy.deepcopy(model))
    enc = dict(tokenizer(sentences.evaluation[:3], padding="max_length", max_length=12, truncation=True, return_tensors="pt"))
    with torch.no_grad():
        expected = compressed.module(**enc).last_hidden_state
        assert torch.equal(loaded(**enc).last_hidden_state, expected)
    result = export_onnx(loaded, enc, tmp_path / "m.onnx")  # checker, then onnxruntime against PyTorch
    assert result.max_abs_diff <= 1e-4 and not [op for op in result.op_counts if "::" in op]  # plain ONNX ops only
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in enc.items() if k in {i.name for i in session.get_inputs()}})[0]
    assert torch.allclose(torch.from_numpy(got), expected, atol=1e-4)
    # the fused graph (tngraph::lrbd nodes) exports too: its layers are expanded from the same reference
    graph_result = export_onnx(compressed.graph, enc, tmp_path / "g.onnx", dynamic=False)
    assert graph_result.max_abs_diff <= 1e-4


def test_a_layer_the_format_cannot_take_is_an_error_naming_it():
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.ReLU(), torch.nn.Linear(24, 7))
    batches = [((torch.randn(8, 12),), {}) for _ in range(4)]
    with pytest.raises(tngraph.ConfigError, match=r"^2: lrbd needs a layer whose sides share a divisor of at least 4; 7x24 shares 1") as info:
        tngraph.compress(model, calibration=batches, format="lrbd", heal_steps=0, progress=False)
    assert "--exclude 2" in str(info.value)
    kept = tngraph.compress(model, calibration=batches, format="lrbd", heal_steps=0, progress=False, exclude=[r"^2$"])
    assert isinstance(kept[0], LayerLinear) and isinstance(kept[2], torch.nn.Linear)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_layer_op_is_its_reference_with_its_gradients_and_kernels(name):
    """Every layer (low rank, network, lrbd, the three convolutions, the three quantized) through the one definition: the op on the CPU is the
    reference bit for bit, its gradients are the reference's (gradcheck), the module is the op, and
    a layer with kernels has a CUDA implementation registered with its op."""
    from tngraph.modules import LowRankLinear, NetworkLinear
    from tngraph.tn.formats import FORMATS

    g = torch.Generator().manual_seed(5)
    weight = torch.randn(24, 32, generator=g, dtype=torch.float64)
    if name == "lowrank":
        a, b = decompose_lowrank(weight, 4)
        module = LowRankLinear(a, b, torch.randn(24, generator=g, dtype=torch.float64))
    elif name == "network":
        module = NetworkLinear(FORMATS["tt"].decompose(weight, 3), torch.randn(24, generator=g, dtype=torch.float64))
    elif name.startswith("conv"):  # a 3 x 3 convolution of 8 channels (its unfolded weight 24 x 72), strided and padded
        geometry = {"in_channels": 8, "kernel": [3, 3], "stride": [2, 1], "padding": [1, 1], "dilation": [1, 1]}
        kernel = torch.randn(24, 8, 3, 3, generator=g, dtype=torch.float64)
        if name == "conv":
            a, b = decompose_lowrank(kernel.view(24, 72), 4)
            factors = {"a": a, "b": b}
        else:
            factors = conv_formats.decompose(name.removeprefix("conv_"), kernel, 4)
        module = LayerLinear(LAYERS[name], factors, 72, 24, torch.randn(24, generator=g, dtype=torch.float64), geometry)
    elif name in ("quant", "qlowrank", "qfactors"):  # int4 codes in groups of 16 (+ a rank-4 correction; or rank-8 factors); scales and factors in float64
        factors = quantize_choice(weight.float(), Choice(4, 16, {"quant": 0, "qlowrank": 4, "qfactors": 8}[name], name == "qfactors"), None)
        factors = {k: v.double() if v.is_floating_point() else v for k, v in factors.items()}
        module = LayerLinear(LAYERS[name], factors, 32, 24, torch.randn(24, generator=g, dtype=torch.float64), {"bits": 4})
    else:
        factors = FORMATS["lrbd"].decompose(weight, 4)
        module = LayerLinear(LRBD, factors, 32, 24, torch.randn(24, generator=g, dtype=torch.float64))
    layer = LAYERS[name]
    assert module.layer is layer and OPS[layer.op] is layer
    conv = name.startswith("conv")
    x = torch.randn(2, 8, 6, 5, generator=g, dtype=torch.float64) if conv else torch.randn(3, 5, 32, generator=g, dtype=torch.float64)
    factors, statics = module.factors(), module.statics
    with torch.no_grad():
        assert torch.equal(layer.call_op(x, factors, module.bias, statics), module(x))
        w = layer.weight(module.factor_dict(), module.in_features, statics)
        dense = F.conv2d(x, w.view(24, 8, 3, 3), module.bias, stride=(2, 1), padding=1) if conv else x @ w.T + module.bias
        torch.testing.assert_close(module(x), dense)
        assert torch.equal(module.weight, w)  # what model code reading a Linear's .weight gets
    inputs = [x.clone().requires_grad_(), *(f.detach().clone().requires_grad_(f.is_floating_point()) for f in factors), module.bias.detach().clone().requires_grad_()]
    n = len(factors)
    assert torch.autograd.gradcheck(lambda x, *rest: layer.call_op(x, list(rest[:n]), rest[n], statics), inputs)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tngraph::{name}", "CUDA") == layer.cuda
    assert layer.cuda == (name in ("lowrank", "network", "quant", "qlowrank", "qfactors")) and (layer.onnx is not None) == (name in ("network", "quant", "qlowrank", "qfactors"))


def test_a_layer_definition_names_what_it_cannot_take():
    from tngraph.layers import define

    with pytest.raises(TypeError, match="static 'eps' is a <class 'dict'>"):
        define("bad_static", lambda x, f, b, eps=None: x, ("w",), statics={"eps": (dict, None)})
    with pytest.raises(ValueError, match="epilogue 'act' is not one of its statics"):
        define("bad_epilogue", lambda x, f, b: x, ("w",), epilogue="act")
    with pytest.raises(ValueError, match=r"takes statics \['act'\], not \['gelu'\]"):
        LayerLinear(LAYERS["lowrank"], {"a": torch.zeros(3, 1), "b": torch.zeros(1, 2)}, 2, 3, statics={"gelu": "x"})
