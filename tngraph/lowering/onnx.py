"""ONNX export: module -> FILE.onnx (torch.onnx dynamo exporter), checked by onnx.checker and
run in onnxruntime against PyTorch.

- tngraph's layers become standard ONNX ops: the exporter traces each layer's reference (a fused
  graph's op nodes are expanded back into it first), or takes the layer's own translation where it
  has one (tngraph::network: Reshape -> Einsum without an ellipsis, for TensorRT -> Reshape (+ Add)).
- Batch and sequence axes are dynamic by default (named "batch" and "sequence").
- Models whose weights pass ONNX's 2 GB protobuf limit keep them in FILE.onnx.data beside it.
- Nothing is left at the destination unless every check passed: the file is written in a
  temporary folder beside it, checked (`onnx.checker` with full_check, onnxruntime against PyTorch
  on the example and on inputs of other batch sizes and lengths) and only then moved into place.
"""
from __future__ import annotations

import collections
import copy
import contextlib
import keyword
import logging
import math
import os
import pathlib
import shutil
import time
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .. import __version__
from ..errors import ArtifactError, ConfigError, DataError, ExportError
from ..capture import FIXED_SIZE_INPUTS
from ..layers import LAYERS, OPS, expand_layers
from ..ownership import check_output_file, clean_stale, staging_dir

log = logging.getLogger(__name__)

PRODUCER_KEY = "tngraph_version"  # metadata entry of every ONNX file tngraph writes


