"""Causal LMs: what is one, loading one (dense folder or compressed artifact), and perplexity."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import pathlib
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch

from .artifact import RECIPE, read_recipe
from .artifact import load as load_artifact
from .errors import DataError, ModelError
from .models import is_causal_lm_config
from .progress import progress
from .shards import LAYOUT

log = logging.getLogger(__name__)

@contextlib.contextmanager
def no_kv_cache(*models: torch.nn.Module) -> Iterator[None]:
    """Hugging Face models (and their submodules) with `config.use_cache` off for the duration (graph capture, healing and
    scoring want no KV cache; generate() gets it back)."""
    # every submodule's config: an encoder-decoder's stacks hold copies of their own (T5, BART)
    configs = list({id(c): c for c in (getattr(sub, "config", None) for m in models for sub in m.modules())
                    if c is not None and hasattr(c, "use_cache")}.values())
    saved = [c.use_cache for c in configs]
    for c in configs:
        c.use_cache = False
    try:
        yield
    finally:
        for c, value in zip(configs, saved):
            c.use_cache = value


def is_causal_lm(model: torch.nn.Module) -> bool:
    return callable(getattr(model, "generate", None)) and callable(getattr(model, "get_output_embeddings", None)) \
        and model.get_output_embeddings() is not None


def load(spec: str | pathlib.Path) -> tuple[torch.nn.Module, Any, dict[str, Any] | None]:
    """(model in eval mode, tokenizer, recipe or None) of a causal-LM folder or a tngraph artifact made
    from one. Anything else is refused with what it is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if str(spec) == "minilm":
        raise ModelError("'minilm' is the bundled sentence encoder, not a causal LM",
                         "pass a causal-LM folder, e.g. one written by tools/train_tiny_lm.py")
    path = pathlib.Path(spec).expanduser()
    if not path.is_dir():
        raise ModelError(f"{str(spec)!r} is not a folder", "pass a causal-LM folder (save_pretrained) or a tngraph artifact folder")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    recipe = None
    if (path / RECIPE).is_file():
        model = load_artifact(path)
        recipe = model.tngraph_recipe
        source = recipe["source"].get("path")
        if not is_causal_lm(model):
            raise ModelError(f"the artifact {str(path)!r} was made from a {type(model).__name__}, not a causal LM",
                             "perplexity and generation need an artifact compressed from a causal LM")
        tokenizer_dir = source
    else:
        if not (path / "config.json").is_file():
            raise ModelError(f"{str(path)!r} is neither a Hugging Face model folder nor a tngraph artifact (no config.json, no recipe.json)",
                             "pass a folder written by save_pretrained() or by tngraph compress")
        if not is_causal_lm_config(path):
            arch = json.loads((path / "config.json").read_text()).get("architectures")
            raise ModelError(f"{str(path)!r} is not a causal LM (architectures {arch})",
                             "perplexity and generation need a *ForCausalLM model folder")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise ModelError(f"cannot load a causal LM from {str(path)!r}: {str(exc).splitlines()[0][:200]}",
                             "check that the folder holds a complete Hugging Face model") from exc
        tokenizer_dir = path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"no tokenizer in {str(tokenizer_dir)!r}", "add the tokenizer files to the model folder") from exc
    return model.eval(), tokenizer, recipe


def artifact_recipe(spec: str | pathlib.Path) -> dict[str, Any] | None:
    """The recipe of a tngraph artifact folder, None for anything else (a model folder, a name)."""
    path = pathlib.Path(spec).expanduser()
    return read_recipe(path) if (path / RECIPE).is_file() else None


