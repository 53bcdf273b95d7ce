"""The recipe: plan -> recipe entry -> factorized module, and back. One home for each conversion.

A recipe is the JSON half of an artifact (tngraph/artifact.py writes it beside the factor files):
the source model and a hash of its weights, the options, the environment, and one entry per target
(name, format, rank, shapes of its factors). This module turns the passes' plans into entries and
modules, a module's current state back into plans, and an entry plus its tensors into a plan.
"""
from __future__ import annotations

import hashlib
import pathlib
from typing import Any, Iterable

import torch

from . import __version__
from .config import Config
from .errors import ArtifactError, ModelError
from .layers import CONV_LAYERS, LAYERS, QUANT_LAYERS, LayerLinear
from .meta import Conv
from .models import ModelSource, weights_hash
from .modules import LowRankEmbedding, LowRankLinear, NetworkLinear, PrunedLinear
from .plan import TargetPlan
from .tn.formats import FORMATS
from .tn.quant import LAYER_BITS

RECIPE_VERSION = 1
FACTORIZED = (LowRankEmbedding, LayerLinear, PrunedLinear)  # LowRankLinear and NetworkLinear are LayerLinears


def file_sha256(path: pathlib.Path) -> str:
    """sha256 of a file's bytes, streamed: the integrity record of every file an artifact holds."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def swap_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    """Put `new` in place of the submodule at the dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(out, in) of a linear layer: an nn.Linear, or a Conv1D (transformers' GPT-2 family: y = x @ W + b,
    W stored (in x out)); None for anything else."""
    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[1]), int(weight.shape[0])
    return None


def module_for(plan: TargetPlan, owner: torch.nn.Module) -> torch.nn.Module:
    """The factorized module that replaces `owner` (the original layer) according to `plan`."""
    if plan.kind == "embedding":
        if not isinstance(owner, torch.nn.Embedding) or tuple(owner.weight.shape) != (plan.out_features, plan.in_features):
            raise ModelError(f"target {plan.name!r} is not a {plan.out_features}x{plan.in_features} nn.Embedding",
                             "apply the recipe to the model it was made from")
        return LowRankEmbedding(plan.factors["a"].detach().clone(), plan.factors["b"].detach().clone(), owner.padding_idx)
    if plan.conv is not None:
        return _conv_module(plan, owner)
    shape = linear_shape(owner)
    if shape is None:
        raise ModelError(f"target {plan.name!r} is a {type(owner).__name__}, not an nn.Linear (or a Conv1D)",
                         "restrict targets to nn.Linear modules with Config(include=..., exclude=...)")
    if shape != (plan.out_features, plan.in_features):
        raise ModelError(f"target {plan.name!r} is {shape[0]}x{shape[1]}, the recipe says "
                         f"{plan.out_features}x{plan.in_features}", "apply the recipe to the model it was made from")
    bias = owner.bias.detach().clone() if owner.bias is not None else None
    if plan.format == "prune":
        return _pruned_module(plan, bias)
    if plan.format == "lowrank":
        dense, order = plan.factors.get("dense"), plan.factors.get("order")
        return LowRankLinear(plan.factors["a"].detach().clone(), plan.factors["b"].detach().clone(), bias,
                             dense.detach().clone() if dense is not None else None, order.clone() if order is not None else None)
    if plan.format in QUANT_LAYERS:
        return _quant_module(plan, bias)
    fmt = FORMATS.get(plan.format)
    if fmt is not None and fmt.layer is not None:
        try:
            return LayerLinear(LAYERS[fmt.layer], {k: t.detach().clone() for k, t in plan.factors.items()}, plan.in_features,
                               plan.out_features, bias)
        except ValueError as exc:  # factors the layer needs are missing
            raise ArtifactError(f"{plan.name!r} ({plan.format}): {exc}", "write the artifact again with tngraph.save") from exc
    if plan.network is not None:
        net = plan.tensor_network()
        net.cores = [c.detach().clone() for c in net.cores]
        return NetworkLinear(net, bias)
    raise ModelError(f"unknown format {plan.format!r} for {plan.name!r}", "upgrade tngraph")


def _pruned_module(plan: TargetPlan, bias: torch.Tensor | None) -> PrunedLinear:
    """A pruned MLP block's member: an up projection's kept rows (its bias entries with them) or the
    down projection's refitted columns."""
    side = "rows" if "rows" in plan.factors else "columns"
    index = plan.factors.get(side)
    if index is None or "weight" not in plan.factors:
        raise ArtifactError(f"{plan.name!r} (prune) lacks its weight or neuron indices", "write the artifact again with tngraph.save")
    index = index.to(torch.long)
    if bias is not None and side == "rows":
        bias = bias[index]
    try:
        return PrunedLinear(plan.factors["weight"].detach().clone(), bias, index.clone(), side)
    except ValueError as exc:
        raise ArtifactError(f"{plan.name!r} (prune): {exc}", "write the artifact again with tngraph.save") from exc


