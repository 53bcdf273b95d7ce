"""tngraph.compress: capture -> pass pipeline -> plan -> the user's module with its targets swapped."""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

from . import distributed, memory, meta
from .calibration import GramStats, OutputGramStats
from .capture import capture
from .config import Config
from .errors import ConfigError, DataError
from .evaluate import sentence_objective
from .lm import is_causal_lm, no_kv_cache
from .batches import calibration_batches
from .data import read_lines
from .heal import AUTO_STEPS, HealConfig, auto_steps, checkpoint_steps, heal, resolve_device, trainable
from .models import ModelSource, forward_names, token_lengths
from .passes import PassContext
from .pipeline import run_passes
from .recipe import apply_plan, attach, factorized_parameters, make_recipe
from .samples import TensorSamples

log = logging.getLogger(__name__)

@dataclass
class CompressResult:
    """What one compression produced: the module, the rewritten graph, the pass context and the recipe.
    The context's input statistics keep their rows and mean |x|, not X^T X: it is released once the
    passes have run (the largest thing they hold; nothing after them reads it)."""

    module: torch.nn.Module
    graph: fx.GraphModule
    context: PassContext
    recipe: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    heal: Any = None  # tngraph.heal.HealResult when healing ran
    unhealed: dict[str, torch.Tensor] | None = None  # the healed parameters' values before healing


def compress(
    model: torch.nn.Module,
    example_inputs: Any = None,
    calibration: Sequence[Any] | None = None,
    config: Config | None = None,
    *,
    tokenizer: Any = None,
    **options: Any,
) -> torch.nn.Module:
    """Return a compressed copy of `model` that takes the same inputs and returns the same structure.

    `calibration` is a list of texts (with `tokenizer`), a list of example inputs, or named input
    tensors (tngraph.read_calibration(path, model_folder): a .safetensors/.npz file, a folder of
    images or .wav files); without it the decomposition is data-free. Options may be given as `config=Config(...)` or as keywords.
    """
    return compress_with_result(model, example_inputs, calibration, config, tokenizer=tokenizer, **options).module


def compress_with_result(
    model: torch.nn.Module,
    example_inputs: Any = None,
    calibration: Sequence[Any] | None = None,
    config: Config | None = None,
    *,
    tokenizer: Any = None,
    source: ModelSource | None = None,
    heal_texts: Sequence[str] | None = None,
    heal_checkpoint: Any = None,
    resume: bool = False,
    **options: Any,
) -> CompressResult:
    """compress() returning the module with its graph, pass context, recipe, timings and healing.

    calibration: texts, example inputs, or a tngraph.samples.TensorSamples (named input tensors, one
    sample a row: tngraph.read_calibration reads tensor files and image or audio folders);
    heal_texts: texts (or TensorSamples) to heal on (default: Config.heal_data's file, else the calibration data);
    heal_checkpoint / resume: a folder for healing checkpoints, and whether to continue from one.
    """
    if "calibration_mix" in options:
        raise ConfigError("calibration_mix mixes the built-in sentences of tngraph's commands; compress() calibrates on the "
                          "`calibration` given", "mix the sources in the calibration list yourself, and leave calibration_mix out")
    config = (config or Config()).replace(**options) if options else (config or Config())
    tensors = calibration if isinstance(calibration, TensorSamples) else None  # named input tensors, one sample a row
    if tensors is not None:
        tensors.check_names(forward_names(model))
        calibration = tensors.batches(config.batch_size, limit=config.calibration_samples)
    batches = calibration_batches(calibration, config, tokenizer, forward_names(model))
    texts = calibration is not None and len(calibration) > 0 and all(isinstance(s, str) for s in calibration)
    config = config.resolve_mlp(bool(texts) and not is_causal_lm(model))  # mlp="auto" made concrete, in the recipe too
    # healing data is checked before the long work
    healing = _heal_texts(config, heal_texts, calibration if texts else tensors) if config.heal_steps != 0 else None
    if healing is not None and tokenizer is None and not isinstance(healing, TensorSamples):
        raise DataError("healing texts need a tokenizer", "pass tokenizer=, or heal_steps=0")
    probe = None  # heal_steps "auto" is timed only when something will heal
    if healing is not None and config.heal_steps == "auto":
        probe = text_probe(calibration, config, tokenizer, model) if texts else batches[0] if batches else example_inputs
    config = resolve_heal_steps(config, model, probe, heal_checkpoint if resume else None)
    if example_inputs is None:
        if not batches:
            raise DataError("compress needs example inputs to capture the model", "pass example_inputs= or calibration=")
        example_inputs = batches[0]
    source = source or ModelSource("module")
    with no_kv_cache(model):  # a causal LM is captured and healed without its KV cache
        result = _compress(model, example_inputs, batches, config, source, texts, healing, tokenizer, heal_checkpoint, resume)
    if getattr(getattr(result.module, "config", None), "use_cache", None) is not None:
        result.module.config.use_cache = model.config.use_cache  # the copy was made with it off
    return result


