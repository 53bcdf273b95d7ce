"""What every workflow shares: the thread count, the healing checkpoint's place, the model and its
tokenizer, and the data policy (which texts calibrate, heal and evaluate an encoder or a causal LM)."""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..config import Config
from ..errors import ConfigError, TngraphError

log = logging.getLogger("tngraph.workflow")


def set_threads(threads: int) -> None:
    """torch's CPU threads for a workflow (the --threads flag): checked once, here."""
    import torch

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}", "pass --threads N (threads=N) with N >= 1")
    torch.set_num_threads(threads)


def uses_threads(fn: Callable) -> Callable:
    """Run a workflow with torch's CPU threads set from its `threads` argument, and give the caller's
    thread count back when it returns: a library call must not leave the process oversubscribed."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        before = torch.get_num_threads()
        set_threads(bound.arguments["threads"])
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


def checkpoint_dir(out: str | os.PathLike) -> str:
    """Healing checkpoints live beside the artifact (the artifact folder is replaced in one rename)."""
    return os.path.abspath(out).rstrip(os.sep) + ".heal-checkpoint"


@contextlib.contextmanager
def saved_on_failure(module: Any, out: str | os.PathLike, force: bool, name: str, report: dict[str, Any]) -> Iterator[None]:
    """Scoring runs inside. When it fails or is interrupted, the compressed (and healed) `module` is
    saved to `out` first, with `report` (under the file `name`) carrying the error, and the error goes
    on: the minutes of compressing and healing are not lost to a failure in the scores."""
    try:
        yield
    except BaseException as exc:
        from ..artifact import save

        report["error"] = f"scoring stopped by {type(exc).__name__}: {exc}"
        try:
            save(module, out, force=force, extra={name: report})
        except Exception as failed:  # the first error is the one to report
            log.error("the model could not be saved to %s either: %s", out, failed)
        else:
            log.error("scoring failed (%s: %s); the model is saved to %s without its scores", type(exc).__name__, exc, out)
        raise


def fit_length(config: Config, model: Any) -> Config:
    """Tokenise no longer than the model's position table (a small model may hold fewer than max_length)."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and 1 < positions < config.max_length:
        log.info("tokenising to %d tokens, the model's max_position_embeddings", positions)
        return config.replace(max_length=positions)
    return config


def load_with_tokenizer(source: Any, spec: str) -> tuple[Any, Any]:
    """The model of `source` and its tokenizer; a folder without one is an error."""
    from ..models import load_model

    model, tokenizer = load_model(source)
    if tokenizer is None:
        raise TngraphError(f"{spec!r} has no tokenizer: the command line calibrates, heals and scores on text",
                           "add the tokenizer files to the model folder, or calibrate on inputs: --calibration FILE.safetensors/.npz "
                           "(named input tensors), or a folder of images or .wav files (read by the model folder's processor); "
                           "data-free from Python: tngraph.compress(model, example_inputs=..., whiten=False)")
    return model, tokenizer


def whole_graph_config(source: Any, config: Config | None = None, options: dict[str, Any] | None = None) -> Config:
    """The Config of a whole-graph run: `config` (default Config()) with `options`; without an include
    pattern, the model's default targets (models.default_include)."""
    from ..models import default_include

    config = config or Config()
    config = config.replace(**options) if options else config
    return config if config.include else config.replace(include=default_include(source, config.targets))


@dataclass
class TextSets:
    """The texts of one run: calibration samples, healing samples (None: the calibration texts or
    Config.heal_data), and the evaluation set (sentences of an encoder, held-out text of a causal LM)."""

    calibration: list[str]
    heal: list[str] | None
    evaluation: Any
    outside: Any = None  # the same kind of set from another domain (tngraph.data.OUTSIDE_PACKAGES' docstrings)