def written_by_tngraph(path: str | os.PathLike) -> bool:
    """Whether the ONNX file at `path` is one tngraph wrote (its metadata says so)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX at all
        return False
    return any(p.key == PRODUCER_KEY for p in proto.metadata_props)

# protobuf cannot serialise a message over 2 GiB; stay clear of it (graph + initializers)
EXTERNAL_DATA_BYTES = 1_800_000_000
_TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclass
class ExportCheck:
    """One onnxruntime run against PyTorch."""

    shapes: dict[str, list[int]]
    max_abs_diff: float
    max_rel_diff: float = 0.0  # the largest, over outputs, of |onnxruntime - PyTorch| / the output's largest |value|

    def to_json(self) -> dict[str, Any]:
        return {"shapes": self.shapes, "max_abs_diff": self.max_abs_diff, "max_rel_diff": self.max_rel_diff}


@dataclass
class OnnxExport:
    """What export_onnx wrote and measured."""

    path: pathlib.Path
    bytes: int  # the .onnx file plus its external data file, if any
    external_data: pathlib.Path | None
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    opset: int
    providers: list[str]
    checks: list[ExportCheck]
    tolerance: float
    op_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    dtype: str = "fp32"  # the float type of the file's weights and values: fp32, fp16 or bf16
    emulated: bool = False  # checked through precision.emulate (onnxruntime had no kernels for dtype)
    relative: bool = False  # tolerance bounds max_rel_diff (the fp16/bf16 default), not max_abs_diff

    @property
    def max_rel_diff(self) -> float:
        return max(c.max_rel_diff for c in self.checks)

    @property
    def max_abs_diff(self) -> float:
        return max(c.max_abs_diff for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "bytes": self.bytes, "external_data": str(self.external_data) if self.external_data else None,
            "inputs": self.inputs, "outputs": self.outputs, "dynamic_axes": self.dynamic_axes, "opset": self.opset,
            "providers": self.providers, "checks": [c.to_json() for c in self.checks], "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance, "op_counts": self.op_counts, "seconds": self.seconds, "dtype": self.dtype,
            "emulated": self.emulated, "relative": self.relative, "max_rel_diff": self.max_rel_diff,
        }


def onnx_translations() -> dict[Any, Any]:
    """torch.onnx's custom_translation_table: the layers' own ONNX translations (the others export their reference)."""
    return {layer.op: layer.onnx for layer in LAYERS.values() if layer.onnx is not None}


# --- inputs, outputs, axes --------------------------------------------------------------------------


class _Flat(torch.nn.Module):
    """The model with its outputs as a flat tuple of tensors (a ModelOutput's fields, in order) and
    one named parameter per input: torch.export matches dynamic shapes to named parameters (a
    forward(*args, **kwargs) trips its matching)."""

    def __init__(self, model: torch.nn.Module, keys: list[str] | None, names: list[str], positional: int):
        super().__init__()
        self.model = model
        self.keys = keys
        bad = [n for n in names if not n.isidentifier() or keyword.iskeyword(n) or n in ("self", "__call")]
        if bad:
            raise DataError(f"input name {bad[0]!r} is not a Python identifier", "pass example inputs as a tuple or a dict with identifier keys")
        call_args = "".join(f"{n}, " for n in names[:positional])
        call_kwargs = ", ".join(f"{n!r}: {n}" for n in names[positional:])
        source = f"def forward(self, {', '.join(names)}):\n    return self.call(({call_args}), {{{call_kwargs}}})\n"
        scope: dict[str, Any] = {}
        exec(compile(source, "<tngraph.export_onnx>", "exec"), scope)  # noqa: S102 (names checked above)
        self.forward = types.MethodType(scope["forward"], self)  # type: ignore[method-assign]

    def call(self, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        return _flatten_outputs(self.model(*args, **kwargs), self.keys)[1]


def _flatten_outputs(out: Any, keys: list[str] | None = None) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    if isinstance(out, torch.Tensor):
        return ["output"], (out,)
    if isinstance(out, Mapping):  # transformers' ModelOutput is an OrderedDict of the fields that are set
        names = keys if keys is not None else [k for k, v in out.items() if isinstance(v, torch.Tensor)]
        return names, tuple(out[k] for k in names)
    if isinstance(out, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in out):
        return [f"output_{i}" for i in range(len(out))], tuple(out)
    raise ExportError(f"the model returns {type(out).__name__}, which is not tensors",
                      "export a module that returns a tensor, a tuple of tensors or a Hugging Face ModelOutput")


def _as_kwargs(example_inputs: Any, model: torch.nn.Module) -> tuple[tuple, dict[str, torch.Tensor]]:
    """(positional, keyword) example inputs, every one a tensor."""
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise DataError(f"example_inputs must be a tensor, a tuple of tensors or a dict of tensors, got {type(example_inputs).__name__}",
                        "pass e.g. (torch.randn(2, 384),) or dict(tokenizer(texts, return_tensors='pt'))")
    for name, value in [*((f"input {i}", v) for i, v in enumerate(args)), *kwargs.items()]:
        if not isinstance(value, torch.Tensor):
            raise DataError(f"example {name} is a {type(value).__name__}, not a tensor", "pass tensors only")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise DataError(f"example {name} holds NaN or Inf", "pass finite example inputs")
    if not args and not kwargs:
        raise DataError("no example inputs", "pass the inputs of one forward call of the model")
    return args, kwargs


def _input_names(model: torch.nn.Module, args: tuple, kwargs: dict) -> list[str]:
    import inspect

    try:
        params = [p for p in inspect.signature(model.forward).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [params[i].name if i < len(params) else f"input_{i}" for i in range(len(args))]
    return names + list(kwargs)


def _axes(name: str, value: torch.Tensor, dynamic: bool) -> dict[int, str]:
    """Dynamic axes of one input: the first is the batch; the second the sequence for token inputs
    (integer, 2-D) and for inputs of three or more dims (batch, sequence, features); images and audio
    features keep their sizes, raw audio its length dynamic."""
    if not dynamic or value.dim() == 0:
        return {}
    axes = {0: "batch"}
    if name in FIXED_SIZE_INPUTS or (value.is_floating_point() and value.dim() >= 4):
        # channels x height x width (any float input of 4+ dims), mel bins x frames: sizes the model is built for
        return axes
    if name == "input_values":  # raw audio: batch x samples
        return {0: "batch", 1: "samples"} if value.dim() == 2 else axes
    if value.dim() >= 2 and (value.dim() >= 3 or not value.is_floating_point() or name in _TOKEN_INPUTS):
        axes[1] = "decoder_sequence" if name.startswith("decoder_") else "sequence"  # an encoder-decoder's two lengths
    return axes


def _max_sequence(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 1 else None


def _dynamic_shapes(names: list[str], axes: dict[str, dict[int, str]], max_seq: int | None) -> dict[str, Any]:
    """torch.export's dynamic_shapes for _Flat's named inputs, one Dim per axis label."""
    dims: dict[str, Any] = {}

    def dim(label: str) -> Any:
        if label not in dims:
            dims[label] = torch.export.Dim(label, min=1, max=max_seq) if label.endswith("sequence") and max_seq else torch.export.Dim(label, min=1)
        return dims[label]

    return {n: {axis: dim(label) for axis, label in axes[n].items()} or None for n in names}


def _grown(values: Mapping[str, torch.Tensor], axes: dict[str, dict[int, str]], label: str, size_of: Any) -> dict[str, torch.Tensor] | None:
    """The inputs with every axis called `label` resized: rows repeated cyclically (batch), or a prefix (sequence)."""
    out = {}
    changed = False
    for name, value in values.items():
        axis = next((a for a, lab in axes.get(name, {}).items() if lab == label), None)
        if axis is None:
            out[name] = value
            continue
        new = size_of(value.shape[axis])
        if new is None or new == value.shape[axis]:
            return None
        index = torch.arange(new) % value.shape[axis]
        out[name] = value.index_select(axis, index.to(value.device))
        changed = True
    return out if changed else None


def check_inputs_for(values: Mapping[str, torch.Tensor], axes: dict[str, dict[int, str]]) -> list[dict[str, torch.Tensor]]:
    """Inputs of other shapes than the example's, made from it (every row and token a real one):
    one more batch row, and, with a sequence (or audio samples) axis, a shorter one (a prefix)."""
    checks = []
    more_rows = _grown(values, axes, "batch", lambda n: n + 1)
    if more_rows is not None:
        checks.append(more_rows)
    for label in ("sequence", "decoder_sequence", "samples"):
        shorter = _grown(values, axes, label, lambda n: max(1, n // 2) if n > 1 else None)
        if shorter is not None:
            checks.append(shorter)
    return checks


# --- the export -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx prints progress lines and logs warnings for optional libraries; the CLI owns the terminal."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(_LogStream()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class _LogStream:
    def write(self, text: str) -> int:
        if text.strip():
            log.debug("torch.onnx: %s", text.strip())
        return len(text)

    def flush(self) -> None:
        pass


def _providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _session(path: pathlib.Path, providers: list[str], threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def _feeds(inputs: Mapping[str, torch.Tensor], dtype: str, emulated: bool) -> dict[str, Any]:
    """onnxruntime's feeds: float inputs in the file's type (emulated: rounded to it, held in float32)."""
    from .precision import DTYPES

    out = {}
    for n, v in inputs.items():
        v = v.detach().cpu()
        if v.is_floating_point() and dtype != "fp32":  # fp32 files take the inputs as the example has them
            v = v.to(DTYPES[dtype])
            if emulated:
                v = v.float()
        out[n] = v.numpy()
    return out


def _max_diff(session, flat: torch.nn.Module, names: list[str], inputs: dict[str, torch.Tensor], positional: int,
              dtype: str = "fp32", emulated: bool = False) -> tuple[float, float]:
    """Largest |onnxruntime - PyTorch| over the outputs, and the largest such difference relative to
    its output's largest |value|; `flat` is the float32 reference."""
    import numpy as np

    feeds = _feeds(inputs, dtype, emulated)
    try:
        got = session.run(None, feeds)
    except Exception as exc:
        raise ExportError(f"the exported model does not run in onnxruntime on inputs {_shapes(inputs)}: {_first_line(exc)}",
                          "a dynamic axis was pinned while exporting; export with dynamic=False (--static), "
                          "or report the model's shape logic as a bug") from exc
    values = [inputs[n] for n in names]
    with torch.no_grad():
        ref = flat(*values[:positional], **{n: inputs[n] for n in names[positional:]})
    if len(got) != len(ref):
        raise ExportError(f"onnxruntime returned {len(got)} outputs, PyTorch {len(ref)}", "report this as a tngraph bug")
    diff = rel = 0.0
    for g, r in zip(got, ref):
        r = r.detach().float().cpu()
        if tuple(g.shape) != tuple(r.shape):
            raise ExportError(f"onnxruntime output of shape {tuple(g.shape)} where PyTorch gives {tuple(r.shape)} "
                              f"(inputs {_shapes(inputs)})", "export with dynamic=False, or report the model's shape logic as a bug")
        if not r.numel():
            continue
        d = float((torch.from_numpy(np.asarray(g).astype(np.float32)) - r).abs().max())
        diff = max(diff, d)
        rel = max(rel, d / max(float(r.abs().max()), 1e-30))
    return diff, rel


def _shapes(inputs: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    return {n: list(v.shape) for n, v in inputs.items()}


def _param_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def export_onnx(model: torch.nn.Module | str | os.PathLike, example_inputs: Any = None, path: str | os.PathLike = "model.onnx", *,
                dynamic: bool = True, tolerance: float | None = None, check_inputs: Sequence[Mapping[str, torch.Tensor]] | None = None,
                opset: int | None = None, external_data: bool | None = None, force: bool = False,
                providers: Sequence[str] | None = None, dtype: Any = "fp32", quant_ops: str = "onnxruntime") -> OnnxExport:
    """Export `model` (a module, or an artifact folder written by tngraph.compress/save) to `path`.

    example_inputs: a tensor, a tuple of positional tensors or a dict of keyword tensors (e.g.
    `dict(tokenizer(texts, return_tensors="pt"))`); for an artifact folder of a text model it may be
    None (a few tokenized sentences). The file is checked with onnx.checker (full_check) and run in
    onnxruntime against PyTorch on the example and on inputs of other batch sizes and lengths;
    if any output differs by more than `tolerance` the export fails and nothing is written.

    dtype: "fp32" (default), "fp16" or "bf16" (or a torch dtype): the file holds the model in that
    float type (a cast copy; `model` is untouched) and float inputs of that type. The check compares
    it with the float32 PyTorch model, so it measures the precision's error too. `tolerance` (an
    absolute bound) defaults to 1e-4 in fp32; in fp16/bf16 the default bounds each output's error
    relative to its largest |value| (precision.RELATIVE_TOLERANCES). A file onnxruntime has no
    kernels for (bf16 on the CPU) is checked through precision.emulate (float32 arithmetic, every
    value rounded to dtype), said in the result.

    quant_ops: how quantized layers (--bits) are written. "onnxruntime" (default): weight-only codes
    as onnxruntime's MatMulNBits (com.microsoft; the codes stay packed in memory and run in its
    blocked low-bit GEMM), where a power-of-two block of at least 16 divides the layer's groups;
    "standard": ONNX's own operators only (the weight dequantized, then MatMul), for TensorRT and
    other runtimes.
    """
    from .precision import DTYPES, cast_inputs, low_precision_copy, precision_name

    from ..layers.quant import QUANT_OPS

    started = time.perf_counter()
    if quant_ops not in QUANT_OPS:
        raise ConfigError(f"quant_ops {quant_ops!r} is not one of {', '.join(QUANT_OPS)}",
                          "onnxruntime (MatMulNBits, the default) or standard (ONNX operators only, e.g. for TensorRT)")
    dtype = precision_name(dtype)
    tolerance, relative = _tolerance(dtype, tolerance)
    model, example_inputs = _module_and_example(model, example_inputs)
    out = pathlib.Path(path)
    if out.suffix != ".onnx":
        raise ConfigError(f"the output file {str(out)!r} does not end in .onnx", "name it like model.onnx")
    replacing = check_output_file(out, force, ours=written_by_tngraph, what="an ONNX file").exists()
    if not isinstance(model, torch.fx.GraphModule):  # an exported graph has no train/eval switch
        model = model.eval()
    args, kwargs = _as_kwargs(example_inputs, model)
    names = _input_names(model, args, kwargs)
    values = {**dict(zip(names, args)), **kwargs}
    out_names, keys, axes = _outputs_and_axes(model, args, kwargs, values, dynamic)
    flat = _Flat(model, keys, names, len(args))
    exported, export_values = flat, values
    if dtype != "fp32":
        exported = _Flat(low_precision_copy(model, DTYPES[dtype]), flat.keys, names, len(args))
        export_values = cast_inputs(values, DTYPES[dtype])
    if external_data is None:
        external_data = _param_bytes(exported) > EXTERNAL_DATA_BYTES
    providers = list(providers) if providers else _providers()
    checks_in = [values, *(check_inputs if check_inputs is not None else check_inputs_for(values, axes))]

    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = staging_dir(out)
    try:
        staged = tmp / out.name
        _run_exporter(exported, export_values, names, out_names, axes, _max_sequence(model), opset, staged, external_data, quant_ops)
        proto = _checked_proto(staged)
        session, emulated = _checking_session(staged, providers, dtype, external_data)
        checks = [_compare(session, flat, names, inputs, len(args), dtype, emulated, tolerance, relative) for inputs in checks_in]
        del session
        moved = _install(staged, out, force, replacing)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = out.stat().st_size + (moved.stat().st_size if moved else 0)
    counts = collections.Counter(n.op_type if not n.domain else f"{n.domain}::{n.op_type}" for n in proto.graph.node)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    result = OnnxExport(out, size, moved, names, out_names, {n: a for n, a in axes.items() if a}, opset_used, providers, checks,
                        tolerance, dict(sorted(counts.items())), time.perf_counter() - started, dtype, emulated, relative)
    log.info("exported %s (%.1f MB), max abs diff %.3g over %d onnxruntime runs", out, size / 1e6, result.max_abs_diff, len(checks))
    return result


def _tolerance(dtype: str, tolerance: float | None) -> tuple[float, bool]:
    """(the bound, whether it is relative to each output's largest |value|): absolute 1e-4 in fp32 by default, relative in fp16/bf16."""
    from .precision import DEFAULT_TOLERANCE, RELATIVE_TOLERANCES

    relative = tolerance is None and dtype != "fp32"
    if tolerance is None:
        tolerance = RELATIVE_TOLERANCES[dtype] if relative else DEFAULT_TOLERANCE
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0 and math.isfinite(tolerance)):
        raise ConfigError(f"tolerance must be a finite number >= 0, got {tolerance!r}", "e.g. tolerance=1e-4")
    return tolerance, relative


def _module_and_example(model: Any, example_inputs: Any) -> tuple[torch.nn.Module, Any]:
    """The module to export (an artifact folder or model spec loaded) and its example inputs (a
    loaded text model's default: a few tokenized sentences)."""
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = load_model_spec(model)
        if example_inputs is None:
            example_inputs = text_inputs(tokenizer)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"export_onnx takes a torch.nn.Module or an artifact folder, got {type(model).__name__}")
    if example_inputs is None:
        raise DataError("export_onnx needs example inputs for a module", "pass example_inputs=(tensor, ...) or a dict of tensors")
    if isinstance(model, torch.fx.GraphModule) and any(n.op == "call_function" and n.target in OPS and OPS[n.target].onnx is None
                                                       for n in model.graph.nodes):
        model = copy.deepcopy(model)  # a layer's op becomes its reference, which the exporter translates
        expand_layers(model, translated=False)
    return model, example_inputs


