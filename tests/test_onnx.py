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
    tngraph.export_onnx(module, (x,), tmp_path / "taken.onnx", force=True)
    onnx.checker.check_model(str(tmp_path / "taken.onnx"), full_check=True)


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
