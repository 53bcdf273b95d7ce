"""Precision in the plan (issue 25): quantized layers (tngraph.layers.quant) chosen per target by the
budgeted allocation under a byte budget (Config.bits), through graph, module, artifact, ONNX and
the torch.compile backend."""
import copy
import json

import pytest
import torch

import tngraph
from tngraph.errors import ConfigError
from tngraph.layers import QFACTORS, QLOWRANK, QUANT, LayerLinear
from tngraph.tn.quant import (Choice, QuantSpec, candidates, dequantize_layer, factored, gptq, layer_tensors, layer_weight, output_error, quantize,
                              pack_rows, quantize_choice, rtn, tensor_bytes, unpack_rows)

from tests.conftest import MLP, backend_spy


def _data(width=64, batches=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g)
    return [((torch.randn(16, width, generator=g) @ mix,), {}) for _ in range(batches)]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rows_pack_low_bits_first_and_come_back(bits):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2**bits, (6, 32), generator=g).to(torch.uint8)
    packed = pack_rows(codes, bits)
    assert packed.shape == (6, 32 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_rows(packed, bits), codes)
    if bits == 4:  # onnxruntime's MatMulNBits / ONNX uint4 layout: the first value in the low nibble
        assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)
    with pytest.raises(ValueError, match="divisible"):
        pack_rows(codes[:, :3], 2)


@pytest.mark.parametrize("bits,group", [(16, None), (8, None), (4, 16), (4, None), (2, 32)])
def test_layer_tensors_store_what_the_quantizer_chose(bits, group):
    w = torch.randn(24, 64)
    q = rtn(w, QuantSpec(bits, group))
    tensors = layer_tensors(q)
    assert torch.equal(dequantize_layer(tensors["codes"], tensors["scales"], tensors["zeros"], bits, torch.float32), q.dequantize())
    # stored bytes: codes at `bits` per weight plus 2-byte scales and 1-byte zero points per group
    groups = 64 // (group or 64)
    assert tensor_bytes(tensors) == 24 * 64 * bits // 8 + 24 * groups * (2 + 1)
    with pytest.raises(ValueError, match="runs"):
        layer_tensors(rtn(w, QuantSpec(3, 16)))


def test_candidates_cover_the_widths_asked_for():
    found = candidates((16, 8, 4), 96, 384)
    assert Choice(16) in found and Choice(8) in found and Choice(4, 128) in found and Choice(4, 0) in found
    assert Choice(4, 128, 16) in found and not any(c.bits == 2 for c in found)
    assert all(c.group == 0 or 384 % c.group == 0 for c in found)
    assert [c for c in candidates((4,), 8, 20) if c.rank] == [] and Choice(4, 0) in candidates((4,), 8, 20)  # no group divides 20


def _low_rank_weight(out=48, width=64, rank=6, seed=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, width, generator=g) @ torch.randn(width, width, generator=g) * 0.2
    w = torch.randn(out, rank, generator=g) @ torch.randn(rank, width, generator=g) + 0.02 * torch.randn(out, width, generator=g)
    return w, (x.T @ x).double()


def test_quantized_factors_feed_back_error_and_improve_with_bits_and_rank():
    w, gram = _low_rank_weight()
    err = {(bits, rank): factored(w, QuantSpec(bits, 16 if bits < 8 else None), rank, gram).error for bits in (4, 8) for rank in (4, 8, 16)}
    assert all(err[(4, r)] > err[(8, r)] for r in (4, 8, 16)) and err[(8, 4)] > err[(8, 8)] > err[(8, 16)]
    # at full rank and 16 bits the factors are the weight, to fp16
    exact = factored(w, QuantSpec(16), 48, gram)
    assert exact.error < 1e-6 and exact.a.codes.dtype == torch.float16
    # error feedback between the factors (A refit to the quantized B, then quantized on the Gram of x B'^T)
    # beats quantizing both factors as they come, and beats rounding to nearest
    spec = QuantSpec(4, 16)
    fed, plain = factored(w, spec, 8, gram), factored(w, spec, 8, gram, refit=False)
    rounded = factored(w, spec, 8, None)
    assert fed.error < plain.error and fed.error < output_error(w, rounded.dequantize(), gram)
    assert fed.error == pytest.approx(output_error(w, fed.dequantize(), gram))
    for bad, words in ((dict(rank=0), "rank must be"), (dict(rank=49), "rank must be"), (dict(spec=QuantSpec(4, 24)), "does not divide"),
                       (dict(spec=QuantSpec(5)), "not offered")):
        with pytest.raises(ValueError, match=words):
            factored(w, bad.get("spec", spec), bad.get("rank", 8), gram)