def _quant_module(plan: TargetPlan, bias: torch.Tensor | None) -> torch.nn.Module:
    """The quantized layer of a quant / qlowrank plan, its codes and scales as stored."""
    layer = QUANT_LAYERS[plan.format]
    if not isinstance(plan.quant, dict) or plan.quant.get("bits") not in LAYER_BITS:
        raise ArtifactError(f"{plan.name!r} ({plan.format}) records no bits of {list(LAYER_BITS)} ({plan.quant!r})",
                            "write the artifact again with tngraph.save")
    return _layer_module(plan, layer, bias, layer.plan_statics(plan), plan.format)


def conv_statics(module: torch.nn.Module) -> dict[str, Any] | None:
    """The low-rank convolution layer's statics of an nn.Conv1d / nn.Conv2d (groups 1, numeric
    padding, zero padding mode); None for anything else."""
    if not isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)) or module.groups != 1 or isinstance(module.padding, str) \
            or module.padding_mode != "zeros":
        return None
    return Conv(module.in_channels, tuple(module.kernel_size), tuple(module.stride), tuple(module.padding),
                tuple(module.dilation)).statics()


def _conv_module(plan: TargetPlan, owner: torch.nn.Module) -> torch.nn.Module:
    statics = conv_statics(owner)
    if statics != plan.conv:
        raise ModelError(f"target {plan.name!r} is not the convolution the recipe describes ({plan.conv}; the model's: "
                         f"{statics or type(owner).__name__})", "apply the recipe to the model it was made from")
    bias = owner.bias.detach().clone() if owner.bias is not None else None
    layer = CONV_LAYERS.get(plan.format)
    if layer is None:
        raise ArtifactError(f"{plan.name!r}: a convolution's format is one of {sorted(CONV_LAYERS)}, not {plan.format!r}",
                            "write the artifact again with tngraph.save")
    return _layer_module(plan, layer, bias, statics, f"{plan.format} convolution")


def _layer_module(plan: TargetPlan, layer, bias: torch.Tensor | None, statics: dict[str, Any], what: str) -> LayerLinear:
    """`layer`'s module on copies of the plan's factors (all of the layer's keys, or an ArtifactError)."""
    missing = [k for k in layer.factors if k not in plan.factors]
    if missing:
        raise ArtifactError(f"{plan.name!r} ({what}) has no factors {missing}", "write the artifact again with tngraph.save")
    return LayerLinear(layer, {k: plan.factors[k].detach().clone() for k in layer.factors}, plan.in_features, plan.out_features, bias,
                       statics)


def apply_plan(model: torch.nn.Module, plans: Iterable[TargetPlan]) -> torch.nn.Module:
    """Swap each planned layer of `model` for its factorized module (in place; returns model)."""
    for plan in plans:
        try:
            owner = model.get_submodule(plan.name)
        except AttributeError as exc:
            raise ModelError(f"the model has no module {plan.name!r}", "apply the recipe to the model it was made from") from exc
        swap_module(model, plan.name, module_for(plan, owner).to(device=owner.weight.device))
        tie_lookups(model, plan)
    return model


def tie_lookups(model: torch.nn.Module, plan: TargetPlan) -> None:
    """Each embedding table tied to the output head `plan` describes becomes a LowRankEmbedding on the
    head's own factor Parameters (A[indices] @ B): one copy of them, and the tie holds."""
    if not plan.tied:
        return
    head = model.get_submodule(plan.name)
    if not isinstance(head, LowRankLinear) or head.dense is not None:
        raise ArtifactError(f"{plan.name!r} is tied to {list(plan.tied)} but is no plain low-rank layer", "write the artifact again with tngraph.save")
    for name in plan.tied:
        try:
            owner = model.get_submodule(name)
        except AttributeError as exc:
            raise ModelError(f"the model has no module {name!r} (tied to {plan.name!r})", "apply the recipe to the model it was made from") from exc
        if isinstance(owner, LowRankEmbedding) and owner.a is head.a:
            continue  # tied already
        if not isinstance(owner, torch.nn.Embedding) or tuple(owner.weight.shape) != (plan.out_features, plan.in_features):
            raise ModelError(f"{name!r} is not a {plan.out_features}x{plan.in_features} nn.Embedding tied to {plan.name!r}",
                             "apply the recipe to the model it was made from")
        table = LowRankEmbedding(head.a.detach(), head.b.detach(), owner.padding_idx)
        table.a, table.b = head.a, head.b  # the head's Parameters themselves
        swap_module(model, name, table)


