"""The torch.compile backend: torch.compile(model, backend="tngraph", options={...}).

Dynamo hands the backend each graph it captures (one per graph break, one per recompile) with its
example inputs. For each graph the backend

1. lifts the parameters and buffers that arrive as graph inputs (inlined nn modules) into
   attributes named by their module path ("encoder.layer.0.attention.self.query.weight"), inlines
   nn.Linear call_module nodes, and turns torch-level linear calls into aten.linear, so that the
   pass pipeline finds its targets as it does in an exported graph;
2. binds the calibration samples (options["calibration"]: texts, tokenized with options["tokenizer"]
   or the model's own tokenizer, or example inputs of the model's forward) to the graph's inputs
   through the sources dynamo recorded for them (L['kwargs']['input_ids'], its .size()[1], ...);
   a graph whose inputs are not the model's (after a graph break) is decomposed data-free;
3. runs the pipeline, or, when every target's weight (same tensor, same content, same options) was
   decomposed before, replays the cached decisions and factors without any analysis;
4. hands the rewritten graph to Inductor (options["fallback"] = "eager" runs it as it is).

On the CPU the factor chains stay as aten ops for Inductor to fuse with what surrounds them (the
tngraph ops' CPU implementation is the same chain); with CUDA inputs the fuse pass puts the tngraph
ops in place, whose Triton kernels Inductor calls as they are.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import inspect
import logging
import os
import operator
import re
import types
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .batches import by_token_length, calibration_batches
from .config import Config, valid_keys
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

EXTRA_OPTIONS = {
    "calibration": "a list of texts (Hugging Face models; tokenizer from options['tokenizer'] or the model's folder) "
                   "or of example inputs of the model's forward",
    "tokenizer": "the tokenizer for calibration texts (an object, or a local folder)",
    "fallback": "'inductor' (default: the rewritten graph goes to Inductor) or 'eager' (run it as it is)",
}
FALLBACKS = ("inductor", "eager")
_LINEAR_FUNCTIONS = {torch._C._nn.linear, torch.nn.functional.linear}
_MATMULS = {torch.addmm: torch.ops.aten.addmm.default, torch.mm: torch.ops.aten.mm.default}  # matched as targets in aten form
_CONVS = {torch.conv1d: torch.ops.aten.conv1d.default, torch.conv2d: torch.ops.aten.conv2d.default}
_PATH = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]")

# (options, calibration, weight name, id, content hash) -> (PlanInfo, TargetPlan or None)
_decisions: dict[tuple, tuple[Any, Any]] = {}
stats: collections.Counter = collections.Counter()  # graphs, cache_hits, cache_misses, data_free


def clear_cache() -> None:
    """Forget every cached decomposition (they are also freed with the process)."""
    _decisions.clear()
    stats.clear()


@dataclass
class BackendOptions:
    config: Config
    calibration: Sequence[Any] | None
    tokenizer: Any
    fallback: str
    config_keys: frozenset  # the Config keys the user set


def parse_options(options: dict | None) -> BackendOptions:
    """Config keys plus the backend's own (calibration, tokenizer, fallback); unknown keys raise with
    the valid ones listed."""
    options = dict(options or {})
    if not all(isinstance(k, str) for k in options):
        raise ConfigError("torch.compile options keys must be strings", "e.g. options={'budget': 0.5}")
    unknown = sorted(set(options) - set(valid_keys()) - set(EXTRA_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown tngraph backend option {unknown[0]!r}",
                          f"valid options: {', '.join(valid_keys() + list(EXTRA_OPTIONS))}")
    calibration = options.pop("calibration", None)
    tokenizer = options.pop("tokenizer", None)
    fallback = options.pop("fallback", "inductor")
    if fallback not in FALLBACKS:
        raise ConfigError(f"unknown fallback {fallback!r}", f"choose one of {', '.join(FALLBACKS)}")
    healing = [k for k in options if k.startswith("heal_") and not (k == "heal_steps" and not options[k])]
    if healing:
        raise ConfigError(f"the torch.compile backend does not heal (a graph is not a model to fine-tune), so {healing[0]!r} has nothing to set",
                          f"heal with tngraph.compress(model, ...) and torch.compile its result, or leave {healing[0]} out")
    if "calibration_mix" in options:
        raise ConfigError("calibration_mix mixes the built-in sentences of tngraph's commands; the backend calibrates on "
                          "options['calibration'] alone", "mix the sources in the calibration list yourself, and leave calibration_mix out")
    if calibration is not None and (isinstance(calibration, (str, bytes)) or not isinstance(calibration, Sequence)):
        raise DataError(f"calibration must be a list of samples, got {type(calibration).__name__}",
                        "pass options={'calibration': [text, ...]} or a list of example-input tuples")
    options.setdefault("progress", False)
    config = Config.from_options(options, heal_steps=0)
    if config.mlp == "prune":
        raise ConfigError(f"mlp={config.mlp!r} is not available through torch.compile yet: dynamo's graphs do not show the MLP "
                          "blocks the way torch.export's do", "compress with tngraph.compress(..., mlp='prune') (or tngraph "
                          "compress --mlp prune) and compile the result, or leave mlp out")
    config = config.resolve_mlp(text_encoder=False)  # dynamo's graphs show no blocks: mlp="auto" is low rank here
    return BackendOptions(config, calibration, tokenizer, fallback, frozenset(options))


# --- 1. lifting -------------------------------------------------------------------------------------


@dataclass
class LiftedGraph:
    gm: fx.GraphModule
    keep: list[int]  # positions, among dynamo's inputs, of the lifted graph's inputs
    sources: list[str | None]  # dynamo's source name of each of them, or None
    names: list[str]  # their placeholder names: the forward argument's own name where dynamo's source gives one
    values: list[Any]  # dynamo's example value of each (FakeTensor with int or symbolic sizes, SymInt)


def _source(node: fx.Node) -> str | None:
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    try:
        return source.name if isinstance(source.name, str) else source.name()  # a property in newer torch
    except Exception:
        return None


def _module_path(source: str | None, fallback: str) -> str:
    parts = _PATH.findall(source or "")
    return ".".join(parts) if parts else re.sub(r"\W", "_", fallback)


def _set_attr(root: torch.nn.Module, path: str, value: torch.Tensor) -> None:
    *owners, attr = path.split(".")
    module = root
    for name in owners:
        if not hasattr(module, name):
            module.add_module(name, torch.nn.Module())
        module = getattr(module, name)
    if isinstance(value, torch.nn.Parameter):
        module.register_parameter(attr, value)
    else:
        module.register_buffer(attr, value)


def lift(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> LiftedGraph:
    """A copy of dynamo's graph with its parameters and buffers as attributes (module paths), nn.Linear
    modules inlined and every linear call as aten.linear."""
    graph = fx.Graph()
    root = torch.nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    keep, sources, names, values, taken, transposes = [], [], [], [], set(), set()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        value = example_inputs[index] if index < len(example_inputs) else None
        source = _source(node)
        is_state = isinstance(value, torch.nn.Parameter) or bool(source and ("._parameters[" in source or "._buffers[" in source))
        if is_state and isinstance(value, torch.Tensor):
            path = _module_path(source, node.name)
            while path in taken:
                path += "_"
            taken.add(path)
            _set_attr(root, path, value)
            new = graph.get_attr(path)
        else:
            arg = re.fullmatch(r"L(?:\['kwargs'\])?\['([A-Za-z_]\w*)'\]", source or "")
            name = arg.group(1) if arg and arg.group(1) not in names else node.name
            new = graph.placeholder(name)
            keep.append(index)
            sources.append(source)
            names.append(name)
            values.append(node.meta.get("example_value", value))
        new.meta = dict(node.meta)
        env[node] = new
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "get_attr":
            path = str(node.target)
            if path not in taken:
                _set_attr(root, path, _attr(gm, path))
                taken.add(path)
            new = graph.get_attr(path)
        elif node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), torch.nn.Linear):
            linear = gm.get_submodule(str(node.target))
            args = [graph.get_attr(_lift_module_state(root, taken, str(node.target), "weight", linear.weight))]
            if linear.bias is not None:
                args.append(graph.get_attr(_lift_module_state(root, taken, str(node.target), "bias", linear.bias)))
            new = graph.call_function(torch.ops.aten.linear.default, (env[node.args[0]], *args))
        elif node.op == "call_module":
            name = str(node.target)
            if not hasattr(root, name.replace(".", "_")):
                root.add_module(name.replace(".", "_"), gm.get_submodule(name))
            new = graph.call_module(name.replace(".", "_"), fx.node.map_arg(node.args, env.__getitem__),
                                    fx.node.map_arg(node.kwargs, env.__getitem__))
        elif node.op == "call_function" and node.target in _MATMULS and not node.kwargs:  # GPT-2's Conv1D: addmm(b, x, W)
            new = graph.call_function(_MATMULS[node.target], fx.node.map_arg(node.args, env.__getitem__))
        elif node.op == "call_function" and node.target in _CONVS and not node.kwargs \
                and not any(isinstance(a, str) for a in node.args):  # padding="same" is no target
            new = graph.call_function(_CONVS[node.target], fx.node.map_arg(node.args, env.__getitem__))
        elif node.op == "call_function" and node.target in (operator.matmul, torch.matmul) and not node.kwargs \
                and _transposed_state(node.args[1]):  # x @ W.T: Falcon's own Linear
            new = graph.call_function(torch.ops.aten.linear.default, (env[node.args[0]], env[node.args[1]].args[0]))
            transposes.add(env[node.args[1]])
        elif node.op == "call_function" and node.target in _LINEAR_FUNCTIONS:
            x, weight, *rest = fx.node.map_arg(node.args, env.__getitem__)
            bias = rest[0] if rest else fx.node.map_arg(node.kwargs, env.__getitem__).get("bias")
            new = graph.call_function(torch.ops.aten.linear.default, (x, weight) if bias is None else (x, weight, bias))
        else:
            new = graph.node_copy(node, env.__getitem__)
        new.meta = dict(node.meta)
        env[node] = new
    for dead in transposes:  # a weight read by nothing else stays a target
        if not dead.users:
            graph.erase_node(dead)
    for new in graph.nodes:  # the passes read FakeTensor values from meta["val"], as torch.export writes it
        if "val" not in new.meta and "example_value" in new.meta:
            new.meta["val"] = new.meta["example_value"]
    lifted = fx.GraphModule(root, graph)
    return LiftedGraph(lifted, keep, sources, names, values)


def _transposed_state(node: Any) -> bool:
    """Whether `node` is getattr(W, "T") of a lifted weight (dynamo's `W.T`)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is getattr and len(node.args) == 2 \
        and node.args[1] == "T" and isinstance(node.args[0], fx.Node) and node.args[0].op in ("placeholder", "get_attr")


def _lift_module_state(root, taken, module: str, attr: str, value: torch.Tensor) -> str:
    path = f"{module}.{attr}"
    if path not in taken:
        _set_attr(root, path, value)
        taken.add(path)
    return path


def _attr(gm: torch.nn.Module, path: str) -> torch.Tensor:
    obj: Any = gm
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# --- 2. calibration ---------------------------------------------------------------------------------


def _frame() -> tuple[types.CodeType | None, dict]:
    """The code and locals of the frame dynamo is compiling (None outside dynamo)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        return tx.f_code, dict(getattr(tx, "f_locals", {}) or {})
    except Exception:
        return None, {}


def _binder(code: types.CodeType | None, f_locals: dict) -> Callable[[tuple, dict], dict] | None:
    """Binds a sample (args, kwargs) of the compiled function as its frame's locals (self: the module
    being compiled, whose sizes some sources read)."""
    if code is None:
        return None
    try:
        cells = tuple(types.CellType() for _ in code.co_freevars)  # a closure's code needs its cells
        signature = inspect.signature(types.FunctionType(code, {}, closure=cells))
    except (TypeError, ValueError):
        return None
    first = next(iter(signature.parameters), None)

    def bind(args: tuple, kwargs: dict) -> dict:
        bound = signature.bind_partial(*((f_locals.get("self"),) if first == "self" else ()), *args, **kwargs)
        return dict(bound.arguments)

    return bind


def graph_inputs(lifted: LiftedGraph, bind: Callable[[tuple, dict], dict], sample: tuple[tuple, dict]) -> dict[str, Any]:
    """The lifted graph's inputs (by placeholder name) for one calibration sample of the model's
    forward, each evaluated from the source dynamo recorded for it."""
    local = bind(*sample)
    values = {}
    for name, source, example in zip(lifted.names, lifted.sources, lifted.values):
        if source is None or not source.startswith("L["):
            raise KeyError(source)
        value = eval(source, {"__builtins__": {}}, {"L": local})  # noqa: S307 (dynamo's own source expressions)
        if isinstance(example, torch.Tensor) and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = torch.tensor(value, dtype=example.dtype)  # dynamic=True passes Python floats as 0-d tensors
        values[name] = value
    return values


def _static_dims(value: Any) -> dict[int, int]:
    """The dimensions the graph was specialised to (int sizes; symbolic ones may vary)."""
    if not isinstance(value, torch.Tensor):
        return {}
    return {d: int(size) for d, size in enumerate(value.shape) if isinstance(size, int)}


def _fits(lifted: LiftedGraph, inputs: dict[str, Any]) -> bool:
    for name, example in zip(lifted.names, lifted.values):
        value = inputs[name]
        if isinstance(example, torch.Tensor):
            if not isinstance(value, torch.Tensor) or value.dim() != example.dim():
                return False
            if any(value.shape[d] != size for d, size in _static_dims(example).items()):
                return False
    return True


def _text_shape(lifted: LiftedGraph) -> dict[int, int]:
    """The static (batch, length) dims of the graph's token inputs, if it was specialised to any."""
    example = next((v for n, v in zip(lifted.names, lifted.values) if n in ("input_ids", "attention_mask")), None)
    return _static_dims(example) if isinstance(example, torch.Tensor) and example.dim() == 2 else {}