def test_quantized_factor_candidates_and_their_stored_bytes():
    found = [c for c in candidates((16, 8, 4, 2), 384, 1536) if c.factored]
    # ranks keeping 1/8, 1/4, 1/2 of the values, multiples of 8, at 8 bits per channel and 4 bits in groups of 32
    assert {c.rank for c in found} == {32, 72, 152} and {(c.bits, c.group) for c in found} == {(8, 0), (4, 32)}
    assert all(c.format == "qfactors" and c.params(384, 1536) == c.rank * (384 + 1536) for c in found)
    w, gram = _low_rank_weight()
    tensors = quantize_choice(w, Choice(4, 32, 8, True), gram)
    assert sorted(tensors) == sorted(QFACTORS.factors)
    # B (8 x 64): 4-bit codes in 2 groups of 32; A (48 x 8): narrower than a group, per channel
    assert tensors["scales_b"].shape == (8, 2) and tensors["scales_a"].shape == (48, 1)
    assert tensor_bytes(tensors) == (48 * 8 + 8 * 64) // 2 + (48 * 1 + 8 * 2) * 3


@pytest.mark.parametrize("layer,rank,factored_", [(QUANT, 0, False), (QLOWRANK, 4, False), (QFACTORS, 8, True)])
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 16), (2, 32), (16, 0)])
def test_op_module_and_reference_agree_with_the_dequantized_weight(layer, rank, factored_, bits, group):
    g = torch.Generator().manual_seed(2)
    w, bias = torch.randn(20, 64, generator=g), torch.randn(20, generator=g)
    x = torch.randn(3, 5, 64, generator=g)
    gram = (x.reshape(-1, 64).T @ x.reshape(-1, 64)).double() + torch.eye(64, dtype=torch.float64)
    factors = quantize_choice(w, Choice(bits, group, rank, factored_), gram)
    assert sorted(factors) == sorted(layer.factors)
    tensors = [factors[k] for k in layer.factors]
    expected = x @ layer_weight(tensors, bits).T + bias
    statics = {"bits": bits, "act_bits": 0}
    torch.testing.assert_close(layer(x, tensors, bias, statics), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.call_op(x, tensors, bias, statics), expected, rtol=1e-5, atol=1e-5)
    module = LayerLinear(layer, factors, 64, 20, bias.clone(), statics)
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    # integer codes are buffers (nothing trains them); the fp16 scales take gradients through the op
    side = "_b" if factored_ else ""
    assert {n for n, _ in module.named_buffers()} >= {"zeros" + side} | ({"codes" + side} if bits != 16 else set())
    if bits != 16:
        scales = getattr(module, "scales" + side)
        scales.data = scales.data.float()
        module(x).square().sum().backward()
        assert scales.grad is not None and torch.isfinite(scales.grad).all()


def test_int8_activations_run_the_integer_gemm_close_to_weight_only():
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(48, 64, generator=g), torch.randn(4, 7, 64, generator=g)
    factors = quantize_choice(w, Choice(8), None)
    tensors = [factors[k] for k in QUANT.factors]
    weight_only = QUANT(x, tensors, None, {"bits": 8, "act_bits": 0})
    integer = QUANT(x, tensors, None, {"bits": 8, "act_bits": 8})
    # each row of x on a 127-step grid: by hand
    rows = x.reshape(-1, 64)
    step = rows.abs().amax(-1, keepdim=True) / 127
    by_hand = (torch.round(rows / step) * step) @ layer_weight(tensors, 8).T
    torch.testing.assert_close(integer.reshape(-1, 48), by_hand, rtol=1e-4, atol=1e-4)
    assert float((integer - weight_only).norm() / weight_only.norm()) < 0.02
    graph = torch.fx.experimental.proxy_tensor.make_fx(lambda x: QUANT(x, tensors, None, {"bits": 8, "act_bits": 8}))(x)
    assert any(n.target == torch.ops.aten._int_mm.default for n in graph.graph.nodes)


