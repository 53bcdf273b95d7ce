"""Llama-shaped causal LMs with random weights, written shard by shard (tests, benchmarks)."""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import torch


def write_synthetic_llama(out: str | os.PathLike, *, hidden: int = 1024, intermediate: int = 2816, layers: int = 16, heads: int = 16,
                          kv_heads: int | None = None, vocab: int = 32000, shard_bytes: int = 500_000_000, seed: int = 0,
                          dtype: str = "float32", spectrum_decay: float = 0.0, max_positions: int = 2048) -> dict[str, Any]:
    """Write config.json, model-XXXXX-of-YYYYY.safetensors and the index into `out`; returns a summary."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = pathlib.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=max_positions,
                         tie_word_embeddings=False, dtype=dtype)
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    torch_dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    current: dict[str, torch.Tensor] = {}
    size, count = 0, 0
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape)
        elif spectrum_decay > 0 and len(shape) == 2 and "embed" not in name and "lm_head" not in name:
            tensor = _decaying(shape, spectrum_decay, g)
        else:
            tensor = torch.randn(shape, generator=g) * 0.02
        tensor = tensor.to(torch_dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > shard_bytes:  # memory holds one shard at a time
            save_file(current, str(folder / f".shard-{count:05d}.safetensors"), metadata={"format": "pt"})
            current, size, count = {}, 0, count + 1
        current[name] = tensor
        size += nbytes
    save_file(current, str(folder / f".shard-{count:05d}.safetensors"), metadata={"format": "pt"})
    count += 1
    weight_map, total = {}, 0
    for i in range(count):
        final = folder / f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        os.replace(folder / f".shard-{i:05d}.safetensors", final)
        with safe_open(str(final), "pt") as f:
            for key in f.keys():
                weight_map[key] = final.name
        total += final.stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"out": str(folder), "parameters": sum(math.prod(s) for s in shapes.values()), "bytes": total, "shards": count, "layers": layers}


def _decaying(shape: tuple[int, ...], decay: float, g: torch.Generator) -> torch.Tensor:
    out, inp = shape
    k = min(out, inp)
    u, _ = torch.linalg.qr(torch.randn(out, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(inp, k, generator=g))
    s = (1.0 + torch.arange(k, dtype=torch.float32)) ** -decay
    w = (u * s) @ v.T
    return w * (0.02 * (out * inp) ** 0.5 / w.norm())
