"""ONNX export (tngraph.export_onnx, `tngraph export onnx`) and the TensorRT check."""
import collections
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import tngraph
from tngraph.errors import ArtifactError, ConfigError, DataError, ExportError
from tngraph.lowering.tensorrt import check_tensorrt
from tests.conftest import MLP


def _ops(path):
    return collections.Counter(n.op_type if not n.domain else f"{n.domain}::{n.op_type}" for n in onnx.load(str(path)).graph.node)


def _ort(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})


@pytest.fixture(scope="module")
def compressed_mlp():
    g = torch.Generator().manual_seed(1)
    data = [((torch.randn(16, 24, generator=g),), {}) for _ in range(4)]
    results = {}
    for fmt in ("lowrank", "tt", "tucker", "monarch"):
        config = tngraph.Config(budget=0.6, format=fmt, heal_steps=0, progress=False)
        results[fmt] = tngraph.compress_with_result(MLP().eval(), calibration=data, config=config)
    return results


@pytest.mark.parametrize("fmt", ["lowrank", "tt", "tucker", "monarch"])
def test_fused_graph_exports_as_standard_ops_and_matches(compressed_mlp, fmt, tmp_path):
    """The rewritten graph holds tngraph ops; the ONNX file holds their MatMul/Einsum translations,
    no custom domain, passes the checker and matches PyTorch at other batch sizes too."""
    gm = compressed_mlp[fmt].graph
    fused = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("tngraph.")]
    assert fused
    path = tmp_path / "g.onnx"
    result = tngraph.export_onnx(gm, (torch.randn(4, 24),), path)
    ops = _ops(path)
    onnx.checker.check_model(str(path), full_check=True)
    assert not any("::" in op for op in ops)
    if fmt == "lowrank":
        assert ops["MatMul"] + ops["Gemm"] >= 2 * len(fused) and "Einsum" not in ops
    else:
        assert ops["Einsum"] == len(fused)
    assert result.max_abs_diff <= 1e-5 and [c.shapes["x"][0] for c in result.checks] == [4, 5]
    for rows in (1, 7, 33):
        x = torch.randn(rows, 24)
        with torch.no_grad():
            ref = gm(x)
        (got,) = _ort(path, {"x": x})
        assert np.abs(got - ref.numpy()).max() < 1e-5
    assert not check_tensorrt(path)  # the translations avoid what TensorRT refuses (Einsum ellipsis)


def test_compressed_module_keeps_its_factors_in_the_file(compressed_mlp, tmp_path):
    """The user's module exports with its factor chain: the initializers are the factors, not dense weights."""
    module = compressed_mlp["lowrank"].module
    path = tmp_path / "m.onnx"
    tngraph.export_onnx(module, (torch.randn(3, 24),), path)
    shapes = sorted(tuple(i.dims) for i in onnx.load(str(path)).graph.initializer if len(i.dims) == 2)
    expected = sorted(tuple(p.shape) for n, p in module.named_parameters() if p.dim() == 2)
    assert shapes == expected
    x = torch.randn(6, 24)
    with torch.no_grad():
        assert np.abs(_ort(path, {"x": x})[0] - module(x).numpy()).max() < 1e-5


def test_network_module_exports_with_dynamic_rows(compressed_mlp, tmp_path):
    """NetworkLinear picks its contraction path per row count; under export it is one op, so the batch stays dynamic."""
    module = compressed_mlp["tt"].module
    path = tmp_path / "tt.onnx"
    result = tngraph.export_onnx(module, (torch.randn(4, 24),), path)
    assert result.dynamic_axes == {"x": {0: "batch"}}
    x = torch.randn(9, 24)
    with torch.no_grad():
        assert np.abs(_ort(path, {"x": x})[0] - module(x).numpy()).max() < 1e-5


def test_a_mismatch_beyond_the_tolerance_fails_and_writes_nothing(compressed_mlp, tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"differs from PyTorch's by .* \(tolerance 0\)"):
        tngraph.export_onnx(compressed_mlp["tt"].module, (torch.randn(4, 24) * 1e3,), path, tolerance=0.0)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("fmt", ["lowrank", "tucker"])
