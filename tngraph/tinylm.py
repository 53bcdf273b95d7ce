"""A small Llama-shaped causal LM, trained here on text every Python install carries.

No pretrained causal LM can be downloaded in this project, and random weights are near full rank
(compressing them says nothing about real models), so the causal-LM side is measured on a model
trained for the purpose: a byte-level BPE tokenizer (the `tokenizers` library) and a Llama decoder
trained on the built-in documents (`tngraph.data.lm_documents`, held-out documents never seen).

Everything is a function of the preset and the seed: the same tokenizer, the same batches, the
same weights on the same machine with the same thread count. `minutes` only caps the run; a run
cut short says so in its metadata.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

TRAIN_VERSION = 1  # bump when the recipe below changes what a preset trains (cache key)
META = "tngraph_tinylm.json"
SPECIAL = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2


@dataclass(frozen=True)
class TinyLMSpec:
    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    context: int
    batch: int
    steps: int
    lr: float
    weight_decay: float = 0.1
    warmup: float = 0.05
    seed: int = 0


PRESETS = {
    # about 12 minutes on 2 CPU cores (measured numbers: README "Causal LMs end to end")
    "default": TinyLMSpec(vocab=4096, hidden=256, layers=4, heads=4, intermediate=768, context=128, batch=16, steps=1400, lr=2e-3),
    # tests: well under a minute
    "test": TinyLMSpec(vocab=512, hidden=64, layers=2, heads=2, intermediate=192, context=64, batch=16, steps=200, lr=5e-3),
}


def spec_for(preset: str, **changes: Any) -> TinyLMSpec:
    if preset not in PRESETS:
        raise ConfigError(f"unknown tiny-LM preset {preset!r}", f"use one of {', '.join(PRESETS)}")
    spec = dataclasses.replace(PRESETS[preset], **{k: v for k, v in changes.items() if v is not None})
    if spec.steps < 1 or spec.hidden % spec.heads:
        raise ConfigError(f"invalid tiny-LM settings: steps {spec.steps}, hidden {spec.hidden}, heads {spec.heads}",
                          "steps must be >= 1 and hidden a multiple of heads")
    return spec


def train_tokenizer(texts: list[str], vocab: int) -> Any:
    """Byte-level BPE over `texts`, as a transformers fast tokenizer (<s> prepended to every text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A </s> $B", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=1_000_000)


def token_stream(tokenizer: Any, documents: list[str]) -> torch.Tensor:
    """Every document's tokens followed by </s>, concatenated."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for ids_doc in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids.extend(ids_doc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def build_model(spec: TinyLMSpec) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.heads, max_position_embeddings=spec.context,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.02,
    )
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config)


def _lr(step: int, spec: TinyLMSpec) -> float:
    warm = max(1, int(spec.warmup * spec.steps))
    if step < warm:
        return spec.lr * (step + 1) / warm
    t = (step - warm) / max(1, spec.steps - warm)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(spec: TinyLMSpec, out: str | os.PathLike, *, minutes: float | None = None, force: bool = False,
          show: bool = True) -> dict[str, Any]:
    """Train the tokenizer and the model of `spec`, evaluate held-out perplexity, save a Hugging
    Face folder (config, safetensors, tokenizer, tngraph_tinylm.json) atomically at `out`."""
    from transformers.utils import logging as hf_logging

    from .ownership import atomic_dir, check_output_dir
    from .data import lm_documents
    from .lm import perplexity
    from .progress import progress

    check_output_dir(out, force)
    if minutes is not None and minutes <= 0:
        raise ConfigError(f"--minutes must be positive, got {minutes}", "pass e.g. --minutes 15")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    text = lm_documents()
    tokenizer = train_tokenizer(text.train, spec.vocab)
    stream = token_stream(tokenizer, text.train)
    if stream.numel() <= spec.context + 1:
        raise ConfigError("the built-in training text is shorter than one context window", "use a smaller context")
    model = build_model(spec)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=spec.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(spec.seed)
    offsets = torch.arange(spec.context + 1)
    model.train()
    losses: list[float] = []
    done, cut = 0, False
    limit = None if minutes is None else minutes * 60.0
    bar = progress(range(spec.steps), desc="train tiny LM", enabled=show, unit="step")
    for step in bar:
        if limit is not None and time.perf_counter() - started > limit:
            cut = True
            log.warning("stopped by the %.1f-minute limit after %d of %d steps: the model is not the preset's deterministic result", minutes, step, spec.steps)
            break
        starts = torch.randint(0, stream.numel() - spec.context - 1, (spec.batch,), generator=gen)
        window = stream[starts[:, None] + offsets]
        for group in opt.param_groups:
            group["lr"] = _lr(step, spec)
        logits = model(input_ids=window[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        if not torch.isfinite(loss):
            raise ConfigError(f"training diverged at step {step} (loss {float(loss)})", "lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        done = step + 1
        if hasattr(bar, "set_postfix") and step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    train_seconds = time.perf_counter() - started
    heldout = "\n\n".join(text.heldout)
    ppl = perplexity(model, tokenizer, heldout, window=spec.context, show=False)
    meta = {
        "preset_spec": dataclasses.asdict(spec), "train_version": TRAIN_VERSION, "steps_done": done, "cut_by_minutes": cut,
        "train_tokens": int(stream.numel()), "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "heldout_perplexity": ppl.perplexity, "heldout_tokens": ppl.tokens, "train_seconds": train_seconds,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    with atomic_dir(out, force, kind="tiny-lm") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("trained tiny LM: %d steps, loss %.3f, held-out perplexity %.2f, %.0f s", done, meta["final_loss"], ppl.perplexity, train_seconds)
    return meta


def cache_root() -> pathlib.Path:
    root = os.environ.get("TNGRAPH_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tngraph")
    return pathlib.Path(root)


def cached(preset: str = "default", *, show: bool = False) -> pathlib.Path:
    """The folder of a preset's trained model in the cache (TNGRAPH_CACHE, else ~/.cache/tngraph),
    trained on first use. Keyed by the preset, the training recipe and the torch version."""
    spec = spec_for(preset)
    key = hashlib.sha256(json.dumps([dataclasses.asdict(spec), TRAIN_VERSION, torch.__version__, torch.get_num_threads()]).encode()).hexdigest()[:12]
    path = cache_root() / f"tiny-lm-{preset}-{key}"
    if not (path / META).is_file():
        log.info("training the %r tiny LM into %s", preset, path)
        train(spec, path, force=path.exists(), show=show)
    return path
