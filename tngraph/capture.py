"""nn.Module + example inputs -> ATen-level fx.GraphModule (torch.export, parameters as get_attr)."""
from __future__ import annotations

import contextlib
import inspect
import logging
import re
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch.export import Dim

from .errors import CaptureError

log = logging.getLogger(__name__)

ExampleInputs = tuple[tuple[Any, ...], dict[str, Any]]


def normalize_inputs(example_inputs: Any) -> ExampleInputs:
    """Accept a tensor, a tuple/list of positional inputs, a mapping of keyword inputs, or (args, kwargs)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if (
        isinstance(example_inputs, tuple)
        and len(example_inputs) == 2
        and isinstance(example_inputs[0], tuple)
        and isinstance(example_inputs[1], Mapping)
    ):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        return tuple(example_inputs), {}
    raise CaptureError(
        f"example inputs of type {type(example_inputs).__name__} are not supported",
        "pass a tensor, a tuple of positional inputs, a dict of keyword inputs, or (args, kwargs)",
    )


# inputs whose sizes past the batch are what the model is built for: images (channels x height x
# width) and audio features (mel bins x frames)
FIXED_SIZE_INPUTS = frozenset({"pixel_values", "input_features"})


def _dynamic_shapes(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Let torch.export decide which dims of every tensor input are dynamic (batch, sequence...):
    by the forward's parameter names where the inputs bind to them, else in the inputs' order."""

    def spec(value: Any, name: str = "") -> Any:
        if isinstance(value, torch.Tensor):
            if name in FIXED_SIZE_INPUTS and value.dim() > 1:  # only the batch varies: tracing stays fast (Swin's windows)
                return {0: Dim.AUTO, **{d: Dim.STATIC for d in range(1, value.dim())}}
            return {d: Dim.AUTO for d in range(value.dim())}
        return None

    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        bound = None
    if bound is not None:
        kinds = {p.name: p.kind for p in bound.signature.parameters.values()}
        if all(kinds[name] in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY) for name in bound.arguments):
            return {name: spec(value, name) for name, value in bound.arguments.items()}
    # torch.export matches a tuple against the positional inputs followed by the keyword inputs
    return tuple(spec(a) for a in args) + tuple(spec(v) for v in kwargs.values())


@contextlib.contextmanager
def _quiet_torch():
    """torch prints whole graphs on some export failures; the CaptureError says what matters."""
    names = ["torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def capture(model: torch.nn.Module, example_inputs: Any, *, dynamic: bool = True) -> fx.GraphModule:
    """Export `model` at ATen level; parameters become get_attr nodes of the returned GraphModule.

    The module keeps `nn_module_stack` and `stack_trace` on every node, takes the same inputs as
    `model` and returns the same output structure. With `dynamic=True` every input dimension may vary.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}", "pass the model object itself")
    args, kwargs = normalize_inputs(example_inputs)
    dynamic_shapes = _dynamic_shapes(model, args, kwargs) if dynamic else None
    was_training = model.training
    model.eval()
    try:
        with _quiet_torch(), torch.no_grad():
            exported = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # torch raises many types here; all mean "cannot trace"
        raise _capture_error(model, exc) from exc
    finally:
        model.train(was_training)
    gm = exported.module()
    log.info("captured %s: %d nodes", type(model).__name__, len(gm.graph.nodes))
    return gm


def _capture_error(model: torch.nn.Module, exc: Exception) -> CaptureError:
    text = str(exc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    where = ""
    frame = re.search(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)', text)
    if frame:
        where = f" at {frame.group(1)}:{frame.group(2)} in {frame.group(3)}: `{frame.group(4).strip()}`"
    if "data-dependent" in text or "GuardOnDataDependent" in type(exc).__name__:
        fix = (
            "Python control flow on tensor values cannot be traced; rewrite it with torch.cond / torch.where, "
            "or move it out of forward()"
        )
    else:
        fix = "make forward() traceable by torch.export (see torch.export's docs on unsupported constructs)"
    fix += ("; or compress through torch.compile(model, backend='tngraph'), which compresses each graph between "
            "graph breaks (the ones after a break data-free)")
    return CaptureError(f"cannot capture {type(model).__name__}: {first[:300]}{where}", fix)