def _compress(model, example_inputs, batches, config, source, texts, healing, tokenizer, heal_checkpoint, resume) -> CompressResult:
    if config.heal_steps:  # a GPU the machine lacks is refused before the passes' minutes, not after them
        resolve_device(config.heal_device, next(iter(model.parameters()), torch.empty(0)).device)
    start = time.perf_counter()
    gm = capture(model, example_inputs)
    timings = {"capture": time.perf_counter() - start}
    # the result is the user's module with its targets swapped: only layers called as modules are targets
    # under torch.distributed (torchrun), the passes' per-target work is shared between the ranks
    group = distributed.current()
    ctx = PassContext(config=config, calibration=batches, objective=sentence_objective if texts else None, module_targets_only=True,
                      group=group if group.world > 1 else None)
    gm = run_passes(gm, ctx)
    timings.update(ctx.timings)
    for stats in ctx.stats.values():  # nothing after the passes reads the input Grams (2.7 GB at 0.5 B parameters)
        if isinstance(stats, (GramStats, OutputGramStats)):
            stats.release()
    memory.return_freed(collect=False)  # (no garbage collection: released by reference count; nothing below 1 GB)
    if not meta.targets(gm):
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        shown = ", ".join(linears[:3]) + (", ..." if len(linears) > 3 else "")
        raise ConfigError(f"no layer of the model is a target: include {list(config.include)} / exclude {list(config.exclude)} "
                          f"left none of its {len(linears)} linear layers" + (f" ({shown})" if linears else ""),
                          "match module paths like those with --include/--exclude (regular expressions, re.search)")
    compressed = apply_plan(copy_around(model, ctx.plan.values()), ctx.plan.values())
    unshare(compressed, model)
    recipe = make_recipe(model, ctx.plan.values(), config, source)
    attach(compressed, recipe)
    result = CompressResult(compressed, gm, ctx, recipe, timings)
    if config.heal_steps > 0 and healing is None:
        log.warning("healing skipped: it needs texts and a tokenizer, or input tensors (pass heal_data=FILE, heal_texts=[...] "
                    "or calibration=TensorSamples, or heal_steps=0 to silence this)")
    elif healing is not None:
        start = time.perf_counter()
        result.heal, result.unhealed = heal_model(compressed, model, healing, tokenizer, heal_config(config), show=config.progress,
                                                  checkpoint=heal_checkpoint, resume=resume)
        timings["heal"] = time.perf_counter() - start
    return result


def copy_around(model: torch.nn.Module, plans: Any) -> torch.nn.Module:
    """A deep copy of `model` whose layers that `plans` replace keep the original's parameters for the
    moment (not copied: apply_plan swaps those layers out next), so building the result never holds a
    second copy of the weights it is about to drop (2 GB at 0.5 B parameters)."""
    plans = list(plans)
    memo: dict[int, Any] = {}
    for name in [p.name for p in plans] + [t for p in plans for t in p.tied]:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            continue  # apply_plan names the missing module
        for p in layer.parameters(recurse=False):
            memo[id(p)] = p
    return copy.deepcopy(model, memo)


def unshare(compressed: torch.nn.Module, model: torch.nn.Module) -> None:
    """Give `compressed` its own copy of any tensor it still shares with `model` (a replaced layer's
    weight that another, kept layer also reads), so changing one never changes the other."""
    originals = {id(t) for t in [*model.parameters(), *model.buffers()]}
    clones: dict[int, torch.Tensor] = {}  # one clone per shared tensor: ties within the result hold
    for module in compressed.modules():
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is not None and id(t) in originals:
                    if id(t) not in clones:
                        clone = t.detach().clone()
                        clones[id(t)] = torch.nn.Parameter(clone, t.requires_grad) if isinstance(t, torch.nn.Parameter) else clone
                    table[key] = clones[id(t)]