def test_reduced_precision_exports_hold_that_type_and_match(compressed_mlp, fmt, dtype, tmp_path):
    """--dtype fp16/bf16: every float weight, input and output of the file is of that type (what
    TensorRT's strongly typed engines run), the user's module stays float32, the file is checked
    against the float32 model (fp16 in onnxruntime itself, bf16 through the emulation: the CPU
    provider has no bf16 kernels), and the error is the precision's, not a broken graph's."""
    from onnx import TensorProto

    from tngraph.lowering.precision import file_precision

    elem = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[dtype]
    module = compressed_mlp[fmt].module
    x = torch.randn(4, 24)
    full = tngraph.export_onnx(module, (x,), tmp_path / "fp32.onnx")
    low = tngraph.export_onnx(module, (x,), tmp_path / "low.onnx", dtype=dtype)
    assert all(p.dtype == torch.float32 for p in module.parameters())
    proto = onnx.load(str(low.path))
    onnx.checker.check_model(str(low.path), full_check=True)
    floats = {t.data_type for t in proto.graph.initializer} - {TensorProto.INT64}
    assert floats == {elem} and file_precision(proto) == dtype
    assert [v.type.tensor_type.elem_type for v in (*proto.graph.input, *proto.graph.output)] == [elem, elem]
    assert low.dtype == dtype and low.emulated == (dtype == "bf16") and len(low.checks) == 2
    assert low.relative and not full.relative and low.max_rel_diff <= low.tolerance == {"fp16": 0.02, "bf16": 0.25}[dtype]
    assert full.max_abs_diff < 1e-5 < low.max_abs_diff < {"fp16": 1e-3, "bf16": 1e-2}[dtype]
    assert not check_tensorrt(low.path)
    if fmt == "tucker":  # ONNX's Einsum takes no bf16: the network layers are MatMuls there
        assert ("Einsum" in _ops(low.path)) == (dtype == "fp16") and "Einsum" in _ops(full.path)
    if dtype == "fp16":
        for rows in (1, 7):
            x = torch.randn(rows, 24)
            (got,) = _ort(low.path, {"x": x.half()})
            with torch.no_grad():
                assert got.dtype == np.float16 and np.abs(got.astype(np.float32) - module(x).numpy()).max() < 1e-3


@pytest.mark.parametrize("fmt", ["tt", "tucker", "monarch"])
def test_network_layers_lower_to_matmuls_exactly(compressed_mlp, fmt, tmp_path, monkeypatch):
    """The MatMul form of the network layers (used for bf16) is the same contraction: in float32
    it matches the module as closely as the Einsum form, at other batch sizes too."""
    from tngraph.layers import network

    monkeypatch.setattr(network, "is_bfloat16", lambda x: True)
    module = compressed_mlp[fmt].module
    result = tngraph.export_onnx(module, (torch.randn(4, 24),), tmp_path / "m.onnx")
    ops = _ops(result.path)
    assert "Einsum" not in ops and ops["MatMul"] >= 3 and result.max_abs_diff < 1e-5
    for rows in (1, 9):
        x = torch.randn(rows, 24)
        (got,) = _ort(result.path, {"x": x})
        with torch.no_grad():
            assert np.abs(got - module(x).numpy()).max() < 1e-5


