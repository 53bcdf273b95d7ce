"""A Hugging Face causal LM read lazily from its safetensors shards, and the loader of block-by-block
artifacts: the model is built on the meta device and filled from the source shards and the factor
files, so the dense targets are never held; it is ready for transformers' generate()."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
from typing import Any, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import ArtifactError, DataError, ModelError
from .recipe import attach, entry_factors, file_sha256, module_for, plan_from_entry, swap_module

log = logging.getLogger(__name__)

LAYOUT = "causal-lm-blockwise"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
EMBEDDING_CHUNK = 4096  # embedding rows read at once


def causal_lm_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The config.json of a local Llama/Mistral/Qwen causal LM folder, or None for anything else."""
    path = pathlib.Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    archs = config.get("architectures") or []
    if config.get("model_type") in FAMILIES and (not archs or any(str(a).endswith("ForCausalLM") for a in archs)):
        return config
    return None


class Shards:
    """Lazy access to a model folder's safetensors weights (one file or an index of shards)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = pathlib.Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise ModelError(f"{str(index)!r} is unreadable: {exc}", "restore the model folder") from None
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(str(self.folder / "model.safetensors"), "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ModelError(f"{str(self.folder)!r} has no safetensors weights", "save the model with save_pretrained(safe_serialization=True)")
        self.weight_map: dict[str, str] = dict(weight_map)
        self._safe_open = safe_open

    def _path(self, key: str) -> pathlib.Path:
        name = self.weight_map.get(key)
        if name is None:
            raise ModelError(f"the model's weights have no tensor {key!r}", "check that the folder holds the complete model")
        path = self.folder / name
        if not path.is_file():
            raise ModelError(f"weight shard {str(path)!r} is missing", "restore the model folder")
        return path

    def get_many(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """The tensors, copied out of their shards, each shard opened and closed again: a mapping left
        open would keep every page read so far resident."""
        out: dict[str, torch.Tensor] = {}
        by_file: dict[pathlib.Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._path(key), []).append(key)
        for path, names in by_file.items():
            with self._safe_open(str(path), "pt") as f:
                for key in names:
                    out[key] = f.get_tensor(key)  # a copy: it outlives the file
        return out

    def get(self, key: str) -> torch.Tensor:
        return self.get_many([key])[key]

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.weight_map if k.startswith(prefix))

    def rows(self, key: str, ids: torch.Tensor) -> torch.Tensor:
        """table[ids] without holding the table: it is read in chunks of rows."""
        flat = ids.reshape(-1)
        path = str(self._path(key))
        with self._safe_open(path, "pt") as f:
            part = f.get_slice(key)
            vocab, width = part.get_shape()
            dtype = part[0:1].dtype
        if (flat < 0).any() or (flat >= vocab).any():
            raise DataError(f"token ids outside the vocabulary of {vocab}", "use the model's own tokenizer")
        out = torch.empty(flat.shape[0], width, dtype=dtype)
        for start in range(0, vocab, EMBEDDING_CHUNK):
            hit = (flat >= start) & (flat < start + EMBEDDING_CHUNK)
            if hit.any():  # the file opened per chunk: the pages read stay mapped only while it is open
                with self._safe_open(path, "pt") as f:
                    out[hit] = f.get_slice(key)[start : start + EMBEDDING_CHUNK][flat[hit] - start]
        return out.reshape(*ids.shape, width)

    def files_hash(self) -> str:
        """sha256 over the weight files' names and bytes (streamed): the source model's identity."""
        digest = hashlib.sha256()
        for name in sorted(set(self.weight_map.values())):
            digest.update(name.encode())
            digest.update(file_sha256(self.folder / name).encode())
        return digest.hexdigest()


def meta_model(folder: pathlib.Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read the model config in {str(folder)!r}: {str(exc).splitlines()[0][:200]}", "check config.json") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not len(layers):
        raise ModelError(f"{str(folder)!r} has no decoder blocks at model.layers", f"tngraph compresses {', '.join(FAMILIES)} causal LMs block by block")
    return model


def rotary_embedding(model: torch.nn.Module) -> torch.nn.Module:
    """The rotary embedding built again on the CPU (its buffers are not weights, so the meta model has none)."""
    rotary = model.model.rotary_emb
    return type(rotary)(config=model.config)


def load_causal_lm(folder: str | os.PathLike, recipe: dict[str, Any]) -> torch.nn.Module:
    """The compressed causal LM of a blockwise artifact, built without its dense targets."""
    art = pathlib.Path(folder)
    src = pathlib.Path(recipe["source"]["path"])
    if causal_lm_config(src) is None:
        raise ArtifactError(f"the artifact's source model {str(src)!r} is gone or not a causal LM", "restore the source model folder")
    for file, meta in recipe["files"].items():
        path = art / file
        if not path.is_file() or file_sha256(path) != meta.get("sha256"):
            raise ArtifactError(f"{str(path)!r} is missing or does not match the hash in its recipe (truncated or modified)", "recompress the model")
    shards = Shards(src)
    if shards.files_hash() != recipe["source_hash"]:
        raise ArtifactError("this artifact was made from a different source model (weights hash differs)", "load it onto the model it was compressed from")
    model = meta_model(src)
    tensors: dict[str, torch.Tensor] = {}
    for file in recipe["files"]:
        try:
            tensors.update(load_file(str(art / file)))
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(f"{str(art / file)!r} is corrupt: {exc}", "recompress the model") from None
    for entry in recipe["targets"]:  # each target's module built from its factors; its bias still on the meta device
        plan = plan_from_entry(entry, entry_factors(entry, tensors))
        try:
            owner = model.get_submodule(plan.name)
        except AttributeError:
            raise ArtifactError(f"the source model has no module {plan.name!r}", "load the artifact onto the model it was made from") from None
        swap_module(model, plan.name, module_for(plan, owner))
    del tensors
    wanted = {k for k, v in model.state_dict().items() if v.is_meta}  # what the source still has to fill
    tied = model.config.tie_word_embeddings
    from_source = [k for k in sorted(wanted) if not (k == "lm_head.weight" and tied and k not in shards.weight_map)]
    for key in from_source:
        if key not in shards.weight_map:
            raise ArtifactError(f"the source model has no weight {key!r}", "restore the source model folder")
    state = {k: v.float() for k, v in shards.get_many(from_source).items()}
    model.load_state_dict(state, assign=True, strict=False)
    model.model.rotary_emb = rotary_embedding(model)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(src), local_files_only=True)
    except Exception as exc:  # no generation_config.json: transformers' defaults from the model config stay
        log.debug("no generation config in %s: %s", src, exc)
    attach(model, {k: v for k, v in recipe.items() if k != "files"})
    return model.eval()
