"""`tngraph heal` as one Python call: distil an artifact against its source model, score it before
and after (agreement for an encoder, perplexity for a causal LM), save it with heal.json."""
from __future__ import annotations

import contextlib
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Callable

from ..config import Config
from ..errors import ConfigError, TngraphError
from ..report import SETS, heal_scope_words
from .common import builtin_texts, checkpoint_dir, saved_on_failure, timed_steps, uses_threads

# the compress options an artifact's recipe carries over into its healing
CARRIED = ("heal_lr", "heal_scope", "max_length", "batch_size", "seed", "calibration_samples", "eval_samples")


@dataclass
class HealRun:
    """What `heal` did: the artifact folder written, the heal.json report, heal.HealResult, whether
    the model is a causal LM, and the scores before and after by evaluation set ("" the built-in
    held-out set, "_outside" the out-of-domain one; None with evaluate=False)."""

    out: pathlib.Path
    report: dict[str, Any]
    outcome: Any
    causal: bool
    before: Any = None
    after: Any = None
    artifact: str = ""

    def summary(self) -> str:
        """What `tngraph heal` prints: the healing loss, then each evaluation set's scores before and after."""
        h = self.outcome
        lines = [f"healed {self.artifact}: held-out {h.metric} {h.start_loss:.4f} -> {h.best_loss:.4f} "
                 f"(best at step {h.best_step} of {h.steps}{heal_scope_words(h.to_json())}, {h.seconds:.0f}s)"]
        for suffix, title in SETS:
            before, after = (self.before or {}).get(suffix), (self.after or {}).get(suffix)
            if before is None:
                continue
            if self.causal:
                dense = self.report[f"perplexity{suffix}"]["dense"]["perplexity"]
                lines.append(f"perplexity on {after.tokens:,} tokens of {title}: {before.perplexity:.3f} -> {after.perplexity:.3f} "
                             f"(dense {dense:.3f})")
            else:
                lines.append(f"embedding agreement on {before.sentences} sentences of {title}: mean cos {before.mean_cos:.4f} -> "
                             f"{after.mean_cos:.4f}, min cos {before.min_cos:.4f} -> {after.min_cos:.4f}, top-10 "
                             f"{before.top10_overlap:.4f} -> {after.top10_overlap:.4f}")
        lines.append(f"artifact: {os.path.abspath(self.out)}")
        return "\n".join(lines)


def heal_source(artifact: str | os.PathLike, out: str | os.PathLike, force: bool, data: str | None) -> tuple[Any, Any, Any, bool]:
    """(artifact module, its source model, tokenizer, in place): refused before any model is built
    when the output folder is not ours or the artifact was compressed block by block."""
    from ..artifact import load, read_recipe
    from ..models import ModelSource, load_model, source_folder
    from ..ownership import check_output_dir

    in_place = os.path.realpath(out) == os.path.realpath(artifact)
    recipe = read_recipe(artifact)
    if not in_place:  # a new folder: never the artifact being healed, its source, or a stranger's folder
        check_output_dir(out, force, keep=[artifact, source_folder(recipe["source"]), data])
    if recipe.get("layout") == "causal-lm-blockwise":
        raise ConfigError("an artifact compressed block by block cannot be healed afterwards (that needs the whole model in memory)",
                          "compress again with --heal-steps N (each block healed as it is compressed), or with --no-blockwise "
                          "(the whole-graph pipeline heals) when the model fits in memory")
    module = load(artifact)
    source = ModelSource.from_json(module.tngraph_recipe["source"])
    if source.kind == "module":
        raise TngraphError("this artifact was made from a user module, which the command line cannot rebuild",
                           "heal it in Python: tngraph.heal.heal(tngraph.load(DIR, model), model, texts, tokenizer)")
    teacher, tokenizer = load_model(source)
    if tokenizer is None:
        raise TngraphError("the artifact's source model has no tokenizer", "add the tokenizer files to the model folder")
    return module, teacher, tokenizer, in_place