def test_bf16_emulation_rounds_like_bf16_arithmetic(tmp_path):
    """The emulated file computes each node in float32 and rounds it to bf16: it agrees with PyTorch's
    bf16 CPU arithmetic (float32 accumulation, bf16 results) to a bf16 rounding step, and differs
    from float32 by more than that."""
    from tngraph.lowering.precision import emulate

    g = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()
    x = torch.randn(6, 40, generator=g)
    result = tngraph.export_onnx(model, (x,), tmp_path / "m.onnx", dtype="bf16")
    points = emulate(result.path, tmp_path / "wide.onnx", "bf16")
    wide = onnx.load(str(tmp_path / "wide.onnx"))
    casts = [n for n in wide.graph.node if n.op_type == "Cast"]
    assert points >= 3 and len(casts) >= 2 * points
    assert {t.data_type for t in wide.graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    (got,) = _ort(tmp_path / "wide.onnx", {"input": x.bfloat16().float()})
    with torch.no_grad():
        bf16 = model.bfloat16()(x.bfloat16()).float().numpy()
        fp32 = model.float()(x).numpy()
    step = 2.0 ** -7 * np.abs(bf16)  # two bf16 rounding steps
    assert (np.abs(got - bf16) <= step + 1e-6).mean() > 0.95
    assert np.abs(got - fp32).max() > np.abs(got - bf16).max()


def test_a_reduced_precision_export_is_held_to_its_tolerance(compressed_mlp, tmp_path, monkeypatch):
    from tngraph.lowering import precision

    with pytest.raises(ExportError, match=r"float32 PyTorch model's \(fp16 file\) by .* \(tolerance 1e-07\)"):
        tngraph.export_onnx(compressed_mlp["lowrank"].module, (torch.randn(4, 24),), tmp_path / "m.onnx", dtype="fp16", tolerance=1e-7)
    monkeypatch.setitem(precision.RELATIVE_TOLERANCES, "bf16", 1e-6)  # the default bound is relative to the output's scale
    with pytest.raises(ExportError, match=r"by [0-9.]+% of its largest value \(tolerance 0%\)"):
        tngraph.export_onnx(compressed_mlp["lowrank"].module, (torch.randn(4, 24),), tmp_path / "m.onnx", dtype="bf16")
    with pytest.raises(ConfigError, match="unknown export dtype 'int8'"):
        tngraph.export_onnx(compressed_mlp["lowrank"].module, (torch.randn(4, 24),), tmp_path / "m.onnx", dtype="int8")
    assert os.listdir(tmp_path) == []


def test_engine_precision_follows_the_file(tmp_path):
    """Which engine a file gives, decided without TensorRT: reduced-precision files build strongly
    typed in their own type; an fp32 file takes --fp16/--bf16 as builder flags where TensorRT has
    them (10) and is refused with the export command where it does not (11)."""
    from tngraph.lowering.tensorrt import engine_plan

    assert engine_plan("fp16", None, precision_flags=True, strongly_typed_flag=True) == ("fp16", True, None)
    assert engine_plan("bf16", "bf16", precision_flags=False, strongly_typed_flag=False) == ("bf16", False, None)
    assert engine_plan("fp32", None, precision_flags=False, strongly_typed_flag=False) == ("fp32", False, None)
    assert engine_plan("fp32", "fp16", precision_flags=True, strongly_typed_flag=True) == ("fp16", False, "FP16")
    with pytest.raises(ExportError, match=r"--dtype bf16"):
        engine_plan("fp32", "bf16", precision_flags=False, strongly_typed_flag=False)
    with pytest.raises(ConfigError, match="holds fp16 values; a bf16 engine needs a bf16 file"):
        engine_plan("fp16", "bf16", precision_flags=True, strongly_typed_flag=True)


def test_bad_arguments_are_clear_errors(compressed_mlp, tmp_path):
    module = compressed_mlp["lowrank"].module
    x = torch.randn(4, 24)
    with pytest.raises(ConfigError, match=r"\.onnx"):
        tngraph.export_onnx(module, (x,), tmp_path / "m.txt")
    (tmp_path / "taken.onnx").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="already exists"):
        tngraph.export_onnx(module, (x,), tmp_path / "taken.onnx")
    with pytest.raises(DataError, match="batch size 1"):
        tngraph.export_onnx(module, (torch.randn(1, 24),), tmp_path / "m.onnx")
    with pytest.raises(DataError, match="NaN"):
        tngraph.export_onnx(module, (torch.full((4, 24), float("nan")),), tmp_path / "m.onnx")
    with pytest.raises(DataError, match="not a tensor"):
        tngraph.export_onnx(module, ([1, 2],), tmp_path / "m.onnx")
    with pytest.raises(DataError, match="needs example inputs"):
        tngraph.export_onnx(module, None, tmp_path / "m.onnx")
    with pytest.raises(DataError, match="does not run on the example inputs"):
        tngraph.export_onnx(module, (torch.randn(4, 23),), tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="tolerance"):
        tngraph.export_onnx(module, (x,), tmp_path / "m.onnx", tolerance=float("nan"))
    assert sorted(os.listdir(tmp_path)) == ["taken.onnx"]
    with pytest.raises(ArtifactError, match="not an ONNX file that tngraph wrote"):  # --force replaces only tngraph's files
        tngraph.export_onnx(module, (x,), tmp_path / "taken.onnx", force=True)
    assert (tmp_path / "taken.onnx").read_bytes() == b"x"
    tngraph.export_onnx(module, (x,), tmp_path / "ours.onnx")
    tngraph.export_onnx(module, (x,), tmp_path / "ours.onnx", force=True)  # its own export: replaced
    onnx.checker.check_model(str(tmp_path / "ours.onnx"), full_check=True)
    assert sorted(os.listdir(tmp_path)) == ["ours.onnx", "taken.onnx"]