def test_config_refuses_precision_it_cannot_allocate():
    assert tngraph.Config(bits="16,8,4").budget_kind == "bytes" and tngraph.Config(bits="4,8").bits == (8, 4)
    assert tngraph.Config().budget_kind == "params" and tngraph.Config().replace(bits=(8,)).budget_kind == "bytes"
    assert tngraph.Config(bits=(8,)).replace(bits=()).budget_kind == "params"
    for bad, words in ((dict(bits="3"), "precisions of 16, 8, 4, 2"), (dict(bits=(4,), budget_kind="params"), "byte budget"),
                       (dict(bits=(4,), allocation="uniform"), "budgeted allocation"), (dict(bits=(4,), format="tt"), "budgeted allocation"),
                       (dict(act_bits=4), "act_bits")):
        with pytest.raises(ConfigError, match=words):
            tngraph.Config(**bad)


@pytest.fixture(scope="module")
def quantized():
    model, data = MLP(dims=(64, 128, 128, 32)).eval(), _data()
    config = tngraph.Config(budget=0.2, bits=(16, 8, 4, 2), sensitivity="fisher", heal_steps=0, progress=False)
    return model, data, tngraph.compress_with_result(model, calibration=data, config=config)


def test_allocation_chooses_bits_within_the_byte_budget_and_the_graph_runs_them(quantized):
    model, data, result = quantized
    plan = result.context.plan
    assert set(plan) == {"layers.0", "layers.1", "layers.2"} and all(p.format in ("quant", "qlowrank") for p in plan.values())
    dense_bytes = sum(4 * p.params_before for p in plan.values())
    assert sum(p.bytes_after() for p in plan.values()) <= 0.2 * dense_bytes
    # the graph holds one quantized op per target, its statics the plan's bits
    ops = [n for n in result.graph.graph.nodes if n.op == "call_function" and n.target in (QUANT.op, QLOWRANK.op)]
    assert len(ops) == 3 and sorted(n.args[3] for n in ops) == sorted(p.quant["bits"] for p in plan.values())
    # each layer's weight is what error feedback on the calibration Gram gives, its scales refit to
    # the codes (quantize: gptq, then fit_scales), and the model stays close
    for name, p in plan.items():
        layer = model.get_submodule(name)
        x = torch.cat([a[0] for a, _ in data]) if name == "layers.0" else None
        if x is not None:
            gram = x.T.double() @ x.double()
            spec = QuantSpec(p.quant["bits"], p.quant["group"] or None)
            expected = quantize(layer.weight, spec, gram).dequantize()
            torch.testing.assert_close(result.module.get_submodule(name).weight, expected, rtol=0, atol=1e-6)
            assert output_error(layer.weight, expected, gram) < output_error(layer.weight, gptq(layer.weight, spec, gram).dequantize(), gram)
    x = data[0][0][0]
    assert torch.nn.functional.cosine_similarity(result.module(x), model(x)).mean() > 0.99


def test_quantized_artifact_round_trips_byte_for_byte(quantized, tmp_path):
    model, data, result = quantized
    first = tngraph.save(result.module, tmp_path / "a")
    recipe = json.loads((first / "recipe.json").read_text())
    assert all(t["quant"]["bits"] in (16, 8, 4, 2) for t in recipe["targets"])
    loaded = tngraph.load(first, model=copy.deepcopy(model))  # load swaps the layers of the model it is given
    x = data[1][0][0]
    torch.testing.assert_close(loaded(x), result.module(x), rtol=0, atol=0)
    codes = [m.codes for m in loaded.modules() if isinstance(m, LayerLinear)]
    assert all(c.dtype in (torch.int8, torch.uint8, torch.float16) for c in codes)
    second = tngraph.save(loaded, tmp_path / "b")
    assert (first / "factors.safetensors").read_bytes() == (second / "factors.safetensors").read_bytes()


