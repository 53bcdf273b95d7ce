"""TensorRT: FILE.onnx -> FILE.plan (a serialized engine), plus a check of the ONNX graph against
TensorRT's ONNX parser that runs without a GPU or TensorRT.

check_tensorrt(path) reads the graph (not the weights), infers its value types and lists, per
node, what TensorRT's ONNX parser would refuse: operators it has no importer for, custom domains
(tngraph's ops must be translated first: export_onnx does that), element types the operator does
not take, Einsum with an ellipsis or broadcasting, opsets outside the range it reads. The table is
tngraph's own summary of onnx-tensorrt's operator matrix for TensorRT 10/11.

build_engine(...) parses the file with trt.OnnxParser (its errors reported), adds one optimization
profile covering the dynamic axes (batch, sequence), limits the builder's workspace and writes the
serialized engine atomically. Precision (engine_plan): a file exported in fp16/bf16 (`tngraph export
onnx --dtype`) is built as a strongly typed network, its types being what the engine runs, on every
TensorRT that has them; an fp32 file with --fp16/--bf16 takes builder flags on TensorRT 10 (which may
then pick reduced-precision kernels), and is refused on TensorRT 11, which builds strongly typed
networks only, with the export command that makes a file of that precision.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import ConfigError, ExportError
from ..ownership import check_output_file

log = logging.getLogger(__name__)

INSTALL_HINT = ("install TensorRT's Python package on a machine with an NVIDIA GPU and CUDA 12: "
                "pip install tensorrt-cu12 (or pip install 'tngraph[gpu]')")
OPSETS = (9, 20)  # the default-domain opsets TensorRT 10.0's parser imports (later releases read newer ones too)
PRECISIONS = ("fp32", "fp16", "bf16")

_F = frozenset({"FLOAT", "FLOAT16", "BFLOAT16"})
_I = frozenset({"INT32", "INT64"})
_ANY = _F | _I | frozenset({"BOOL", "INT8", "UINT8"})
_B = frozenset({"BOOL"})
# operator -> element types of its first input (or output, for nodes without inputs)
SUPPORTED: dict[str, frozenset] = {
    **{op: _F for op in (
        "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BatchNormalization", "Ceil", "Celu", "Conv",
        "ConvTranspose", "Cos", "Cosh", "CumSum", "Dropout", "Einsum", "Elu", "Erf", "Exp", "Floor", "Gelu", "Gemm",
        "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "GroupNormalization", "GRU", "HardSigmoid", "HardSwish",
        "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Log", "LogSoftmax", "LpNormalization",
        "LpPool", "LRN", "LSTM", "MatMul", "MaxPool", "Mish", "Pow", "PRelu", "RandomUniform", "RandomUniformLike",
        "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMean", "ReduceSumSquare", "Relu",
        "Resize", "RNN", "Round", "Selu", "Sigmoid", "Sin", "Sinh", "Softmax", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh",
        "ThresholdedRelu", "QuantizeLinear")},
    **{op: _F | _I for op in (
        "Abs", "Add", "ArgMax", "ArgMin", "Clip", "Div", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Max",
        "Mean", "Min", "Mod", "Mul", "Neg", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSum", "Sign", "Sub", "Sum", "TopK",
        "Range", "Trilu", "NonZero", "OneHot")},
    **{op: _ANY for op in (
        "Cast", "CastLike", "Concat", "Constant", "ConstantOfShape", "DepthToSpace", "Expand", "EyeLike", "Flatten", "Gather",
        "GatherElements", "GatherND", "Identity", "If", "Loop", "Pad", "Reshape", "ScatterElements", "ScatterND", "Shape",
        "Size", "Slice", "SpaceToDepth", "Split", "Squeeze", "Tile", "Transpose", "Unsqueeze", "Where", "DequantizeLinear")},
    **{op: _B for op in ("And", "Not", "Or", "Xor")},
}


@dataclass(frozen=True)
class TrtProblem:
    node: str
    op_type: str
    reason: str
    severity: str = "error"  # "warning": TensorRT takes it with a cast or a limit

    def __str__(self) -> str:
        return f"{self.severity}: {self.op_type} {self.node!r}: {self.reason}"


def _type_name(elem: int) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(elem)


def check_tensorrt(path: str | os.PathLike) -> list[TrtProblem]:
    """What TensorRT's ONNX parser would refuse in this file (empty: nothing known). No GPU needed."""
    import onnx

    file = pathlib.Path(path)
    if not file.is_file():
        raise ExportError(f"no ONNX file at {str(file)!r}", "pass the file `tngraph export onnx` wrote")
    try:
        model = onnx.load(str(file), load_external_data=False)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as exc:
        raise ExportError(f"{str(file)!r} is not a readable ONNX model: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}",
                          "export it again with `tngraph export onnx`") from None
    graph = inferred.graph
    types: dict[str, int] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    problems: list[TrtProblem] = []
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < OPSETS[0]:
            problems.append(TrtProblem("<model>", "opset", f"opset {opset.version} is older than {OPSETS[0]}, the oldest TensorRT reads"))
        elif opset.domain in ("", "ai.onnx") and opset.version > OPSETS[1]:
            problems.append(TrtProblem("<model>", "opset", f"opset {opset.version} is newer than {OPSETS[1]}, the newest TensorRT 10.0 "
                                       "reads (later releases read more)", "warning"))
    for value in graph.input:
        elem = types.get(value.name)
        if elem is not None and _type_name(elem) == "DOUBLE":
            problems.append(TrtProblem(value.name, "input", "DOUBLE input: TensorRT casts it to FLOAT", "warning"))
    for index, node in enumerate(graph.node):
        name = node.name or f"#{index}"
        if node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
            problems.append(TrtProblem(name, f"{node.domain}::{node.op_type}", "onnxruntime's low-bit GEMM, which TensorRT does not read "
                                       "(export with `tngraph export onnx --quant-ops standard`)"))
            continue
        if node.domain not in ("", "ai.onnx"):
            problems.append(TrtProblem(name, f"{node.domain}::{node.op_type}", "a custom-domain operator needs a TensorRT plugin "
                                       "(export with tngraph.export_onnx, which translates tngraph's ops into standard ones)"))
            continue
        allowed = SUPPORTED.get(node.op_type)
        if allowed is None:
            problems.append(TrtProblem(name, node.op_type, "TensorRT's ONNX parser has no importer for this operator"))
            continue
        first = next((i for i in node.input if i), None) or (node.output[0] if node.output else None)
        elem = types.get(first) if first else None
        if elem:
            kind = _type_name(elem)
            if kind == "DOUBLE":
                problems.append(TrtProblem(name, node.op_type, "DOUBLE values: TensorRT casts them to FLOAT", "warning"))
            elif kind not in allowed:
                problems.append(TrtProblem(name, node.op_type, f"element type {kind} (TensorRT takes {', '.join(sorted(allowed))} here)"))
        if node.op_type == "Einsum":
            equation = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "equation"), b"")
            equation = equation.decode() if isinstance(equation, bytes) else str(equation)
            if "..." in equation:
                problems.append(TrtProblem(name, node.op_type, f"equation {equation!r} has an ellipsis, which TensorRT's Einsum does not take"))
            lhs = equation.replace(" ", "").replace("...", "").split("->")[0].split(",")
            if any(len(set(term)) != len(term) for term in lhs):
                problems.append(TrtProblem(name, node.op_type, f"equation {equation!r} takes a diagonal, which TensorRT's Einsum does not"))
    return problems