def test_large_models_keep_their_weights_in_external_data(compressed_mlp, tmp_path, monkeypatch):
    from tngraph.lowering import onnx as lowering

    monkeypatch.setattr(lowering, "EXTERNAL_DATA_BYTES", 100)  # as if the weights passed the 2 GB limit
    path = tmp_path / "big.onnx"
    result = tngraph.export_onnx(compressed_mlp["lowrank"].module, (torch.randn(4, 24),), path)
    assert result.external_data == tmp_path / "big.onnx.data" and result.external_data.stat().st_size > 0
    assert result.bytes == path.stat().st_size + result.external_data.stat().st_size
    onnx.checker.check_model(str(path), full_check=True)
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]


def test_tensorrt_check_names_what_the_parser_refuses(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [
        helper.make_node("Einsum", ["x", "w"], ["e"], equation="...i,ij->...j", name="ellipsis"),
        helper.make_node("lowrank", ["e", "w"], ["c"], domain="tngraph", name="custom"),
        helper.make_node("StringNormalizer", ["c"], ["y"], name="strings"),
    ]
    graph = helper.make_graph(nodes, "g", [x, w], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("tngraph", 1)])
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    problems = {p.node: p for p in check_tensorrt(path)}
    assert set(problems) == {"ellipsis", "custom", "strings"}
    assert "ellipsis" in problems["ellipsis"].reason and "plugin" in problems["custom"].reason
    assert "no importer" in problems["strings"].reason
    with pytest.raises(ExportError, match="no ONNX file"):
        check_tensorrt(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        check_tensorrt(tmp_path / "junk.onnx")


@pytest.mark.slow
def test_compressed_minilm_exports_checks_and_is_smaller(minilm, minilm_compressed, tmp_path):
    """Acceptance: the compressed MiniLM passes the checker, matches PyTorch in onnxruntime within
    1e-4 at other batch sizes and lengths, holds no custom ops, and is at most 80 % of the dense file."""
    from tngraph.lowering.onnx import text_inputs

    model, tokenizer = minilm
    example = text_inputs(tokenizer, 2, 16)
    dense = tngraph.export_onnx(model, example, tmp_path / "dense.onnx")
    ours = tngraph.export_onnx(minilm_compressed.module, example, tmp_path / "ours.onnx")
    assert ours.bytes <= 0.8 * dense.bytes
    assert ours.max_abs_diff <= 1e-4 and len(ours.checks) == 3
    assert ours.dynamic_axes["input_ids"] == {0: "batch", 1: "sequence"}
    assert not any("::" in op for op in ours.op_counts) and not [p for p in check_tensorrt(ours.path) if p.severity == "error"]
    enc = dict(tokenizer(["a short one", "a somewhat longer sentence than the first", "three"] * 2, padding=True, return_tensors="pt"))
    assert enc["input_ids"].shape[0] == 6 and enc["input_ids"].shape[1] != 16
    got = _ort(ours.path, enc)
    with torch.no_grad():
        ref = minilm_compressed.module(**enc)
    assert np.abs(got[0] - ref.last_hidden_state.numpy()).max() <= 1e-4
    assert ours.outputs[0] == "last_hidden_state"
    from tngraph.lowering.precision import file_precision

    # fp16 (bf16 and its emulation: the tiny BERT of test_cli, same operators): half the bytes, within the default bound
    low = tngraph.export_onnx(minilm_compressed.module, example, tmp_path / "ours-fp16.onnx", dtype="fp16")
    assert low.bytes <= 0.52 * ours.bytes and low.relative and low.max_rel_diff <= low.tolerance and len(low.checks) == 3
    assert file_precision(onnx.load(str(low.path))) == "fp16" and not low.emulated
    assert not [p for p in check_tensorrt(low.path) if p.severity == "error"]
    got = _ort(low.path, enc)
    scale = np.abs(ref.last_hidden_state.numpy()).max()
    assert np.abs(got[0].astype(np.float32) - ref.last_hidden_state.numpy()).max() <= 0.02 * scale