def test_quantized_model_exports_to_onnx(quantized, tmp_path):
    pytest.importorskip("onnxruntime")
    from tngraph.lowering.onnx import export_onnx

    from tngraph.lowering.tensorrt import check_tensorrt

    model, data, result = quantized
    plan = result.context.plan
    low = sum(p.quant["bits"] < 16 and not (p.quant["bits"] == 8 and p.quant["act_bits"] == 8) for p in plan.values())
    # onnxruntime (default): weight-only codes in its MatMulNBits, the codes packed in the file as stored
    report = export_onnx(result.module, data[0][0], tmp_path / "q.onnx")
    assert report.max_abs_diff < 1e-4 and report.op_counts.get("com.microsoft::MatMulNBits", 0) == low > 0
    assert any(p.op_type == "com.microsoft::MatMulNBits" for p in check_tensorrt(report.path))  # named for TensorRT
    # standard: ONNX's own operators only, which TensorRT's check takes
    standard = export_onnx(result.module, data[0][0], tmp_path / "s.onnx", quant_ops="standard")
    assert standard.max_abs_diff < 1e-4 and not any(k.startswith("com.microsoft") for k in standard.op_counts)
    assert not [p for p in check_tensorrt(standard.path) if p.severity == "error"]
    with pytest.raises(ConfigError, match="quant_ops"):
        export_onnx(result.module, data[0][0], tmp_path / "x.onnx", quant_ops="tensorrt")


def test_backend_compiles_with_bits(quantized):
    model, data, _ = quantized
    torch._dynamo.reset()
    spy = backend_spy()
    compiled = torch.compile(model, backend=spy, options={"budget": 0.2, "bits": "8,4", "sensitivity": "fisher", "fallback": "eager",
                                                          "calibration": [a for a, _ in data]})
    x = data[2][0][0]
    y = compiled(x)
    ops = [n for g in spy.graphs for n in g.graph.nodes if n.op == "call_function" and n.target in (QUANT.op, QLOWRANK.op)]
    assert len(ops) == 3, [str(g.graph) for g in spy.graphs]
    assert torch.nn.functional.cosine_similarity(y, model(x)).mean() > 0.99


@pytest.mark.parametrize("sensitivity", ["fisher", "measured"])
def test_precision_candidates_join_the_curves_at_their_stored_bytes(sensitivity):
    """Each target's curve holds its precision candidates at the bytes their tensors store; their loss
    falls with bits; "measured" measures each candidate's share of the output error with the other
    targets dense."""
    model, data = MLP(dims=(64, 128, 128, 32)).eval(), _data()
    config = tngraph.Config(budget=0.3, bits=(8, 4, 2), sensitivity=sensitivity, heal_steps=0, progress=False)
    result = tngraph.compress_with_result(model, calibration=data, config=config)
    ctx = result.context
    for name, points in ctx.analysis["quant"].items():
        curve = ctx.curves[name]
        t = {p.name: p for p in result.context.plan.values()}.get(name)
        for choice, nbytes, rel in points:
            i = curve.quant.index(choice)
            assert curve.cost[i] == nbytes and curve.formats[i] == choice.format
        loss = {c: curve.loss[curve.quant.index(c)] for c, _, _ in points}
        best = {b: min(v for c, v in loss.items() if c.bits == b and not c.factored) for b in (8, 4, 2)}
        assert best[8] < best[4] < best[2]
        # none kept that another candidate beats in both bytes and predicted error; quantized factors offered
        assert not any(q[1] <= p[1] and q[2] < p[2] for p in points for q in points)
        assert any(c.factored for c in loss) and ctx.counters["sensitivity.quant.dominated"] > 0
        assert t is not None and t.quant is not None
    if sensitivity == "measured":
        shares = ctx.analysis["quant_measured"]
        assert set(shares) == set(ctx.analysis["quant"])
        assert all(s[Choice(8)] < min(v for c, v in s.items() if c.bits == 2) for s in shares.values())


def _output_error(model, compressed, data) -> float:
    x = torch.cat([a[0] for a, _ in data])
    with torch.no_grad():
        return float(((compressed(x) - model(x)) ** 2).sum() / (model(x) ** 2).sum())