def _outputs_and_axes(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], values: dict[str, torch.Tensor],
                      dynamic: bool) -> tuple[list[str], list[str] | None, dict[str, dict[int, str]]]:
    """Run the model once on the example: the output names, the keys of a structured output (None for
    a single tensor) and each input's dynamic axes, the example checked against what dynamic axes need."""
    for name, value in values.items():
        if dynamic and value.dim() and value.shape[0] < 2:
            raise DataError(f"example input {name!r} has batch size {value.shape[0]}; a dynamic batch axis needs an example of at least 2",
                            "pass an example batch of 2 or more rows, or dynamic=False")
    try:
        with torch.no_grad():
            produced = model(*args, **kwargs)
    except Exception as exc:
        raise DataError(f"the model does not run on the example inputs {_shapes(values)}: {_first_line(exc)}",
                        "pass inputs of one forward call of the model") from exc
    out_names, _ = _flatten_outputs(produced)
    if not out_names:
        raise ExportError("the model returned no tensors", "export a module that returns tensors")
    axes = {n: _axes(n, v, dynamic) for n, v in values.items()}
    if any(axes.values()):
        lengths = [v.shape[1] for n, v in values.items() if 1 in axes[n]]
        if lengths and min(lengths) < 2:
            raise DataError("the example's sequence length is 1; a dynamic sequence axis needs at least 2",
                            "pass a longer example, or dynamic=False")
    return out_names, (out_names if not isinstance(produced, torch.Tensor) else None), axes