def _text_batches(texts: Sequence[str], tokenizer: Any, config: Config, lifted: LiftedGraph) -> list[tuple[tuple, dict]]:
    """Calibration texts as model inputs; for a graph specialised to a batch size and/or a sequence
    length (dynamo's first compile is static), in batches of exactly that shape."""
    static = _text_shape(lifted)
    if not static:
        return calibration_batches(list(texts), config, tokenizer)
    rows = static.get(0, config.batch_size)
    texts = by_token_length(list(texts)[: config.calibration_samples], tokenizer, config.max_length)
    padding = {"padding": "max_length", "max_length": static[1]} if 1 in static else {"padding": True, "max_length": config.max_length}
    batches = []
    for i in range(0, len(texts), rows):
        chunk = texts[i : i + rows]
        chunk += [texts[k % len(texts)] for k in range(rows - len(chunk))]  # the batch size is fixed: fill it
        enc = tokenizer(chunk, truncation=True, return_tensors="pt", **padding)
        batches.append(((), dict(enc)))
    return batches


def _tokenizer(given: Any, f_locals: dict) -> Any:
    if given is not None and not isinstance(given, str):
        return given
    path = given
    if path is None:
        model = f_locals.get("self")
        path = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not path:
        return None
    import pathlib

    if not pathlib.Path(path).is_dir():
        if given is not None:
            raise DataError(f"tokenizer folder {given!r} does not exist", "pass options={'tokenizer': tokenizer_object_or_local_folder}")
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise DataError(f"cannot load a tokenizer from {path!r}: {str(exc).splitlines()[0][:200]}",
                        "pass options={'tokenizer': tokenizer}") from exc


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
    log.warning(message)