def test_refine_measures_around_the_fisher_allocation_and_allocates_again():
    """refine=N: around each target's allocated candidate, N hull neighbours a side are measured end to
    end with the others at their allocation; the measured shares become the curve's losses, the rest
    of the curve is rescaled, and the new allocation (within the budget) is no worse on the model."""
    model, data = MLP(dims=(64, 128, 128, 32)).eval(), _data()
    config = tngraph.Config(budget=0.12, bits=(16, 8, 4, 2), sensitivity="fisher", heal_steps=0, progress=False)
    plain = tngraph.compress_with_result(model, calibration=data, config=config)
    refined = tngraph.compress_with_result(model, calibration=data, config=config.replace(refine=1))
    ctx = refined.context
    assert "refined" not in plain.context.analysis and "sensitivity.refined" not in plain.context.counters
    measured = ctx.analysis["refined"]
    assert set(measured) == {"layers.0", "layers.1", "layers.2"}
    assert sum(len(m) for m in measured.values()) == ctx.counters["sensitivity.refined"] <= 3 * 3
    for name, shares in measured.items():
        curve, before = ctx.curves[name], plain.context.curves[name]
        assert 1 <= len(shares) <= 3 and all(curve.ranks[j] is not None for j in shares)
        for j, (predicted, share) in shares.items():
            assert predicted == before.loss[j]  # what fisher predicted, then what the model measured
            assert curve.loss[j] == (share if share > 0 else curve.loss[j])
        assert curve.loss != before.loss and curve.loss[-1] == 0.0  # the rest rescaled; dense stays exact
    dense_bytes = sum(4 * p.params_before for p in ctx.plan.values())
    assert sum(p.bytes_after() for p in ctx.plan.values()) <= 0.12 * dense_bytes
    assert _output_error(model, refined.module, data) <= _output_error(model, plain.module, data) * (1 + 1e-9)
    for bad, words in ((dict(refine=-1), "refine"), (dict(refine=65), "refine"), (dict(refine=1, allocation="uniform"), "budgeted allocation")):
        with pytest.raises(ConfigError, match=words):
            tngraph.Config(**bad)


def test_healing_trains_biases_of_quantized_layers_not_their_stored_fp16_tensors(quantized):
    from tngraph.heal import trainable

    _, _, result = quantized
    chosen = trainable(result.module)
    assert {"layers.0.bias", "layers.1.bias", "layers.2.bias"} <= set(chosen)
    assert not [n for n, p in chosen.items() if p.dtype == torch.float16]


def test_int8_activations_fuse_and_run_in_the_pipeline():
    model, data = MLP(dims=(64, 128, 128, 32)).eval(), _data()
    config = tngraph.Config(budget=0.3, bits=(8,), act_bits=8, sensitivity="fisher", heal_steps=0, progress=False)
    result = tngraph.compress_with_result(model, calibration=data, config=config)
    ops = [n for n in result.graph.graph.nodes if n.op == "call_function" and n.target == QUANT.op]
    assert len(ops) == 3 and all(n.args[3:] == (8, 8) for n in ops)
    x = data[0][0][0]
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(result.module(x), model(x)).mean() > 0.999
        torch.testing.assert_close(result.graph(x)[0] if isinstance(result.graph(x), tuple) else result.graph(x), result.module(x))
    # Inductor stores each int8 layer's input once (its producer is not recomputed for the row maximum
    # and the rounding); weight-only and dense models keep Inductor's defaults
    assert tngraph.compile_options(result.module) == tngraph.compile_options(result.graph) == {"realize_opcount_threshold": 8}
    weight_only = tngraph.compress(model, calibration=data, config=config.replace(act_bits=0))
    assert tngraph.compile_options(weight_only) == {} and tngraph.compile_options(model) == {}
    torch._dynamo.reset()
    compiled = torch.compile(result.module, options=tngraph.compile_options(result.module))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), result.module(x), rtol=1e-4, atol=1e-4)


