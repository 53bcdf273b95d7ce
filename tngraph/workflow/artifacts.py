"""`tngraph info` and `tngraph export onnx` as Python calls: an artifact's summary, and an ONNX file
checked in onnxruntime and against TensorRT's operators."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


@dataclass
class ArtifactInfo:
    """A verified artifact: its recipe, target names, and the targets' parameters kept and dense."""

    path: str
    recipe: dict[str, Any]
    names: tuple[str, ...]
    kept: int
    dense: int

    def summary(self) -> str:
        """What `tngraph info` prints."""
        lines = [f"artifact {self.path}: verified (factors hash, source model {self.recipe['source']['kind']})",
                 f"{len(self.names)} targets, parameters kept {self.kept:,} of {self.dense:,} ({self.kept / self.dense:.3f})"]
        lines += [f"  {t['name']:48} {t['format']:8} rank {t['rank']:5}  {t['out_features']}x{t['in_features']}" for t in self.recipe["targets"]]
        return "\n".join(lines)


def info(artifact: str | os.PathLike) -> ArtifactInfo:
    """Load (and so verify: hashes, source model) an artifact and count its targets' parameters."""
    from ..artifact import load
    from ..evaluate import count_params

    module = load(artifact)
    recipe = module.tngraph_recipe
    names = tuple(t["name"] for t in recipe["targets"])
    kept, _ = count_params(module, names)
    dense = sum(t["in_features"] * t["out_features"] + (t["out_features"] if t["bias"] else 0) for t in recipe["targets"])
    return ArtifactInfo(str(artifact), recipe, names, kept, dense)


@dataclass
class OnnxRun:
    """An ONNX export (lowering.onnx.OnnxExport) and the TensorRT check's problems of the file."""

    export: Any
    problems: list[Any]

    def summary(self) -> str:
        """What `tngraph export onnx` prints."""
        result, problems = self.export, self.problems
        external = f" + {result.external_data.name}" if result.external_data else ""
        axes = ", ".join(f"{n}[{', '.join(f'{a}:{lab}' for a, lab in ax.items())}]" for n, ax in result.dynamic_axes.items()) or "none"
        lines = [f"wrote {result.path}{external}: {result.bytes / 1e6:.2f} MB, {result.dtype}, opset {result.opset}, checker passed (full_check)",
                 f"  inputs {', '.join(result.inputs)}; outputs {', '.join(result.outputs)}; dynamic axes {axes}"]
        runtime = f"onnxruntime ({result.providers[0]}{f', {result.dtype} emulated in float32' if result.emulated else ''})"
        reference = "PyTorch" if result.dtype == "fp32" else "float32 PyTorch"
        for check in result.checks:
            shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in check.shapes.items())
            lines.append(f"  {runtime} vs {reference} on {shapes}: max abs diff {check.max_abs_diff:.3g} ({check.max_rel_diff:.2%} of the largest value)")
        bound = (f"{result.max_rel_diff:.2%} of the largest value <= tolerance {result.tolerance:.0%}" if result.relative
                 else f"max abs diff {result.max_abs_diff:.3g} <= tolerance {result.tolerance:g}")
        lines.append(f"  {bound}; ops: " + ", ".join(f"{k} {v}" for k, v in sorted(result.op_counts.items(), key=lambda kv: -kv[1])))
        errors = sum(p.severity == "error" for p in problems)
        lines.append(f"  TensorRT check: {errors} errors, {len(problems) - errors} warnings"
                     + (f" (see `tngraph export tensorrt --onnx {result.path} --check-only`)" if problems else ""))
        return "\n".join(lines)


def export_onnx(model: str | os.PathLike, out: str | os.PathLike, *, batch: int = 2, length: int = 16, dtype: str = "fp32",
                tolerance: float | None = None, static: bool = False, opset: int | None = None, force: bool = False,
                quant_ops: str = "onnxruntime") -> OnnxRun:
    """`tngraph export onnx --model MODEL --out OUT ...` as one call: an artifact, 'minilm' or a
    Hugging Face folder exported at a batch x length example, checked, then checked against TensorRT."""
    from ..lowering.onnx import export_onnx as export, load_model_spec, text_inputs, written_by_tngraph
    from ..lowering.tensorrt import check_tensorrt
    from ..ownership import check_output_file

    if batch < 1 or length < 1:
        raise ConfigError(f"--batch and --length must be at least 1, got {batch} and {length}")
    check_output_file(out, force, ours=written_by_tngraph, what="an ONNX file")  # before the model is read
    module, tokenizer = load_model_spec(model)
    result = export(module, text_inputs(tokenizer, batch, length), out, dynamic=not static, tolerance=tolerance, opset=opset,
                    force=force, dtype=dtype, quant_ops=quant_ops)
    return OnnxRun(result, check_tensorrt(result.path))