def _run_exporter(exported: torch.nn.Module, values: dict[str, torch.Tensor], names: list[str], out_names: list[str],
                  axes: dict[str, dict[int, str]], max_sequence: Any, opset: int | None, staged: pathlib.Path, external_data: bool,
                  quant_ops: str = "onnxruntime") -> None:
    """torch.onnx (dynamo) on the flattened module, the file marked as tngraph's, saved to `staged`;
    the quantized layers' translation writes `quant_ops`."""
    from ..layers.quant import quant_ops as quant_ops_var

    token = quant_ops_var.set(quant_ops)
    with _quiet_exporter(), torch.no_grad():  # an inference graph (the modules' inference paths, no autograd)
        try:
            program = torch.onnx.export(
                exported, tuple(values[n] for n in names), dynamo=True, opset_version=opset, input_names=names,
                output_names=out_names,
                dynamic_shapes=_dynamic_shapes(names, axes, max_sequence) if any(axes.values()) else None,
                custom_translation_table=onnx_translations(), verbose=False, report=False,
            )
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"torch.onnx could not export the model: {_first_line(exc)}",
                              "check that the model runs under torch.export (dynamic=False removes dynamic-shape constraints)") from exc
        finally:
            quant_ops_var.reset(token)
        program.model.metadata_props[PRODUCER_KEY] = __version__  # what lets --force replace this file later
        program.save(str(staged), external_data=external_data)


