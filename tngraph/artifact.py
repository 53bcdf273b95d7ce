"""Artifacts: factors as safetensors plus a JSON recipe; written atomically, verified when loaded."""
from __future__ import annotations

import copy
import json
import logging
import os
import pathlib
import re
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ArtifactError
from .models import ModelSource, load_model, source_folder, weights_hash
from .ownership import atomic_dir
from .recipe import RECIPE_VERSION, apply_plan, attach, entry_factors, file_sha256, plan_from_entry, plans_from_module
from .shards import LAYOUT, load_causal_lm

log = logging.getLogger(__name__)

RECIPE = "recipe.json"
FACTORS = "factors.safetensors"
HEALED = "healed/"  # key prefix of the non-factor parameters healing trained


def save(module: torch.nn.Module, path: str | os.PathLike, *, force: bool = False, extra: dict[str, Any] | None = None) -> pathlib.Path:
    """Write `module`'s recipe and factors to the folder `path` (plus `extra` JSON files, e.g. a report)."""
    plans = plans_from_module(module)
    recipe = dict(module.tngraph_recipe)  # type: ignore[attr-defined]
    tensors = {f"{p.name}.{k}": v.detach().to("cpu").contiguous() for p in plans for k, v in p.factors.items()}
    # parameters outside the factors that healing trained (biases, norms)
    params = dict(module.named_parameters())
    for name in recipe.get("heal", {}).get("params", []):
        tensors[f"{HEALED}{name}"] = params[name].detach().to("cpu").contiguous()
    with atomic_dir(path, force, keep=[source_folder(recipe.get("source"))]) as tmp:
        # a single metadata key: safetensors writes several in an arbitrary order, breaking byte-identity
        save_file(tensors, str(tmp / FACTORS), metadata={"format": "pt"})
        recipe["files"] = {FACTORS: {"sha256": file_sha256(tmp / FACTORS)}}
        (tmp / RECIPE).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name, data in (extra or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    log.info("saved %d factorized targets to %s", len(plans), path)
    return pathlib.Path(path)


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise ArtifactError(f"no artifact at {str(folder)!r}", "pass the --out folder of a `tngraph compress` run")
    recipe_path = folder / RECIPE
    if not recipe_path.is_file():
        raise ArtifactError(f"{str(folder)!r} has no {RECIPE}", "pass the --out folder of a `tngraph compress` run")
    try:
        recipe = json.loads(recipe_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{str(recipe_path)!r} is unreadable or corrupt: {exc}", "recompress the model to rebuild the artifact") from None
    required = ("recipe_version", "source", "source_hash", "targets", "files")
    if not isinstance(recipe, dict) or any(k not in recipe for k in required):
        raise ArtifactError(f"{str(recipe_path)!r} is not a tngraph recipe", "recompress the model to rebuild the artifact")
    if not isinstance(recipe["recipe_version"], int) or recipe["recipe_version"] > RECIPE_VERSION:
        raise ArtifactError(f"recipe version {recipe['recipe_version']!r} is newer than this tngraph understands", "upgrade tngraph")
    _check_paths(recipe, recipe_path)
    return recipe


SOURCE_KINDS = ("minilm", "hf", "hf-causal", "module")
_FACTOR_FILE = re.compile(r"factors(-\d{5})?\.safetensors")
_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


def _check_paths(recipe: dict[str, Any], where: pathlib.Path) -> None:
    """Refuse, before anything is read, a recipe whose paths could lead outside what tngraph wrote:
    files that are not bare factor-file names of the artifact folder, a source path that is not an
    absolute, normalised folder path, target names that are not module paths."""
    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"{str(where)!r} is not a recipe tngraph wrote: {what}", "recompress the model to rebuild the artifact")

    source = recipe["source"]
    if not isinstance(source, dict) or source.get("kind") not in SOURCE_KINDS:
        raise bad(f"unknown source {source!r}")
    path = source.get("path")
    if source["kind"] in ("minilm", "module"):
        if path is not None:
            raise bad(f"a {source['kind']} source has no path, it names {path!r}")
    elif not (isinstance(path, str) and "\0" not in path and os.path.isabs(path) and os.path.normpath(path) == path):
        raise bad(f"the source path {path!r} is not an absolute, normalised folder path")
    files = recipe["files"]
    if not isinstance(files, dict) or not all(isinstance(f, str) and _FACTOR_FILE.fullmatch(f) for f in files):
        raise bad(f"its files {sorted(map(str, files)) if isinstance(files, dict) else files!r} are not factor files of the artifact folder")
    targets = recipe["targets"]
    if not isinstance(targets, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) and _MODULE_PATH.fullmatch(t["name"])
                                                and t.get("file", FACTORS) in (files or {FACTORS: None}) for t in targets):
        raise bad("a target's name is not a module path, or its file is not one of the recipe's")


def load(path: str | os.PathLike, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """Rebuild the compressed model: the source model from its own definition, then the recipe applied.

    `model` is needed only when the artifact was made from a user-supplied module; it must hold the
    same weights as the module that was compressed. The recipe is applied to a copy of it: `model`
    itself stays as it was (it can go on serving as the dense reference).
    """
    folder = pathlib.Path(path)
    recipe = read_recipe(folder)
    if recipe.get("layout") == LAYOUT:
        return load_causal_lm(folder, recipe)
    factors_path = folder / FACTORS
    if not factors_path.is_file():
        raise ArtifactError(f"{str(folder)!r} has no {FACTORS}", "recompress the model to rebuild the artifact")
    expected = recipe["files"].get(FACTORS, {}).get("sha256")
    if expected != file_sha256(factors_path):
        raise ArtifactError(f"{str(factors_path)!r} does not match the hash in its recipe (truncated or modified)", "recompress the model")
    try:
        tensors = load_file(str(factors_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{str(factors_path)!r} is corrupt: {exc}", "recompress the model") from None
    if model is None:
        model, _ = load_model(ModelSource.from_json(recipe["source"]))
    else:
        model = copy.deepcopy(model).eval()
    if weights_hash(model) != recipe["source_hash"]:
        raise ArtifactError("this artifact was made from a different source model (weights hash differs)", "load it onto the model it was compressed from")
    plans = [plan_from_entry(entry, entry_factors(entry, tensors)) for entry in recipe["targets"]]
    module = apply_plan(model, plans)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name in recipe.get("heal", {}).get("params", []):
            tensor = tensors.get(f"{HEALED}{name}")
            if tensor is None or name not in params or tensor.shape != params[name].shape:
                raise ArtifactError(f"healed parameter {name!r} is missing or does not fit the model", "recompress the model")
            params[name].copy_(tensor)
    recipe = {k: v for k, v in recipe.items() if k != "files"}
    attach(module, recipe)
    return module