def test_backend_compiles_int8_activations_with_the_options_they_need(monkeypatch):
    """torch.compile(backend="tngraph") with --act-bits 8 hands Inductor the graph's `_int_mm` layers
    with compile_options' patch, and its output stays close to the model's."""
    import torch._inductor.compile_fx as inductor

    model, data = MLP(dims=(64, 128, 128, 32)).eval(), _data()
    seen, real = [], inductor.compile_fx
    monkeypatch.setattr(inductor, "compile_fx", lambda gm, inputs, config_patches=None, **kw: (seen.append(config_patches),
                                                                                                real(gm, inputs, config_patches=config_patches, **kw))[1])
    torch._dynamo.reset()
    spy = backend_spy()
    compiled = torch.compile(model, backend=spy, options={"budget": 0.3, "bits": "8", "act_bits": 8, "sensitivity": "fisher",
                                                          "calibration": [a for a, _ in data]})
    x = data[2][0][0]
    with torch.no_grad():
        y = compiled(x)
        assert torch.nn.functional.cosine_similarity(y, model(x)).mean() > 0.999
    assert sum(n.target == torch.ops.aten._int_mm.default for g in spy.graphs for n in g.graph.nodes) == 3
    assert seen[0] == {"realize_opcount_threshold": 8}  # (Inductor calls itself again inside the patch)


def test_low_rank_layers_take_quantized_factors_through_artifact_onnx_and_compile(tmp_path):
    """Where a weight is low rank, a byte budget below its cheapest codes takes quantized factors
    (format qfactors): the graph holds the op, the artifact round-trips byte for byte, the ONNX file
    runs in onnxruntime, and torch.compile runs the loaded module."""
    model, data = MLP(dims=(64, 128, 128, 32)).eval(), _data()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.layers:
            out, width = layer.weight.shape
            layer.weight.copy_(torch.randn(out, 4, generator=g) @ torch.randn(4, width, generator=g) / width**0.5)
    config = tngraph.Config(budget=0.07, bits=(16, 8, 4, 2), sensitivity="fisher", heal_steps=0, progress=False)
    result = tngraph.compress_with_result(model, calibration=data, config=config)
    plan = result.context.plan
    chosen = [p for p in plan.values() if p.format == "qfactors"]
    assert chosen and all(p.quant["bits"] in (8, 4) and p.rank >= 8 for p in chosen)
    assert sum(p.bytes_after() for p in plan.values()) <= 0.07 * sum(4 * p.params_before for p in plan.values())
    assert sum(n.op == "call_function" and n.target == QFACTORS.op for n in result.graph.graph.nodes) == len(chosen)
    x = data[0][0][0]
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(result.module(x), model(x)).mean() > 0.99
    first = tngraph.save(result.module, tmp_path / "a")
    loaded = tngraph.load(first, model=copy.deepcopy(model))
    assert (first / "factors.safetensors").read_bytes() == (tngraph.save(loaded, tmp_path / "b") / "factors.safetensors").read_bytes()
    pytest.importorskip("onnxruntime")
    from tngraph.lowering.onnx import export_onnx

    assert export_onnx(loaded, x, tmp_path / "f.onnx").max_abs_diff < 1e-4
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(loaded)(x), loaded(x), rtol=1e-4, atol=1e-4)


def test_fp16_candidates_fuse_though_their_reference_reads_no_scales(mlp, mlp_data):
    """bits=(16,): an fp16 target's reference leaves its scale and zero-point inputs unread; the fuse
    pass matched its region with those placeholders in the pattern and failed (KeyError) before."""
    result = tngraph.compress_with_result(mlp, calibration=mlp_data, budget=0.6, bits=(16,), sensitivity="fisher", heal_steps=0,
                                          progress=False)
    fp16 = [name for name, plan in result.context.plan.items() if plan.format == "quant"]
    assert fp16 and result.context.counters["fuse.quant.applied"] == len(fp16)
    ops = {str(n.target) for n in result.graph.graph.nodes if n.op == "call_function"}
    assert any("tngraph" in op and "quant" in op for op in ops), ops
    x = mlp_data[0][0][0]
    with torch.no_grad():
        assert (result.module(x) - mlp(x)).norm() / mlp(x).norm() < 0.05
