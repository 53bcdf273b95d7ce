"""tngraph.compress: capture -> pass pipeline -> plan -> the user's module with its targets swapped."""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from . import __version__, meta
from .capture import capture, normalize_inputs
from .config import Config
from .errors import ConfigError, DataError, ModelError
from .evaluate import sentence_objective
from .lm import no_kv_cache
from .models import ModelSource, tokenize, weights_hash
from .modules import LowRankEmbedding, LowRankLinear, NetworkLinear
from .passes import PassContext
from .pipeline import run_passes
from .plan import TargetPlan

log = logging.getLogger(__name__)

RECIPE_VERSION = 1


@dataclass
class CompressResult:
    """What one compression produced: the module, the rewritten graph, the pass context and the recipe."""

    module: torch.nn.Module
    graph: fx.GraphModule
    context: PassContext
    recipe: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    heal: Any = None  # tngraph.heal.HealResult when healing ran
    unhealed: dict[str, torch.Tensor] | None = None  # the healed parameters' values before healing


def calibration_batches(
    calibration: Sequence[Any] | None, config: Config, tokenizer: Any = None
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Texts (tokenized in batches of config.batch_size) or a list of example inputs, as (args, kwargs)."""
    if calibration is None:
        return []
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Sequence):
        raise DataError(f"calibration must be a list of samples, got {type(calibration).__name__}", "pass a list of texts or of example inputs")
    samples = list(calibration)
    if not samples:
        raise DataError("calibration data is empty", "pass at least one sample, or None for data-free decomposition")
    if all(isinstance(s, str) for s in samples):
        if tokenizer is None:
            raise DataError("calibration texts need a tokenizer", "pass tokenizer= or tokenized example inputs")
        samples = _by_token_length(samples[: config.calibration_samples], tokenizer, config.max_length)
        return [
            ((), tokenize(tokenizer, samples[i : i + config.batch_size], config.max_length))
            for i in range(0, len(samples), config.batch_size)
        ]
    if any(isinstance(s, str) for s in samples):
        raise DataError("calibration mixes texts and tensors", "pass only texts or only example inputs")
    batches = [normalize_inputs(s) for s in samples]
    for i, (args, kwargs) in enumerate(batches):
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
                raise DataError(f"calibration sample {i} holds NaN or Inf values", "pass finite calibration inputs")
    return batches


def _by_token_length(texts: list[str], tokenizer: Any, max_length: int) -> list[str]:
    """Batch texts of similar length together: padded positions would distort the statistics."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    return [texts[i] for i in sorted(range(len(texts)), key=lambda i: (lengths[i], i))]


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

    `calibration` is a list of texts (with `tokenizer`) or of example inputs; without it the
    decomposition is data-free. Options may be given as `config=Config(...)` or as keywords.
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

    heal_texts: texts to heal on (default: Config.heal_data's file, else the calibration texts);
    heal_checkpoint / resume: a folder for healing checkpoints, and whether to continue from one.
    """
    config = (config or Config()).replace(**options) if options else (config or Config())
    batches = calibration_batches(calibration, config, tokenizer)
    texts = calibration is not None and len(calibration) > 0 and all(isinstance(s, str) for s in calibration)
    # healing data is checked before the long work
    healing = _heal_texts(config, heal_texts, calibration if texts else None) if config.heal_steps > 0 else None
    if healing is not None and tokenizer is None:
        raise DataError("healing texts need a tokenizer", "pass tokenizer=, or heal_steps=0")
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
    start = time.perf_counter()
    gm = capture(model, example_inputs)
    timings = {"capture": time.perf_counter() - start}
    ctx = PassContext(config=config, calibration=batches, objective=sentence_objective if texts else None)
    ctx.analysis["module_targets_only"] = True  # the result is the user's module with its targets swapped
    gm = run_passes(gm, ctx)
    timings.update(ctx.timings)
    if not meta.targets(gm):
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        shown = ", ".join(linears[:3]) + (", ..." if len(linears) > 3 else "")
        raise ConfigError(f"no layer of the model is a target: include {list(config.include)} / exclude {list(config.exclude)} "
                          f"left none of its {len(linears)} linear layers" + (f" ({shown})" if linears else ""),
                          "match module paths like those with --include/--exclude (regular expressions, re.search)")
    compressed = apply_plan(copy.deepcopy(model), ctx.plan.values())
    recipe = make_recipe(model, ctx.plan.values(), config, source)
    attach(compressed, recipe)
    result = CompressResult(compressed, gm, ctx, recipe, timings)
    if config.heal_steps > 0 and healing is None:
        log.warning("healing skipped: it needs texts and a tokenizer (pass heal_data=FILE or heal_texts=[...], "
                    "or heal_steps=0 to silence this)")
    elif healing is not None:
        start = time.perf_counter()
        result.heal, result.unhealed = heal_model(compressed, model, healing, tokenizer, heal_config(config), show=config.progress,
                                                  checkpoint=heal_checkpoint, resume=resume)
        timings["heal"] = time.perf_counter() - start
    return result


def _heal_texts(config: Config, given: Sequence[str] | None, calibration: Sequence[str] | None) -> Sequence[str] | None:
    if config.heal_data is not None:
        from .data import read_lines

        return read_lines(config.heal_data, what="healing data")
    return given if given is not None else calibration


def heal_config(config: Config) -> Any:
    """The HealConfig a compress Config asks for."""
    from .heal import HealConfig

    return HealConfig(steps=config.heal_steps, lr=config.heal_lr, max_length=config.max_length, batch_size=config.batch_size, seed=config.seed)


def heal_model(module: torch.nn.Module, teacher: torch.nn.Module, texts: Sequence[str], tokenizer: Any, config: Any, *,
               show: bool = True, checkpoint: Any = None, resume: bool = False) -> tuple[Any, dict[str, torch.Tensor]]:
    """Heal a compressed `module` against `teacher` (in place) and record it in its recipe; returns
    the HealResult and the trained parameters' values before healing."""
    from .heal import heal, trainable

    unhealed = {n: p.detach().clone() for n, p in trainable(module, config.train_norms).items()}
    outcome = heal(module, teacher, texts, tokenizer, config, checkpoint=checkpoint, resume=resume, show=show)
    record_heal(module, outcome)
    return outcome, unhealed


def record_heal(module: torch.nn.Module, outcome: Any) -> None:
    """Note in the module's recipe that it was healed and which non-factor parameters changed."""
    factors = {f"{name}.{p}" for name, sub in module.named_modules() if isinstance(sub, (LowRankLinear, LowRankEmbedding, NetworkLinear))
               for p, _ in sub.named_parameters() if p != "bias"}
    recipe = module.tngraph_recipe  # type: ignore[attr-defined]
    before = recipe.get("heal", {})
    recipe["heal"] = {
        "steps": before.get("steps", 0) + outcome.best_step,
        "metric": outcome.metric,
        "held_out_start": before.get("held_out_start", outcome.start_loss),
        "held_out": outcome.best_loss,
        "params": sorted(set(before.get("params", [])) | {n for n in outcome.trained if n not in factors}),
    }


def apply_plan(model: torch.nn.Module, plans: Any) -> torch.nn.Module:
    """Swap each planned nn.Linear of `model` for its factorized module (in place; returns model)."""
    for plan in plans:
        try:
            owner = model.get_submodule(plan.name)
        except AttributeError as exc:
            raise ModelError(f"the model has no module {plan.name!r}", "apply the recipe to the model it was made from") from exc
        if plan.kind == "embedding":
            if not isinstance(owner, torch.nn.Embedding) or tuple(owner.weight.shape) != (plan.out_features, plan.in_features):
                raise ModelError(f"target {plan.name!r} is not a {plan.out_features}x{plan.in_features} nn.Embedding", "apply the recipe to the model it was made from")
            new = LowRankEmbedding(plan.factors["a"].detach().clone(), plan.factors["b"].detach().clone(), owner.padding_idx)
            _swap(model, plan.name, new.to(device=owner.weight.device))
            continue
        if not isinstance(owner, torch.nn.Linear):
            raise ModelError(
                f"target {plan.name!r} is a {type(owner).__name__}, not an nn.Linear",
                "restrict targets to nn.Linear modules with Config(include=..., exclude=...)",
            )
        if (owner.out_features, owner.in_features) != (plan.out_features, plan.in_features):
            raise ModelError(
                f"target {plan.name!r} is {owner.out_features}x{owner.in_features}, the recipe says {plan.out_features}x{plan.in_features}",
                "apply the recipe to the model it was made from",
            )
        bias = owner.bias.detach().clone() if owner.bias is not None else None
        if plan.format == "lowrank":
            dense, order = plan.factors.get("dense"), plan.factors.get("order")
            new = LowRankLinear(plan.factors["a"].detach().clone(), plan.factors["b"].detach().clone(), bias,
                                dense.detach().clone() if dense is not None else None, order.clone() if order is not None else None)
        elif plan.network is not None:
            net = plan.tensor_network()
            net.cores = [c.detach().clone() for c in net.cores]
            new = NetworkLinear(net, bias)
        else:
            raise ModelError(f"unknown format {plan.format!r} for {plan.name!r}", "upgrade tngraph")
        _swap(model, plan.name, new.to(device=owner.weight.device))
    return model


def _swap(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def make_recipe(model: torch.nn.Module, plans: Any, config: Config, source: ModelSource) -> dict[str, Any]:
    cfg = {k: v for k, v in config.to_dict().items() if k not in ("dump_dir", "progress")}
    cfg["include"], cfg["exclude"] = list(config.include), list(config.exclude)
    return {
        "recipe_version": RECIPE_VERSION,
        "tngraph_version": __version__,
        "source": source.to_json(),
        "source_hash": weights_hash(model),
        "config": cfg,
        # factors are byte-identical across runs with the same inputs, seed, torch and thread count
        "environment": {"torch": torch.__version__.split("+")[0], "threads": torch.get_num_threads()},
        "targets": [p.recipe() for p in sorted(plans, key=lambda p: p.name)],
    }


def attach(module: torch.nn.Module, recipe: dict[str, Any]) -> None:
    module.tngraph_recipe = recipe  # type: ignore[attr-defined]


def plans_from_module(module: torch.nn.Module) -> list[TargetPlan]:
    """The plan as the module holds it now (factors may have been trained since compression)."""
    recipe = getattr(module, "tngraph_recipe", None)
    if recipe is None:
        raise ModelError("this module was not produced by tngraph.compress or tngraph.load", "compress it first")
    plans = []
    for entry in recipe["targets"]:
        sub = module.get_submodule(entry["name"])
        if isinstance(sub, (LowRankLinear, LowRankEmbedding)):
            factors = {"a": sub.a.detach(), "b": sub.b.detach()}
            if getattr(sub, "dense", None) is not None:
                factors.update(dense=sub.dense.detach(), order=sub.order)
        elif isinstance(sub, NetworkLinear):
            factors = {f"core{k}": c.detach() for k, c in enumerate(sub.cores)}
        else:
            raise ModelError(f"module {entry['name']!r} is no longer a tngraph factorized layer", "save the module returned by compress()")
        plans.append(
            TargetPlan(
                name=entry["name"],
                format=entry["format"],
                rank=entry["rank"],
                in_features=entry["in_features"],
                out_features=entry["out_features"],
                has_bias=entry["bias"],
                factors=factors,
                network=entry.get("network"),
                kind=entry.get("kind", "linear"),
            )
        )
    return plans