def builtin_texts(causal: bool, config: Config, *, shuffle: bool = True, outside: bool = True, calibrate: bool = True,
                  heal: bool = True) -> TextSets:
    """The data policy of the built-in text, in one place.

    A causal LM: passages of the built-in training documents (shuffled with the seed when `shuffle`),
    the first calibration_samples of them calibrate, they heal spread evenly among as many passages
    of other packages' docstrings (tngraph.data.mixed_pool with healing_passages; a seeded sample of
    both when the steps use fewer), the held-out documents (joined) are scored. An encoder: the seeded disjoint sentence sets (tngraph.data.sentence_sets),
    healing on built-in sentences outside the evaluation set spread among three times as many
    sentences of other packages' docstrings, as many as the steps use (tngraph.data.healing_pool).
    No healing texts (heal None for an encoder, the training passages unmixed for a causal LM, the
    packages not read for them) when Config.heal_steps is 0 or with `heal` False (they would go
    unused). Out of domain, scored beside them: as many sentences (an encoder), or as many
    characters of documents (a causal LM), of the third-party docstrings set aside for reports
    (tngraph.data.outside_sentences, outside_text); None with `outside` False (nothing will be
    scored: the packages are not read). Config.calibration_mix of the calibration texts come from
    other packages' docstrings, spread evenly: sentences for an encoder (sentence_sets), passages for
    a causal LM (healing_passages); with `calibrate` False (they go unused) nothing is mixed, and
    nothing is read for them."""
    from ..data import (LM_HEALING_SHARE, healing_passages, healing_pool, lm_documents, lm_heldout_texts, mixed_pool, outside_sentences,
                        passages, sentence_sets, spread)
    from ..api import heal_config

    share = config.calibration_mix if calibrate else 0.0
    if causal:
        pool = passages(lm_documents().train)
        if shuffle:
            random.Random(config.seed).shuffle(pool)
        other = healing_passages(round(config.calibration_samples * share), config.seed) if share else []
        heldout, outside_text = lm_heldout_texts(config.seed, outside=outside)
        healing = pool  # none of the packages' passages read when nothing heals
        if heal and config.heal_steps:
            used = heal_config(config).texts_used
            healing = mixed_pool(pool, healing_passages, LM_HEALING_SHARE, seed=config.seed, most=used)
        return TextSets(spread(pool[: config.calibration_samples - len(other)], other), healing, heldout, outside_text)
    sets = sentence_sets(config.calibration_samples, config.eval_samples, config.seed, mix=share)
    healing = None  # other packages are read only to heal, and no more of them than the steps can use
    if heal and config.heal_steps:
        healing = healing_pool(sets.evaluation, seed=config.seed, most=heal_config(config).texts_used)
    return TextSets(sets.calibration, healing, sets.evaluation,
                    outside_sentences(config.eval_samples, config.seed) if outside else None)


def compress_texts(causal: bool, config: Config, calibration: str | None = None, *, outside: bool = True) -> TextSets:
    """The texts of `tngraph compress`: the built-in ones, or the lines of the `calibration` file
    (which then heal too, unless Config.heal_data names another file)."""
    from ..data import read_lines

    refuse_mix(config, calibration)
    texts = builtin_texts(causal, config, outside=outside, calibrate=not calibration, heal=not (calibration or config.heal_data))
    if calibration:
        return TextSets(read_lines(calibration), None, texts.evaluation, texts.outside)
    return texts


def timed_steps(config: Config, model: Any, tokenizer: Any, texts: list[str], resume_from: Any = None) -> Config:
    """`config` with heal_steps "auto" made a number (tngraph.api.resolve_heal_steps), timed on the
    dense `model` with a batch of the first `texts` (the calibration's: healing's own are not built
    yet, their number depends on the steps; tngraph.api.text_probe), or the steps of the
    checkpoint `resume_from` when it holds one; unchanged when the steps are a number already."""
    if config.heal_steps != "auto":
        return config
    from ..api import resolve_heal_steps, text_probe

    return resolve_heal_steps(config, model, text_probe(texts, config, tokenizer, model) if texts else None, resume_from)


def refuse_mix(config: Config, calibration: str | None) -> None:
    """Config.calibration_mix mixes the built-in calibration texts: a share other than the default
    (or 0) is refused by name with a calibration file, whose lines alone calibrate."""
    if config.calibration_mix in (0.0, Config.calibration_mix) or not calibration:
        return
    raise ConfigError(f"--calibration-mix {config.calibration_mix:g} mixes tngraph's built-in calibration texts, but the lines of "
                      "--calibration FILE calibrate", "leave --calibration-mix out (or 0); to calibrate on several sources, put them in one --calibration file")


def calibration_only(config: Config, calibration: str | None = None, count: int | None = None) -> list[str]:
    """Calibration texts alone (block by block, a dump): the `calibration` file's lines, else `count`
    (default calibration_samples) built-in sentences."""
    from ..data import read_lines, sentence_sets

    refuse_mix(config, calibration)
    if calibration:
        return read_lines(calibration)
    return sentence_sets(count or config.calibration_samples, 1, config.seed, mix=config.calibration_mix).calibration