def _checked_proto(staged: pathlib.Path) -> Any:
    """The staged file through onnx.checker (full_check); its graph, without the weights."""
    import onnx

    try:
        onnx.checker.check_model(str(staged), full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported ONNX model fails onnx.checker: {_first_line(exc)}", "report this as a tngraph bug") from exc
    return onnx.load(str(staged), load_external_data=False)


def _compare(session: Any, flat: _Flat, names: list[str], inputs: Mapping[str, torch.Tensor], positional: int, dtype: str,
             emulated: bool, tolerance: float, relative: bool) -> ExportCheck:
    """onnxruntime against PyTorch on `inputs`; an error beyond the tolerance fails the export."""
    diff, rel = _max_diff(session, flat, names, inputs, positional, dtype, emulated)
    if not (rel if relative else diff) <= tolerance:
        against = "PyTorch's" if dtype == "fp32" else f"the float32 PyTorch model's ({dtype} file)"
        by = f"{rel:.1%} of its largest value (tolerance {tolerance:.0%})" if relative else f"{diff:.3g} (tolerance {tolerance:g})"
        raise ExportError(f"onnxruntime's output differs from {against} by {by} on inputs {_shapes(inputs)}",
                          "pass a tolerance (--tolerance, an absolute bound), or export in float32")
    return ExportCheck(_shapes(inputs), diff, rel)


def _install(staged: pathlib.Path, out: pathlib.Path, force: bool, replacing: bool) -> pathlib.Path | None:
    """The checked file (and its external weights) moved into place; the replaced export's weights
    removed. The external-data path, or None."""
    data = staged.with_name(staged.name + ".data")
    check_output_file(out, force, ours=written_by_tngraph, what="an ONNX file")  # again: it may have appeared meanwhile
    stale = out.with_name(out.name + ".data")
    os.replace(staged, out)
    if data.exists():
        moved = out.with_name(data.name)
        os.replace(data, moved)
        return moved
    if replacing and stale.exists():
        stale.unlink()  # the weights of the export this one replaced
    return None


def _checking_session(staged: pathlib.Path, providers: list[str], dtype: str, external_data: bool) -> tuple[Any, bool]:
    """An onnxruntime session on the staged file, or, for a reduced-precision file onnxruntime has no
    kernels for, on its emulation (precision.emulate); (session, emulated)."""
    try:
        return _session(staged, providers), False
    except Exception as exc:
        if dtype == "fp32":
            raise ExportError(f"onnxruntime cannot load the exported model: {_first_line(exc)}", "report this as a tngraph bug") from exc
        reason = _first_line(exc)
    from .precision import emulate

    wide = staged.with_name("emulated-" + staged.name)
    points = emulate(staged, wide, dtype, external_data=external_data)
    log.info("onnxruntime (%s) cannot run the %s file (%s); checking it in float32 with %d %s rounding points",
             providers[0], dtype, reason, points, dtype)
    try:
        return _session(wide, providers), True
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot run the {dtype} file, nor its float32 emulation: {_first_line(exc)}",
                          "export with dtype=fp32, or check the file on a GPU provider") from exc