def calibration_for(lifted: LiftedGraph, opts: BackendOptions) -> tuple[list, Any, str]:
    """(batches of lifted-graph inputs, objective, how) for this graph; how is "data-free", "full", or
    "shaped" when the texts had to be cut to the static length the graph was specialised to."""
    if not opts.calibration:
        _say_once("tngraph backend: no calibration data, decomposing data-free "
                  "(pass options={'calibration': [...]} for activation-aware decompositions)")
        stats["data_free"] += 1
        return [], None, "data-free"
    code, f_locals = _frame()
    texts = all(isinstance(s, str) for s in opts.calibration)
    tokenizer = _tokenizer(opts.tokenizer, f_locals) if texts else None
    if texts and tokenizer is None:
        raise DataError("calibration texts need a tokenizer and none was found beside the model",
                        "pass options={'tokenizer': tokenizer} or tokenized example inputs")
    samples = _text_batches(opts.calibration, tokenizer, opts.config, lifted) if texts else calibration_batches(opts.calibration, opts.config)
    bind = _binder(code, f_locals)
    resumed = code is not None and code.co_name.startswith("torch_dynamo_resume_in_")
    try:
        if bind is None or resumed:
            raise KeyError("the graph starts inside the model (a graph break)" if resumed else "no frame")
        bound = [graph_inputs(lifted, bind, sample) for sample in samples]
    except (KeyError, TypeError, IndexError, AttributeError, NameError, SyntaxError) as exc:
        if not resumed and bind is not None:  # the model's own forward: the samples do not fit it
            raise DataError(f"calibration samples do not fit the compiled function {code.co_name}(): {exc}",
                            "pass samples as the model takes them: texts, tuples of positional inputs or dicts of "
                            "keyword inputs") from exc
        log.debug("calibration samples do not bind to the graph's inputs: %r", exc)
        _say_once("tngraph backend: a graph's inputs are not the model's inputs (a graph break); "
                  "such graphs are decomposed data-free")
        stats["data_free"] += 1
        return [], None, "data-free"
    batches = [((), inputs) for inputs in bound if _fits(lifted, inputs)]
    # texts cut or padded to a fixed length give other statistics; regrouped rows give the same ones
    shaped = texts and 1 in _text_shape(lifted)
    if not batches:
        batches = [((), inputs) for inputs in _rebatch(lifted, bound)]
    if not batches:
        _say_once("tngraph backend: no calibration sample has the shapes a graph was specialised to; that graph is "
                  "decomposed data-free (pass dynamic=True to torch.compile, or samples of the compiled shapes)")
        stats["data_free"] += 1
        return [], None, "data-free"
    if len(batches) < len(bound):
        log.info("tngraph backend: %d of %d calibration batches fit the graph's static shapes", len(batches), len(bound))
    return batches, _objective(lifted, texts, _vocabulary(tokenizer)), "shaped" if shaped else "full"