def _heal_texts(config: Config, given: Sequence[str] | None, calibration: Sequence[str] | None) -> Sequence[str] | None:
    if config.heal_data is not None:
        return read_lines(config.heal_data, what="healing data")
    return given if given is not None else calibration


def text_probe(texts: Sequence[str], config: Config, tokenizer: Any, model: torch.nn.Module) -> tuple[tuple, dict[str, Any]]:
    """The batch heal_steps "auto" times a step on: the first config.batch_size `texts`, cut to the
    mean token length of the first eight batches' worth (healing's batches group texts by length:
    they pad to about the mean length, not the longest), as (args, kwargs) of the model's forward."""
    lengths = token_lengths(tokenizer, list(texts[: 8 * config.batch_size]), config.max_length)
    cut = config.replace(max_length=max(1, round(sum(lengths) / len(lengths))))
    return calibration_batches(list(texts[: config.batch_size]), cut, tokenizer, forward_names(model))[0]


def resolve_heal_steps(config: Config, model: torch.nn.Module, batch: Any, resume_from: Any = None) -> Config:
    """`config` with heal_steps "auto" made a number (as mlp "auto" is: the recipe records it):
    tngraph.heal.auto_steps timed on the dense `model` with `batch` (a dict of its input tensors, a
    calibration batch, or (args, kwargs) of its forward) on the device healing would take; the
    fewest auto steps without such a batch (nothing to heal on: healing is skipped). With
    `resume_from`, a heal checkpoint folder to resume, the steps of the run that wrote it, when it
    holds one. Unchanged when the steps are a number."""
    if config.heal_steps != "auto":
        return config
    resumed = checkpoint_steps(resume_from)
    if resumed is not None:
        return config.replace(heal_steps=resumed)
    if isinstance(batch, dict):
        batch = ((), batch)
    if not (isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[1], dict) and (batch[0] or batch[1])):
        return config.replace(heal_steps=AUTO_STEPS[0])
    steps, took, device = auto_steps(model, (tuple(batch[0]), batch[1]), config.heal_device)
    log.info("heal: %d steps (auto: a probe step took %.3fs on %s, so about %.0fs at most)", steps, took, device, steps * took)
    return config.replace(heal_steps=steps)


def heal_config(config: Config) -> Any:
    """The HealConfig a compress Config asks for."""
    scope = "model" if config.heal_scope == "auto" else config.heal_scope  # block by block heals in tngraph.blockwise
    return HealConfig(steps=config.heal_steps, lr=config.heal_lr, scope=scope, max_length=config.max_length, batch_size=config.batch_size,
                      seed=config.seed, device=config.heal_device)


def heal_model(module: torch.nn.Module, teacher: torch.nn.Module, texts: Sequence[str], tokenizer: Any, config: Any, *,
               show: bool = True, checkpoint: Any = None, resume: bool = False) -> tuple[Any, dict[str, torch.Tensor]]:
    """Heal a compressed `module` against `teacher` (in place) and record it in its recipe; returns
    the HealResult and the trained parameters' values before healing."""
    unhealed = {n: p.detach().clone() for n, p in trainable(module, config.train_norms).items()}
    outcome = heal(module, teacher, texts, tokenizer, config, checkpoint=checkpoint, resume=resume, show=show)
    record_heal(module, outcome)
    return outcome, unhealed


def record_heal(module: torch.nn.Module, outcome: Any) -> None:
    """Note in the module's recipe that it was healed and which non-factor parameters changed."""
    factors = factorized_parameters(module)
    recipe = module.tngraph_recipe  # type: ignore[attr-defined]
    before = recipe.get("heal", {})
    recipe["heal"] = {
        "steps": before.get("steps", 0) + outcome.best_step,
        "metric": outcome.metric,
        "held_out_start": before.get("held_out_start", outcome.start_loss),
        "held_out": outcome.best_loss,
        "params": sorted(set(before.get("params", [])) | {n for n in outcome.trained if n not in factors}),
    }