def _first_line(exc: BaseException) -> str:
    """The line that says what went wrong (torch.onnx's messages put it under "Exception summary")."""
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if "## Exception summary" in text and text.index("## Exception summary") + 1 < len(text):
        return text[text.index("## Exception summary") + 1][:300]
    return (text[0] if text else type(exc).__name__)[:300]


# --- models and inputs for the command line ---------------------------------------------------------


def load_model_spec(spec: str | os.PathLike) -> tuple[torch.nn.Module, Any]:
    """A compressed model from an artifact folder, or a dense one: 'minilm' or a Hugging Face folder."""
    from ..models import ModelSource, load_model, resolve

    folder = pathlib.Path(spec)
    if str(spec) != "minilm" and (folder / "recipe.json").is_file():
        from ..artifact import load, read_recipe

        recipe = read_recipe(folder)
        source = ModelSource.from_json(recipe["source"])
        if source.kind == "module":
            raise ArtifactError("this artifact was made from a user module, which cannot be rebuilt from the folder",
                                "export in Python: tngraph.export_onnx(tngraph.load(DIR, model), example_inputs, path)")
        module = load(folder)
        _, tokenizer = load_model(source)
        return module, tokenizer
    return load_model(resolve(str(spec)))


def text_inputs(tokenizer: Any, batch: int = 2, length: int = 16) -> dict[str, torch.Tensor]:
    """Example inputs of a text model: `batch` built-in sentences tokenized and cut or padded to `length` tokens."""
    if tokenizer is None:
        raise DataError("the model has no tokenizer to make example inputs with", "pass example_inputs")
    from ..data import sentence_sets

    texts = sentence_sets(calibration=max(batch, 8), evaluation=1).calibration[:batch]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return dict(enc)