def _rebatch(lifted: LiftedGraph, bound: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Samples whose only misfit is the row count of a graph specialised to one: concatenated along
    the first dimension and cut into batches of that count (the rest dropped)."""
    tensors = [(n, v) for n, v in zip(lifted.names, lifted.values) if isinstance(v, torch.Tensor)]
    if not bound or len(tensors) != len(lifted.names) or any(v.dim() == 0 or 0 not in _static_dims(v) for _, v in tensors):
        return []
    rows = _static_dims(tensors[0][1])[0]
    for inputs in bound:
        for name, example in tensors:
            value = inputs[name]
            if not isinstance(value, torch.Tensor) or value.dim() != example.dim() or value.shape[0] != inputs[tensors[0][0]].shape[0]:
                return []
            if any(value.shape[d] != size for d, size in _static_dims(example).items() if d > 0):
                return []
    joined = {name: torch.cat([inputs[name] for inputs in bound]) for name, _ in tensors}
    total = joined[tensors[0][0]].shape[0]
    return [{name: t[i : i + rows] for name, t in joined.items()} for i in range(0, total - rows + 1, rows)]


def _vocabulary(tokenizer: Any) -> int | None:
    try:
        return len(tokenizer) if tokenizer is not None else None
    except TypeError:
        return getattr(tokenizer, "vocab_size", None)


def _objective(lifted: LiftedGraph, texts: bool, vocabulary: int | None = None):
    """For texts, the pooled sentence embedding of the graph's first output (as tngraph.compress),
    unless that output is as wide as the tokenizer's vocabulary: a language model's logits, which
    count whole (every float output), as tngraph.compress counts a causal LM's."""
    if not texts or "attention_mask" not in lifted.names:
        return None
    from .evaluate import pooled

    def objective(outputs: Any, args: tuple, kwargs: dict) -> Any:
        first = outputs[0] if isinstance(outputs, (tuple, list)) and outputs else outputs
        mask = kwargs["attention_mask"]
        if isinstance(first, torch.Tensor) and first.dim() == 3 and tuple(first.shape[:2]) == tuple(mask.shape) \
                and (vocabulary is None or first.shape[-1] < vocabulary):
            return pooled(first, mask)
        return outputs

    return objective


# --- 3. cache ---------------------------------------------------------------------------------------


def _fingerprint(value: Any) -> str:
    digest = hashlib.sha256()
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, torch.Tensor):
            digest.update(_tensor_hash(item).encode())
        elif isinstance(item, (list, tuple)):
            digest.update(_fingerprint(item).encode())
        elif isinstance(item, dict):
            digest.update(_fingerprint([repr(sorted(item))] + [item[k] for k in sorted(item)]).encode())
        else:
            digest.update(repr(item).encode())
    return digest.hexdigest()