def load_source_then_artifact(spec: str | pathlib.Path) -> Iterator[tuple[torch.nn.Module, Any]]:
    """For a tngraph artifact of a causal LM: yields (dense source, tokenizer), then, once the caller
    is done with the source, (the compressed model, tokenizer) — made from the same model object,
    compressed in place, so one model is in memory and the source is read once (a blockwise
    artifact is built on its own after the source is let go). Scoring both on one text is what
    `tngraph eval` of an artifact does."""
    import gc

    recipe = artifact_recipe(spec)
    if recipe is None:
        raise ModelError(f"{str(spec)!r} is not a tngraph artifact (no recipe.json)", "pass an artifact folder written by tngraph compress")
    source = recipe["source"].get("path")
    if not source or not is_causal_lm_config(source):
        raise ModelError(f"the artifact {str(spec)!r} was made from {source or recipe['source'].get('kind')!r}, not a causal LM",
                         "perplexity and generation need an artifact compressed from a causal LM")
    model, tokenizer, _ = load(source)
    yield model, tokenizer
    if recipe.get("layout") == LAYOUT:
        del model
        gc.collect()
        model, tokenizer, _ = load(spec)
    else:
        model = load_artifact(spec, model=model).eval()
    yield model, tokenizer


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    windows: int
    window: int
    stride: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def default_window(model: torch.nn.Module, limit: int = 256) -> int:
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(limit, int(n)) if n else limit


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer: Any, text: str, *, window: int | None = None, stride: int | None = None,
               batch_size: int = 8, show: bool = False) -> Perplexity:
    """Sliding-window perplexity of `text`: windows of `window` tokens every `stride` tokens; each
    token after the first is scored exactly once, with at least window - stride tokens of context
    before it (the first window's tokens with what precedes them)."""
    window = window or default_window(model)
    stride = stride or max(1, window // 2)
    if window < 2 or not 1 <= stride < window:
        raise DataError(f"window {window} / stride {stride} are invalid (every window needs a token of context before the ones it scores)",
                        "pass a window >= 2 and a stride in [1, window - 1]")
    ids = tokenizer(text, add_special_tokens=True, return_tensors="pt")["input_ids"][0]
    if ids.numel() < window:
        raise DataError(f"the text holds {ids.numel()} tokens, fewer than one window of {window}",
                        "pass a longer text, or a smaller --window")
    spans, prev_end = [], 0  # (begin, end, first scored position within the window)
    for begin in range(0, ids.numel() - 1, stride):
        end = min(begin + window, ids.numel())
        begin = end - window  # the last window is full-length too, scoring only what is new
        spans.append((begin, end, max(prev_end - begin, 1)))
        prev_end = end
        if end == ids.numel():
            break
    total, count = 0.0, 0
    for i in progress(range(0, len(spans), batch_size), desc="perplexity", enabled=show, unit="batch"):
        chunk = spans[i : i + batch_size]
        batch = torch.stack([ids[b:e] for b, e, _ in chunk])
        logp = torch.log_softmax(model(input_ids=batch).logits[:, :-1].float(), -1)
        nll = -logp.gather(-1, batch[:, 1:, None])[..., 0]  # nll[j, t]: token t + 1 given tokens <= t
        for row, (_, _, first) in enumerate(chunk):
            scored = nll[row, first - 1 :]
            total += float(scored.sum())
            count += scored.numel()
    mean = total / count
    if not math.isfinite(mean):
        raise DataError("the model's perplexity is not finite (NaN or Inf logits)", "check the model's weights")
    return Perplexity(math.exp(mean), mean, count, len(spans), window, stride)


# --- logits a chunk of tokens at a time -------------------------------------------------------------

LOGIT_CHUNK = 1 << 24  # logits held at once (64 MB in fp32): tokens per chunk = this // vocabulary


class Headless:
    """A causal LM called without its full logits: `hidden(batch)` gives its final hidden states
    (and the per-block ones), `head` maps a chunk of them to logits. Made by `headless`, which
    checks on a sample that head(final hidden state) is what the model's logits are (a softcap or
    a logit scale outside the head would not be)."""

    def __init__(self, model: torch.nn.Module, keep: bool):
        self.model, self.head, self.keep = model, model.get_output_embeddings(), keep

    def hidden(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple | None]:
        extra = {"logits_to_keep": 1} if self.keep else {}  # the model computes one position's logits, not all
        out = self.model(**batch, output_hidden_states=True, **extra)
        return out.hidden_states[-1], out.hidden_states


def headless(model: torch.nn.Module, sample: dict[str, torch.Tensor]) -> Headless | None:
    """A Headless for `model` when its logits are its output embeddings applied to its last hidden
    state (checked on the first row of `sample`); None otherwise."""
    import inspect

    head = getattr(model, "get_output_embeddings", lambda: None)()
    if not isinstance(head, torch.nn.Module):
        return None
    try:
        keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        keep = False
    row = {k: v[:1] for k, v in sample.items()}
    with torch.no_grad():
        out = model(**row, output_hidden_states=True)
        states = getattr(out, "hidden_states", None)
        if not states or getattr(out, "logits", None) is None:
            return None
        if not torch.allclose(head(states[-1]).float(), out.logits.float(), rtol=1e-4, atol=1e-4):
            log.info("%s: its logits are not its head applied to its last hidden state; healing holds them whole",
                     type(model).__name__)
            return None
    return Headless(model, keep)


def _chunk_kl(rows_s: torch.Tensor, rows_t: torch.Tensor, weight: torch.Tensor, head_s: torch.nn.Module,
              head_t: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        logp_t = torch.log_softmax(head_t(rows_t).float(), -1)
    logp_s = torch.log_softmax(head_s(rows_s).float(), -1)
    return ((logp_t.exp() * (logp_t - logp_s)).sum(-1) * weight).sum()


def chunked_token_kl(hidden_s: torch.Tensor, hidden_t: torch.Tensor, head_s: torch.nn.Module, head_t: torch.nn.Module,
                     mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of KL(teacher || student) of the next-token distributions, from the
    two models' final hidden states: the logits of LOGIT_CHUNK values at a time, recomputed in the
    backward pass (torch.utils.checkpoint) instead of kept, so no tokens x vocabulary tensor is ever
    held. The same value as the KL of the full logits."""
    from torch.utils.checkpoint import checkpoint

    rows_s, rows_t = hidden_s.reshape(-1, hidden_s.shape[-1]), hidden_t.reshape(-1, hidden_t.shape[-1])
    weight = mask.reshape(-1).to(torch.float32)
    vocab = getattr(head_s, "out_features", None) or int(head_s(rows_s[:1]).shape[-1])
    step = max(1, LOGIT_CHUNK // vocab)
    total = hidden_s.new_zeros((), dtype=torch.float32)
    for i in range(0, rows_s.shape[0], step):
        part = (rows_s[i : i + step], rows_t[i : i + step], weight[i : i + step], head_s, head_t)
        total = total + (checkpoint(_chunk_kl, *part, use_reentrant=False) if torch.is_grad_enabled() and rows_s.requires_grad
                         else _chunk_kl(*part))
    return total / weight.sum().clamp_min(1)
