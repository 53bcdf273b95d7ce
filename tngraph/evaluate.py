"""Embedding agreement (EVALUATION.md) and CPU latency of dense vs compressed models, in one run."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .errors import DataError
from .models import accepted_only, forward_names, token_lengths, tokenize
from .progress import progress


@dataclass(frozen=True)
class Agreement:
    mean_cos: float
    min_cos: float
    top10_overlap: float
    sentences: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over real tokens, L2-normalised (sentence-transformers pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)


def sentence_objective(outputs: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    """What a sentence encoder's users compare: the pooled, normalised embedding of each text (its
    squared error is 2 (1 - cos)). Used as the end output when measuring sensitivity."""
    hidden = outputs.get("last_hidden_state") if isinstance(outputs, dict) else getattr(outputs, "last_hidden_state", None)
    mask = kwargs.get("attention_mask")
    if hidden is None or mask is None or hidden.dim() != 3:
        return outputs  # not a sentence encoder: every float output counts
    return pooled(hidden, mask)


@torch.no_grad()
def sentence_embeddings(
    model: torch.nn.Module, tokenizer: Any, texts: list[str], *, batch_size: int = 64, max_length: int = 128, show: bool = False
) -> torch.Tensor:
    """Mean of the last hidden state over real tokens, L2-normalised (sentence-transformers pooling),
    one row per text in the order given. Texts are batched by token length, longest first, so that a
    batch pads little (2,000 sentences of mixed length embed in about a third of the time)."""
    accepted = forward_names(model)
    if not texts:
        raise DataError("no texts to embed", "pass at least one text")
    lengths = token_lengths(tokenizer, texts, max_length)
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    out = []
    for i in progress(range(0, len(texts), batch_size), desc="embed", enabled=show, unit="batch"):
        enc = tokenize(tokenizer, [texts[j] for j in order[i : i + batch_size]], max_length)
        out.append(pooled(model(**accepted_only(enc, accepted)).last_hidden_state, enc["attention_mask"]).float())
    rows = torch.cat(out)
    return rows[torch.argsort(torch.tensor(order))]


def agreement(reference: torch.Tensor, candidate: torch.Tensor, k: int = 10) -> Agreement:
    """Mean/min cosine per sentence, and the mean overlap of each sentence's top-k neighbours."""
    cos = (reference * candidate).sum(-1)
    k = min(k, reference.shape[0] - 1)
    overlap = 1.0
    if k > 0:
        overlap = _neighbour_overlap(reference, candidate, k)
    return Agreement(float(cos.mean()), float(cos.min()), overlap, int(reference.shape[0]))


def _neighbour_overlap(reference: torch.Tensor, candidate: torch.Tensor, k: int) -> float:
    def neighbours(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.topk(k, dim=1).indices

    ref_nb, cand_nb = neighbours(reference), neighbours(candidate)
    hits = (ref_nb.unsqueeze(2) == cand_nb.unsqueeze(1)).any(2).sum(1).float()
    return float((hits / k).mean())


@torch.no_grad()
def latency(
    models: dict[str, torch.nn.Module], inputs: dict[str, torch.Tensor], *, repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per forward of each model; runs interleave so that noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(warmup):
        for model in models.values():
            model(**inputs)
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(**inputs)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def latency_inputs(vocab_size: int, batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    low = 1000 if vocab_size > 2000 else min(3, vocab_size - 1)  # past the special tokens of a large vocabulary
    ids = torch.randint(low, vocab_size, (batch, length), generator=g)
    return {
        "input_ids": ids,
        "token_type_ids": torch.zeros_like(ids),
        "attention_mask": torch.ones_like(ids),
    }


def count_params(module: torch.nn.Module, prefix_filter: tuple[str, ...] | None = None) -> tuple[int, int]:
    """(parameters, bytes) of the module's state, optionally only under the given module paths: bytes
    of every tensor stored (quantized codes and zero points included, index buffers too), parameters
    of the float tensors plus the weights a quantized layer's codes hold (out x in each)."""
    def kept(name: str) -> bool:
        return prefix_filter is None or any(name.startswith(p + ".") for p in prefix_filter)

    from .layers import QUANT_LAYERS, LayerLinear

    quantized = {name: sub.in_features * sub.out_features for name, sub in module.named_modules()
                 if isinstance(sub, LayerLinear) and sub.layer_name in QUANT_LAYERS}
    params = nbytes = 0
    for name, tensor in module.state_dict().items():
        if not kept(name):
            continue
        nbytes += tensor.numel() * tensor.element_size()
        owner, _, leaf = name.rpartition(".")
        if owner in quantized and leaf in ("codes", "scales"):
            params += quantized[owner] if leaf == "codes" else 0
        elif tensor.is_floating_point():
            params += tensor.numel()
    return params, nbytes
