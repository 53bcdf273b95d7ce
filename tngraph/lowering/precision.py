"""Reduced-precision ONNX files: the float types export_onnx writes, and the emulation that checks a
file onnxruntime has no kernels for.

export_onnx(dtype="fp16"|"bf16") exports a copy of the model cast to that type (weights, float
inputs and every float value in the graph), which is what TensorRT's strongly typed networks need
for reduced precision: the file's types are what the engine runs.

onnxruntime's CPU provider runs float16 but has almost no bfloat16 kernels. A file it cannot run is
checked through `emulate`: the same graph with every low-precision value held in float32 and rounded
to the low type after each node (Cast to it and back), so each operator computes in float32 and
stores its result in the low precision, as a GPU's bf16 kernels do with their float32 accumulators.
The emulated run checks the graph's structure exactly and its rounding conservatively (a fused
engine rounds less often).
"""
from __future__ import annotations

import logging
import pathlib
from typing import Any

import torch

from ..errors import ConfigError, ExportError

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
# The export check's default bounds. fp32: |onnxruntime - PyTorch| <= 1e-4 (the exporter's rounding
# only). fp16/bf16 measure the precision's own error against the float32 model, which grows with the
# outputs' scale, so their default bounds each output's error relative to its largest |value|.
# Measured on the dense MiniLM, 16 sentences x 128 tokens (last_hidden_state, largest |value| 6.17):
# 0.0128 (0.2 %) in fp16, 0.517 (8.4 %) in emulated bf16. A wrong graph errs by the outputs' own size.
DEFAULT_TOLERANCE = 1e-4
RELATIVE_TOLERANCES = {"fp16": 0.02, "bf16": 0.25}


def precision_name(dtype: Any) -> str:
    """'fp32', 'fp16' or 'bf16' for a name (fp16, float16, half, ...) or a torch dtype; ConfigError otherwise."""
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if value == dtype:
                return name
    elif isinstance(dtype, str):
        key = dtype.strip().lower()
        key = _ALIASES.get(key, key)
        if key in DTYPES:
            return key
    raise ConfigError(f"unknown export dtype {dtype!r}", "choose fp32, fp16 or bf16 (or torch.float32/float16/bfloat16)")


def cast_inputs(values: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Float inputs in `dtype`; integer and boolean inputs (token ids, masks) unchanged."""
    return {n: v.to(dtype) if v.is_floating_point() else v for n, v in values.items()}


def low_precision_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model` with its float parameters and buffers in `dtype` (the caller's model is untouched)."""
    import copy

    try:
        clone = copy.deepcopy(model)
    except Exception as exc:
        raise ExportError(f"the model cannot be copied to cast it to {dtype}: {type(exc).__name__}: {exc}",
                          "cast it yourself (model.to(dtype)) and export that with dtype=fp32 and a larger tolerance") from exc
    return clone.to(dtype)


def file_precision(model: Any) -> str:
    """The float type an ONNX model (proto) holds: 'fp32', 'fp16', 'bf16', or 'mixed' (several), from its
    initializers and graph inputs/outputs; 'fp32' when it holds no floats."""
    from onnx import TensorProto

    names = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}
    seen = {names[t.data_type] for t in model.graph.initializer if t.data_type in names}
    for value in [*model.graph.input, *model.graph.output]:
        elem = value.type.tensor_type.elem_type
        if elem in names:
            seen.add(names[elem])
    if len(seen) > 1:
        return "mixed"
    return seen.pop() if seen else "fp32"


def _floated(tensor: Any) -> Any:
    import numpy as np
    from onnx import numpy_helper

    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)


def emulate(src: str | pathlib.Path, dst: str | pathlib.Path, low: str, *, external_data: bool = False) -> int:
    """Write to `dst` the model at `src` with every `low` ('fp16'/'bf16') value computed in float32 and
    rounded to `low` after each node; returns the number of rounding points inserted.

    Graph inputs and outputs become float32 (feed values already rounded to `low`)."""
    import onnx
    from onnx import TensorProto, helper, shape_inference

    elem = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[low]
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    inferred = dst.with_name(dst.stem + ".inferred.onnx")
    shape_inference.infer_shapes_path(str(src), str(inferred))  # by path: works above protobuf's 2 GB too
    model = onnx.load(str(inferred), load_external_data=False)
    onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
    inferred.unlink()
    graph = model.graph
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ExportError(f"the {low} file holds control flow ({node.op_type}), which the {low} emulation does not rewrite",
                              "export with dtype=fp32, or run the check on a provider with kernels for this type (CUDA)")
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    for i, t in enumerate(graph.initializer):
        if t.data_type == elem:
            graph.initializer[i].CopyFrom(_floated(t))
    nodes, rounded = [], 0
    for node in graph.node:
        for attr in node.attribute:
            if attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT and attr.i == elem:
                attr.i = TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == elem:
                attr.t.CopyFrom(_floated(attr.t))
        renamed = []
        for k, name in enumerate(node.output):
            if name and types.get(name) == elem:
                wide = f"{name}__tngraph_wide"
                node.output[k] = wide
                renamed.append((wide, name))
        nodes.append(node)
        for wide, name in renamed:
            nodes.append(helper.make_node("Cast", [wide], [f"{name}__tngraph_low"], to=elem))
            nodes.append(helper.make_node("Cast", [f"{name}__tngraph_low"], [name], to=TensorProto.FLOAT))
            rounded += 1
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    for value in [*graph.input, *graph.output]:
        if value.type.tensor_type.elem_type == elem:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    onnx.save(model, str(dst), save_as_external_data=external_data, location=dst.name + ".data" if external_data else None)
    log.debug("emulated %s: %d rounding points in %s", low, rounded, dst)
    return rounded