def make_recipe(model: torch.nn.Module, plans: Iterable[TargetPlan], config: Config, source: ModelSource) -> dict[str, Any]:
    """The recipe of `plans` made from `model` (read from `source`) with `config`."""
    return header(source.to_json(), weights_hash(model), config_record(config)) | {
        "targets": [p.recipe() for p in sorted(plans, key=lambda p: p.name)]}


def config_record(config: Config) -> dict[str, Any]:
    """The options as a recipe records them (where dumps go and progress bars are not recorded)."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in ("dump_dir", "progress")}
    cfg["include"], cfg["exclude"] = list(config.include), list(config.exclude)
    return cfg


def header(source: dict[str, Any], source_hash: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What every recipe starts with, whichever driver made it."""
    return {
        "recipe_version": RECIPE_VERSION,
        "tngraph_version": __version__,
        **extra,
        "source": source,
        "source_hash": source_hash,
        "config": config,
        # factors are byte-identical across runs with the same inputs, seed, torch and thread count
        "environment": {"torch": torch.__version__.split("+")[0], "threads": torch.get_num_threads()},
    }


def attach(module: torch.nn.Module, recipe: dict[str, Any]) -> None:
    module.tngraph_recipe = recipe  # type: ignore[attr-defined]


def factor_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The factors a factorized module holds now, by recipe key."""
    if isinstance(module, (LowRankLinear, LowRankEmbedding)):
        factors = {"a": module.a.detach(), "b": module.b.detach()}
        if getattr(module, "dense", None) is not None:
            factors.update(dense=module.dense.detach(), order=module.order)
        return factors
    if isinstance(module, PrunedLinear):
        return {"weight": module.weight.detach(), module.side: module.index}
    if isinstance(module, LayerLinear):  # NetworkLinear too: core0, core1, ...
        return {k: t.detach() for k, t in module.factor_dict().items()}
    raise TypeError(type(module).__name__)


def plans_from_module(module: torch.nn.Module) -> list[TargetPlan]:
    """The plan as the module holds it now (factors may have been trained since compression)."""
    recipe = getattr(module, "tngraph_recipe", None)
    if recipe is None:
        raise ModelError("this module was not produced by tngraph.compress or tngraph.load", "compress it first")
    plans = []
    for entry in recipe["targets"]:
        sub = module.get_submodule(entry["name"])
        if not isinstance(sub, FACTORIZED):
            raise ModelError(f"module {entry['name']!r} is no longer a tngraph factorized layer", "save the module returned by compress()")
        plans.append(plan_from_entry(entry, factor_tensors(sub)))
    return plans


def plan_from_entry(entry: dict[str, Any], factors: dict[str, torch.Tensor]) -> TargetPlan:
    """The plan a recipe entry describes, with its factor tensors."""
    return TargetPlan(
        name=entry["name"],
        format=entry["format"],
        rank=entry["rank"],
        in_features=entry["in_features"],
        out_features=entry["out_features"],
        has_bias=entry["bias"],
        factors=factors,
        network=entry.get("network"),
        kind=entry.get("kind", "linear"),
        conv=entry.get("conv"),
        tied=tuple(entry.get("tied", ())),
        quant=entry.get("quant"),
    )


def entry_factors(entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An entry's factors out of an artifact's tensors, each checked against the shape it records."""
    factors = {}
    for key, shape in entry["factors"].items():
        tensor = tensors.get(f"{entry['name']}.{key}")
        if tensor is None or list(tensor.shape) != list(shape):
            raise ArtifactError(f"factor {entry['name']}.{key} is missing or has the wrong shape", "recompress the model")
        factors[key] = tensor
    return factors


def factorized_parameters(module: torch.nn.Module) -> set[str]:
    """Names of the parameters of `module` that are factors (not the biases the layers carry over)."""
    return {f"{name}.{p}" for name, sub in module.named_modules() if isinstance(sub, FACTORIZED)
            for p, _ in sub.named_parameters() if p != "bias"}