def healing_config(recipe: dict[str, Any], **changes: Any) -> Config:
    """The Config of healing an artifact: its recipe's CARRIED options with `changes` (None: kept); an
    artifact compressed with heal_steps 0 still heals the default number of steps here."""
    saved = recipe["config"]
    config = Config(**{k: v for k, v in saved.items() if k in CARRIED}).replace(**{k: v for k, v in changes.items() if v is not None})
    if config.heal_steps == 0:
        raise ConfigError("--steps 0 heals nothing", "pass --steps N with N > 0")
    return config


def heal_scorer(causal: bool, teacher: Any, tokenizer: Any, config: Config, evaluate: bool) -> tuple[str, dict[str, Callable], Any]:
    """(report key, {set suffix: score}, built-in healing texts): perplexity on the held-out
    documents for a causal LM (its training passages heal), else the agreement with the source on
    the evaluation sentences; "" the built-in held-out set, "_outside" the out-of-domain one (no
    scores with evaluate False)."""
    from .measure import scorer

    texts = builtin_texts(causal, config, shuffle=False, outside=evaluate, calibrate=False)
    held = {"": texts.evaluation, "_outside": texts.outside} if evaluate else {}
    scores = {suffix: scorer(teacher, tokenizer, t, config)[1] for suffix, t in held.items() if t}
    return ("perplexity" if causal else "agreement"), scores, texts.heal


@uses_threads
def heal(artifact: str | os.PathLike, out: str | os.PathLike | None = None, *, steps: int | None = None, lr: float | None = None,
         scope: str | None = None, data: str | None = None, eval_samples: int | None = None, evaluate: bool = True, seed: int | None = None, threads: int = 2,
         force: bool = False, resume: bool = False, progress: bool = True, device: str | None = None) -> HealRun:
    """`tngraph heal ARTIFACT [--out OUT] ...` as one call: heal the artifact (in place without `out`).

    steps / lr / scope / seed / eval_samples: healing's (default: the artifact's recipe; steps "auto",
    tngraph.api.resolve_heal_steps, timed on the source model); data:
    a text file to heal on (default: the built-in text outside the evaluation set); device: where the
    steps run (tngraph.heal.HealConfig.device; default auto, not the recipe's: a machine's)."""
    import torch

    from ..api import heal_config, heal_model
    from ..artifact import save
    from ..heal import resolve_device
    from ..data import read_lines
    from ..lm import is_causal_lm, no_kv_cache

    out = out or artifact
    module, teacher, tokenizer, in_place = heal_source(artifact, out, force, data)
    config = healing_config(module.tngraph_recipe, heal_steps=steps, heal_lr=lr, heal_scope=scope, seed=seed, eval_samples=eval_samples).replace(
        progress=progress, heal_device=device or "auto")
    resolve_device(config.heal_device, next(iter(module.parameters()), torch.empty(0)).device)  # before the scoring, not after it
    causal = is_causal_lm(teacher)
    texts = read_lines(data, what="healing data") if data else None
    if config.heal_steps == "auto":  # timed before the built-in healing texts, whose number follows from it
        probe = texts or builtin_texts(causal, config.replace(heal_steps=0), shuffle=False, outside=False, calibrate=False).calibration
        config = timed_steps(config, teacher, tokenizer, probe, checkpoint_dir(out) if resume else None)
    key, scores, builtin = heal_scorer(causal, teacher, tokenizer, config, evaluate)
    texts = texts or builtin
    with no_kv_cache(module, teacher) if causal else contextlib.nullcontext():
        before = {suffix: score(module) for suffix, score in scores.items()}
        outcome, _ = heal_model(module, teacher, texts, tokenizer, heal_config(config), show=progress,
                                checkpoint=checkpoint_dir(out), resume=resume)
        report: dict[str, Any] = {"heal": outcome.to_json()}
        with saved_on_failure(module, out, force or in_place, "heal.json", report):
            after = {suffix: score(module) for suffix, score in scores.items()}
            for suffix, score in scores.items():
                report[key + suffix] = {"before": before[suffix].to_json(), "after": after[suffix].to_json()}
                if causal:
                    report[key + suffix]["dense"] = score(teacher).to_json()
    save(module, out, force=force or in_place, extra={"heal.json": report})
    return HealRun(pathlib.Path(out), report, outcome, causal, before or None, after or None, str(artifact))