# --- engines ----------------------------------------------------------------------------------------


@dataclass
class TrtEngine:
    path: pathlib.Path
    bytes: int
    precision: str
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    seconds: float
    tensorrt_version: str


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError("TensorRT's Python package is not installed", INSTALL_HINT) from None
    return trt


def profile_shapes(dims: Sequence[int], *, batch: tuple[int, int, int], sequence: tuple[int, int, int]) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) of one input: -1 in the first dim is the batch, elsewhere the sequence."""
    shapes = []
    for which in range(3):
        shape = []
        for axis, d in enumerate(dims):
            shape.append(d if d >= 0 else (batch if axis == 0 else sequence)[which])
        shapes.append(tuple(shape))
    return tuple(shapes)


def _check_range(name: str, value: tuple[int, int, int]) -> None:
    if len(value) != 3 or not all(isinstance(v, int) and v >= 1 for v in value) or not value[0] <= value[1] <= value[2]:
        raise ConfigError(f"{name} must be three sizes min <= opt <= max, each >= 1, got {value}", f"e.g. {name}=(1, 8, 32)")


def engine_plan(file_precision: str, requested: str | None, *, precision_flags: bool, strongly_typed_flag: bool) -> tuple[str, bool, str | None]:
    """How to build an engine of `requested` precision (None: the file's) from a file of `file_precision`
    (precision.file_precision: fp32, fp16, bf16 or mixed), on a TensorRT with or without the FP16/BF16
    builder flags and the STRONGLY_TYPED network flag: (precision, strongly typed, builder flag or None)."""
    if requested is not None and requested not in PRECISIONS:
        raise ConfigError(f"unknown precision {requested!r}", f"choose one of {', '.join(PRECISIONS)}")
    if file_precision != "fp32":  # the file says what runs where
        if requested not in (None, file_precision):
            raise ConfigError(f"the ONNX file holds {file_precision} values; a {requested} engine needs a {requested} file",
                              f"export it with `tngraph export onnx --dtype {requested}`, or build without --{requested}")
        return file_precision, strongly_typed_flag, None
    if requested in (None, "fp32"):
        return "fp32", False, None
    if not precision_flags:
        raise ExportError(f"this TensorRT builds strongly typed networks only: --{requested} cannot lower an fp32 file",
                          f"export the model in that precision (`tngraph export onnx --dtype {requested}`) and build that file")
    return requested, False, requested.upper()


def _record_path(engine: pathlib.Path) -> pathlib.Path:
    return engine.with_name(engine.name + ".tngraph.json")


def engine_by_tngraph(path: str | os.PathLike) -> bool:
    """Whether the engine file at `path` is one tngraph built: its record beside it holds its sha256."""
    path = pathlib.Path(path)
    try:
        record = json.loads(_record_path(path).read_text(encoding="utf-8"))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(record, dict) and record.get("kind") == "tensorrt-engine" and record.get("sha256") == digest


def build_engine(onnx_path: str | os.PathLike, out: str | os.PathLike, *, precision: str | None = None, workspace_gb: float = 4.0,
                 batch: tuple[int, int, int] = (1, 8, 32), sequence: tuple[int, int, int] = (1, 128, 512), force: bool = False) -> TrtEngine:
    """Build a TensorRT engine from an ONNX file and write it to `out` (a .plan file).

    precision: None (default) builds the file's own precision; "fp16"/"bf16" on an fp32 file lets
    TensorRT 10 run layers in it (see engine_plan)."""
    started = time.perf_counter()
    if precision is not None and precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", f"choose one of {', '.join(PRECISIONS)}")
    if not workspace_gb > 0:
        raise ConfigError(f"workspace must be > 0 GB, got {workspace_gb}", "e.g. --workspace-gb 4")
    _check_range("batch", tuple(batch))
    _check_range("sequence", tuple(sequence))
    src, dst = pathlib.Path(onnx_path), pathlib.Path(out)
    check_output_file(dst, force, ours=engine_by_tngraph, what="a TensorRT engine", keep=[src])
    errors = [p for p in check_tensorrt(src) if p.severity == "error"]
    if errors:
        listed = "; ".join(str(p) for p in errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
        raise ExportError(f"TensorRT cannot take {str(src)!r}: {listed}", "export the model with `tngraph export onnx`, which emits supported operators")
    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise ExportError("TensorRT builds engines on an NVIDIA GPU and none is visible",
                          "run on a machine with a GPU; `tngraph export tensorrt --check-only` checks the graph without one")
    import onnx

    from .precision import file_precision

    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    precision, strongly_typed, builder_flag = engine_plan(
        file_precision(onnx.load(str(src), load_external_data=False)), precision,
        precision_flags=getattr(trt.BuilderFlag, "FP16", None) is not None, strongly_typed_flag=strong is not None)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strongly_typed:
        flags |= 1 << int(strong)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src.resolve())):
        messages = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT's ONNX parser refused {str(src)!r}: " + " | ".join(messages[:5]),
                          "check the operators with `tngraph export tensorrt --check-only`")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if builder_flag is not None:
        config.set_flag(getattr(trt.BuilderFlag, builder_flag))
    profile = builder.create_optimization_profile()
    shapes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)
        if any(d < 0 for d in dims):
            shapes[tensor.name] = profile_shapes(dims, batch=tuple(batch), sequence=tuple(sequence))
            profile.set_shape(tensor.name, *shapes[tensor.name])
    if shapes:
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT could not build an engine (its log above says why)", "try a larger --workspace-gb or --precision fp32")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.tmp-", dir=dst.parent)
    try:
        blob = bytes(serialized)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        check_output_file(dst, force, ours=engine_by_tngraph, what="a TensorRT engine", keep=[src])
        os.replace(tmp, dst)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    engine = TrtEngine(dst, dst.stat().st_size, precision, shapes, time.perf_counter() - started, trt.__version__)
    record = {"kind": "tensorrt-engine", "sha256": hashlib.sha256(blob).hexdigest(), "onnx": str(src), "precision": precision,
              "tensorrt": trt.__version__, "profile": {k: [list(s) for s in v] for k, v in shapes.items()}}
    _record_path(dst).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("TensorRT %s engine %s (%.1f MB, %s) in %.1f s", trt.__version__, dst, engine.bytes / 1e6, precision, engine.seconds)
    return engine


def run_engine(plan: str | os.PathLike, inputs: dict[str, Any]) -> dict[str, Any]:
    """Run a serialized engine once on CUDA tensors (name -> torch.Tensor); returns its outputs by name."""
    import torch

    trt = import_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(pathlib.Path(plan).read_bytes())
    if engine is None:
        raise ExportError(f"{str(plan)!r} is not an engine this TensorRT can load", "rebuild it with `tngraph export tensorrt`")
    context = engine.create_execution_context()
    to_torch = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        to_torch[trt.bfloat16] = torch.bfloat16
    keep, outputs = [], {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            if name not in inputs:
                raise ExportError(f"the engine needs input {name!r}", f"pass inputs for {name!r}")
            value = inputs[name].to("cuda", to_torch[engine.get_tensor_dtype(name)]).contiguous()
            context.set_input_shape(name, tuple(value.shape))
            context.set_tensor_address(name, value.data_ptr())
            keep.append(value)
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            value = torch.empty(tuple(context.get_tensor_shape(name)), device="cuda", dtype=to_torch[engine.get_tensor_dtype(name)])
            context.set_tensor_address(name, value.data_ptr())
            outputs[name] = value
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise ExportError("TensorRT failed to run the engine", "rebuild it for these input shapes")
    stream.synchronize()
    return outputs
