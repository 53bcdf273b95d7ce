"""`tngraph eval` as one Python call: sliding-window perplexity of a causal LM (a folder or an
artifact), and of an artifact's dense source on the same windows."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .common import uses_threads


@dataclass
class PerplexityRun:
    """The result of `perplexity`: the report (model, text, perplexity, tokens, windows, and for an
    artifact its source's score and the ratio under "source"), and whether the model is an artifact."""

    report: dict[str, Any]  # the text's scores; with the built-in text, the out-of-domain documents' under "outside"
    artifact: bool

    def summary(self) -> str:
        """What `tngraph eval` prints (without --json): the text's perplexity, and the out-of-domain
        documents' beside it when the built-in text was scored."""
        lines = []
        for r in (self.report, self.report.get("outside")):
            if not r:
                continue
            lines.append(f"{'compressed artifact' if self.artifact else 'model'} {r['model']}: perplexity {r['perplexity']:.3f} on "
                         f"{r['tokens']:,} tokens of {r['text']} ({r['windows']} windows of {r['window']}, stride {r['stride']})")
            if "source" in r:
                lines.append(f"  dense source {r['source']['model']}: perplexity {r['source']['perplexity']:.3f} "
                             f"(compressed / dense {r['source']['ratio']:.3f})")
        return "\n".join(lines)


@uses_threads
def perplexity(model: str | os.PathLike, text: str | os.PathLike | None = None, *, window: int | None = None,
               stride: int | None = None, batch_size: int = 8, source: bool = True, threads: int = 2,
               progress: bool = True) -> PerplexityRun:
    """`tngraph eval --model MODEL [--text FILE] ...` as one call.

    text: a UTF-8 file (default: the built-in held-out documents, never used for calibration or
    healing, and as many characters of out-of-domain documents, tngraph.data.outside_text); window / stride: tokens per window and between starts (default: the model's context,
    at most 256, and half a window); source: for an artifact, score its dense source first."""
    from .. import lm
    from ..data import lm_heldout_texts, read_text

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if text:
        bodies = {"": (read_text(text), str(text))}
    else:
        heldout, other = lm_heldout_texts()
        bodies = {"": (heldout, "the built-in held-out documents"), "outside": (other, "out-of-domain documents (third-party package docstrings)")}
    kwargs: dict[str, Any] = dict(window=window, stride=stride, batch_size=batch_size, show=progress)

    def score(m: Any, tokenizer: Any) -> dict[str, Any]:
        with lm.no_kv_cache(m):
            return {key: lm.perplexity(m, tokenizer, body, **kwargs) for key, (body, _) in bodies.items() if body}

    recipe = lm.artifact_recipe(model)
    if recipe is not None and source:
        # the dense source first, then the same model compressed in place: one model in memory, read once
        models = lm.load_source_then_artifact(model)
        dense = score(*next(models))
        kwargs["window"], kwargs["stride"] = dense[""].window, dense[""].stride  # the same windows
        result = score(*next(models))
    else:
        loaded, tokenizer, recipe = lm.load(model)
        result, dense = score(loaded, tokenizer), None
    report: dict[str, Any] = {}
    for key, scored in result.items():
        entry = {"model": str(model), "text": bodies[key][1], **scored.to_json()}
        if dense is not None:
            entry["source"] = {"model": recipe["source"]["path"], **dense[key].to_json(), "ratio": scored.perplexity / dense[key].perplexity}
        if key:
            report[key] = entry
        else:
            report.update(entry)
    return PerplexityRun(report, recipe is not None)