def _tensor_hash(t: torch.Tensor) -> str:
    from .models import tensor_bytes

    digest = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(tensor_bytes(t))
    return digest.hexdigest()


def _weight_key(prefix: tuple, name: str, weight: torch.Tensor) -> tuple:
    """The weight by identity and content (not its version counter: analysis passes perturb and restore)."""
    return (*prefix, name, id(weight), _tensor_hash(weight))


# --- 4. the backend ---------------------------------------------------------------------------------


def tngraph_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None, mode: str | None = None):
    """torch.compile's entry: compress this dynamo graph, then compile it with Inductor."""
    from .meta import info, targets as target_nodes
    from .passes import PIPELINE, PassContext
    from .passes import targets as targets_pass
    from .pipeline import run_passes

    opts = parse_options(options)
    stats["graphs"] += 1
    lifted = lift(gm, example_inputs)
    cuda = any(isinstance(v, torch.Tensor) and v.is_cuda for v in example_inputs)
    config = opts.config
    if not cuda and "fuse" not in opts.config_keys and opts.fallback == "inductor":
        config = config.replace(fuse=False)  # the CPU op is the same chain: let Inductor see it
    if config.dump_dir:  # one dump folder per dynamo graph
        config = config.replace(dump_dir=os.path.join(config.dump_dir, f"graph_{stats['graphs']:02d}"))
    batches, objective, how = calibration_for(lifted, opts)
    ctx = PassContext(config=config, calibration=batches, objective=objective)
    # the passes run outside dynamo's tracing context: its fake mode is not the one of the graph's
    # example values, and new nodes' values must share the graph's
    with torch._guards.tracing(None):
        gm_ = run_passes(lifted.gm, ctx, [targets_pass])
    # decisions made without data (a graph break), or with samples cut to a static graph's shapes
    # (dynamo's first compile), are not reused where the whole data binds
    prefix = (_fingerprint(sorted(config.to_dict().items())), _fingerprint(list(opts.calibration or [])), how)
    keys = {}
    for node in target_nodes(gm_):
        t = info(node).target
        keys[t.name] = _weight_key(prefix, t.name, _attr(gm_, t.weight))
    if keys and all(k in _decisions for k in keys.values()):
        stats["cache_hits"] += 1
        ctx.preset = {name: _decisions[k] for name, k in keys.items()}
        log.info("tngraph backend: %d targets from the cache", len(keys))
        passes = [p for p in PIPELINE if p.__name__ in ("factorize", "fuse")]
        from .passes.factorize import preset_plans

        passes = [preset_plans, *passes]
    else:
        stats["cache_misses"] += 1
        passes = [p for p in PIPELINE if p.__name__ != "targets"]
    with torch._guards.tracing(None):
        gm_ = run_passes(gm_, ctx, passes)
    for node in target_nodes(gm_):
        t = info(node).target
        if t.name in keys and info(node).plan is not None:
            _decisions[keys[t.name]] = (info(node).plan, ctx.plan.get(t.name))
    decided = [info(n).plan for n in target_nodes(gm_) if info(n).plan is not None]
    if decided:
        before = sum(p.params_before for p in decided)
        after = sum(p.params_after for p in decided)
        log.info("tngraph backend: graph with %d targets, %d -> %d parameters (%.1f%%)", len(decided), before, after,
                 100 * after / max(before, 1))
    inputs = [example_inputs[i] for i in lifted.keep]
    if opts.fallback == "eager":
        compiled = gm_.forward
    else:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        from .layers.quant import compile_options

        patches = {**({} if cuda else compile_options(gm_)), **(list_mode_options(mode) if mode else {})}
        compiled = compile_fx(gm_, inputs, config_patches=patches or None)
    keep = lifted.keep

    def run(*args: Any) -> Any:
        return compiled(*[args[i] for i in keep])

    run.tngraph_graph = gm_  # type: ignore[attr-defined]  (tests and the dump look at it)
    return run
