"""Greedy speculative decoding with a compressed model as the draft, for any batch size.

transformers' own assisted generation (`generate(assistant_model=draft)`) serves one sequence at a
time. This decoder runs a batch: the draft proposes `draft_tokens` tokens for every row (one cheap
forward each), the target scores them all in one forward, and each row keeps the longest prefix the
target agrees with, plus the target's own next token. Every emitted token is the target's greedy
choice, so the output is the target's greedy output. Rows accept different numbers of tokens; the
KV caches stay rectangular because a rejected token is not removed but masked out (attention mask
0, like left padding, and skipped by the position ids), so neither cache is ever cropped.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .errors import ConfigError


@dataclass
class SpeculativeStats:
    proposed: int = 0  # draft tokens proposed (per row, summed over rows still running)
    accepted: int = 0  # of those, the ones the target agreed with and kept
    target_calls: int = 0
    draft_calls: int = 0
    new_tokens: int = 0  # tokens emitted per row
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate}


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5 names the KV cache argument `cache`; earlier releases `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _Runner:
    """One model with its KV cache: feed tokens, read logits, crop the cache back."""

    def __init__(self, model: torch.nn.Module):
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache()
        self.key = _cache_kwarg(model)
        self.calls = 0

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits of `tokens` (B, n), which follow the cached ones; `mask` covers cache + tokens."""
        n = tokens.shape[1]
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -n:]  # as generate() numbers them
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True, **{self.key: self.cache})
        self.calls += 1
        return out.logits


@torch.no_grad()
def generate(target: torch.nn.Module, draft: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 64, draft_tokens: int = 4, eos_token_id: int | None = None, pad_token_id: int | None = None
             ) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy decoding of `target` sped up by `draft`: returns (prompt + new tokens, stats). The new
    tokens equal `target.generate(input_ids, do_sample=False, max_new_tokens=...)`'s; rows that end
    (eos_token_id) are padded with pad_token_id after it, as generate() does. Prompts are left-padded
    when their lengths differ (attention_mask 0 on the padding)."""
    if max_new_tokens < 1 or draft_tokens < 1:
        raise ConfigError(f"max_new_tokens ({max_new_tokens}) and draft_tokens ({draft_tokens}) must be at least 1", "pass positive values")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ConfigError(f"input_ids must be (batch, length) with length >= 1, got {tuple(input_ids.shape)}", "pass tokenized prompts")
    vocab_t, vocab_d = target.get_output_embeddings().out_features, draft.get_output_embeddings().out_features
    if vocab_t != vocab_d:
        raise ConfigError(f"the draft's vocabulary ({vocab_d}) differs from the target's ({vocab_t})", "use a draft with the target's tokenizer")
    start = time.perf_counter()
    batch, prompt = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
    t, d = _Runner(target), _Runner(draft)
    stats = SpeculativeStats()
    # invariant: the target's cache holds every column of seq but the last; mask marks the real tokens
    seq = torch.cat([input_ids, t(input_ids, mask)[:, -1].argmax(-1, keepdim=True)], 1)
    dev = input_ids.device
    one = torch.ones(batch, 1, dtype=mask.dtype, device=dev)
    mask = torch.cat([mask, one], 1)
    count = torch.ones(batch, dtype=torch.long, device=dev)  # new tokens per row
    ended = torch.zeros(batch, dtype=torch.bool, device=dev)
    if eos_token_id is not None:
        ended |= seq[:, -1] == eos_token_id
    while True:
        running = ~ended & (count < max_new_tokens)
        if not bool(running.any()):
            break
        k = min(draft_tokens, max_new_tokens - int(count[running].min()) - 1)
        proposals = []
        feed = seq[:, d.length :]
        for _ in range(k):  # the draft's greedy continuation, one token per forward
            width = d.length + feed.shape[1]
            full = torch.cat([mask, one.expand(batch, max(0, width - mask.shape[1]))], 1)[:, :width]
            proposals.append(d(feed, full)[:, -1].argmax(-1, keepdim=True))
            feed = proposals[-1]
        drafted = torch.cat(proposals, 1) if proposals else seq[:, :0]
        check = torch.cat([seq[:, -1:], drafted], 1)
        preds = t(check, torch.cat([mask, one.expand(batch, k)], 1)).argmax(-1)  # preds[:, i]: the target's token after check[:, :i+1]
        accepted = (drafted == preds[:, :k]).long().cumprod(1).sum(1)  # per row
        stats.proposed += k * int(running.sum())
        stats.accepted += int(accepted[running].sum())
        correction = preds.gather(1, accepted[:, None])
        keep = (torch.arange(k, device=dev)[None, :] < accepted[:, None]).to(mask.dtype)  # rejected drafts: masked out, left in place
        seq = torch.cat([seq, drafted, correction], 1)
        mask = torch.cat([mask, keep, one], 1)
        count += accepted + 1
        if eos_token_id is not None:
            emitted = torch.cat([drafted.masked_fill(keep == 0, -1), correction], 1)
            ended |= (emitted == eos_token_id).any(1)
    # each row's real new tokens, in order, the first max_new_tokens of them
    fill = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    rows = [seq[r, prompt:][mask[r, prompt:] == 1][:max_new_tokens] for r in range(batch)]
    new = torch.full((batch, max(len(r) for r in rows)), fill, dtype=seq.dtype, device=dev)  # rows that ended early are shorter
    for r, row in enumerate(rows):
        new[r, : len(row)] = row
    if eos_token_id is not None:  # after a row's first eos: padding, and stop where the last row ended
        is_eos = (new == eos_token_id).long()
        seen = is_eos.cumsum(1)
        new = new.masked_fill(seen - is_eos > 0, eos_token_id if pad_token_id is None else pad_token_id)
        if bool((seen[:, -1] > 0).all()):
            new = new[:, : int((seen == 0).sum(1).max()) + 1]
    out = torch.cat([input_ids, new], 1)
    stats.target_calls, stats.draft_calls = t.calls, d.calls
    stats.new_tokens = new.shape[1]
    stats.seconds = time.perf_counter() - start
    return out, stats
