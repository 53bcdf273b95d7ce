"""`tngraph compress` as one Python call: the whole-graph pipeline with its report, or block by block
for a Llama/Mistral/Qwen causal-LM folder (the decision and the options it refuses live here)."""
from __future__ import annotations

import logging
import os
import pathlib
import time
from dataclasses import dataclass
from typing import Any

from .. import distributed
from ..config import Config
from ..errors import ConfigError
from ..samples import TensorSamples, read_calibration
from .common import (checkpoint_dir, calibration_only, compress_texts, fit_length, load_with_tokenizer, saved_on_failure, timed_steps, uses_threads,
                     whole_graph_config)
from .measure import add_scores, size_report

log = logging.getLogger("tngraph.workflow")

BLOCKWISE_BYTES = 2 << 30  # weights above this go block by block unless told otherwise

@dataclass
class WorkflowResult:
    """What `compress` did: the artifact folder, its report (report.json of a whole-graph run; the
    block-by-block summary otherwise), which driver ran ("graph" or "blockwise"), the library's result
    (api.CompressResult or blockwise.BlockwiseResult), the Config it ran with, and the torch.distributed
    rank and world size (block by block under torchrun; only rank 0 writes)."""

    out: pathlib.Path
    report: dict[str, Any]
    layout: str
    result: Any
    config: Config
    rank: int = 0
    world: int = 1

    def summary(self) -> str:
        """What `tngraph compress` prints: the report's table, or the block-by-block summary."""
        if self.layout == "graph":
            from ..report import format_table

            return format_table(self.report)
        r, healed = self.report, self.report["healed"]
        return (f"compressed {r['blocks']} decoder blocks of {r['source']} block by block: {r['targets']} targets, "
                f"parameters {r['params_before']:,} -> {r['params_after']:,} ({r['kept']:.3f} kept), "
                f"{r['calibration_tokens']:,} calibration tokens, {r['seconds']:.1f} s" + (f" on {r['world']} processes" if r["world"] > 1 else "")
                + (f", {r['heal_steps']} healing steps per block (mean held-out relative error of the blocks' outputs "
                   f"{sum(b for b, _ in healed) / len(healed):.4g} -> {sum(a for _, a in healed) / len(healed):.4g})"
                   if healed else " (no healing: --heal-steps N heals each block)") + "; `tngraph eval --model DIR` scores it\n"
                f"artifact: {r['out']}  (tngraph.load(DIR) gives the model for generate())")


def use_blockwise(spec: str, source: Any, blockwise: bool | None = None) -> bool:
    """The driver decision: block by block for a Llama/Mistral/Qwen folder when `blockwise` says so,
    or (None) when its weights exceed 2 GiB or it has no tokenizer; `blockwise=True` elsewhere is an error."""
    from ..blockwise import causal_lm_config

    if source.kind != "hf" or causal_lm_config(source.path) is None:
        if blockwise:
            raise ConfigError(f"--blockwise compresses Llama/Mistral/Qwen causal LM folders; {spec!r} is not one", "leave --blockwise out")
        return False
    if blockwise is not None:
        return blockwise
    folder = pathlib.Path(source.path)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    has_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    if size > BLOCKWISE_BYTES or not has_tokenizer:
        log.info("compressing %s block by block (%s)", source.path,
                 f"weights {size / 2**30:.1f} GiB > 2 GiB" if size > BLOCKWISE_BYTES else "no tokenizer")
        return True
    return False


def given_options(config: Config | None, options: dict[str, Any]) -> dict[str, Any]:
    """The options a caller chose: `config`'s fields that differ from Config()'s, then `options`."""
    if config is None:
        return dict(options)
    defaults = Config()
    chosen = {k: v for k, v in config.to_dict().items() if getattr(defaults, k) != v}
    return {**chosen, **options}


@uses_threads
def compress(model: str, out: str | os.PathLike, config: Config | None = None, *, calibration: str | None = None,
             force: bool = False, resume: bool = False, evaluate: bool = True, baseline: bool = True, threads: int = 2,
             blockwise: bool | None = None, **options: Any) -> WorkflowResult:
    """`tngraph compress --model MODEL --out OUT ...` as one call; writes the artifact folder `out`.

    model: "minilm" or a local Hugging Face folder. config / options: tngraph.Config (its fields as
    keywords, e.g. budget=0.5, heal_steps=0). calibration: a text file, one sample per line (default:
    the built-in text). evaluate: score and time the result (the report's agreement or perplexity and
    latency); baseline: also score plain SVD. blockwise: None decides (use_blockwise). force, resume
    and threads are the flags of the same names. The returned report is the one written to report.json."""
    from ..models import resolve

    source = resolve(model)
    if use_blockwise(model, source, blockwise):
        return compress_blockwise(source, out, given_options(config, options), calibration=calibration, force=force, resume=resume)
    config = whole_graph_config(source, config, options)
    if config.heal_steps:  # a GPU the machine lacks: refused before the texts and the passes, not after them
        import torch

        from ..heal import resolve_device

        resolve_device(config.heal_device, torch.device("cpu"))
    return compress_graph(model, source, out, config, calibration=calibration, force=force, resume=resume, evaluate=evaluate,
                          baseline=baseline)


def compress_graph(spec: str, source: Any, out: str | os.PathLike, config: Config, *, calibration: str | None = None,
                   force: bool = False, resume: bool = False, evaluate: bool = True, baseline: bool = True) -> WorkflowResult:
    """The whole-graph pipeline on the model of `source`, healing, the report, the artifact in `out`."""
    from ..api import compress_with_result
    from ..artifact import save
    from ..lm import is_causal_lm, no_kv_cache
    from ..models import source_folder
    from ..ownership import check_output_dir

    # under torchrun the passes share their per-target work; rank 0 alone then heals, scores and writes
    group = distributed.init_from_env()
    distributed.agree(lambda: check_output_dir(out, force, keep=[source_folder(source), calibration, config.heal_data]), group)
    lead = group.rank == 0
    started = time.perf_counter()
    data = read_calibration(calibration, source_folder(source)) if calibration else None
    if isinstance(data, TensorSamples):
        return compress_tensors(spec, source, out, config, data, force=force, resume=resume, evaluate=evaluate, baseline=baseline)
    model, tokenizer = load_with_tokenizer(source, spec)
    config = fit_length(config, model)
    causal = is_causal_lm(model)
    if not lead:
        config = config.replace(heal_steps=0)  # rank 0 alone heals
    elif config.heal_steps == "auto":  # timed before healing's texts are built: how many follows from it
        probe = compress_texts(causal, config.replace(heal_steps=0), calibration, outside=False).calibration
        config = timed_steps(config, model, tokenizer, probe, checkpoint_dir(out) if resume else None)
    texts = compress_texts(causal, config, calibration, outside=evaluate)
    result = compress_with_result(model, calibration=texts.calibration, config=config,
                                  tokenizer=tokenizer, source=source, heal_texts=texts.heal if lead else None,
                                  heal_checkpoint=checkpoint_dir(out) if lead else None, resume=resume and lead)
    if not lead:  # the other ranks' part ends with the passes (the factors are the same on every rank)
        report = {"rank": group.rank, "world": group.world, "written_by": 0, "timings": {"total": time.perf_counter() - started}}
        return WorkflowResult(pathlib.Path(out), report, "graph", result, config, group.rank, group.world)
    report = size_report(spec, model, result, config)
    if evaluate:
        with saved_on_failure(result.module, out, force, "report.json", report), no_kv_cache(model, result.module):
            add_scores(report, model, tokenizer, result, texts.evaluation, config, baseline=baseline, outside=texts.outside)
    report["timings"]["total"] = time.perf_counter() - started
    save(result.module, out, force=force, extra={"report.json": report})
    report["out"] = os.path.abspath(out)
    return WorkflowResult(pathlib.Path(out), report, "graph", result, config, group.rank, group.world)


def compress_tensors(spec: str, source: Any, out: str | os.PathLike, config: Config, data: TensorSamples, *, force: bool = False,
                     resume: bool = False, evaluate: bool = True, baseline: bool = True) -> WorkflowResult:
    """The whole-graph pipeline calibrated (and healed) on named input tensors: a tensor file, or an
    image or audio folder read through the model folder's processor. With `evaluate`, the last
    samples (a fifth, at most eval_samples) are held out and score the result."""
    from ..api import compress_with_result
    from ..artifact import save
    from ..models import load_model
    from .measure import tensor_latency, tensor_report

    if distributed.init_from_env().world > 1:
        raise ConfigError("calibration on input tensors runs in one process", "run it without torchrun")
    started = time.perf_counter()
    model, tokenizer = load_model(source)
    config = keep_head_dense(model, config)
    calibration, held = data.split(min(config.eval_samples, max(1, len(data) // 5)), config.seed) if evaluate else (data, None)
    log.info("calibrating on %d samples of %s%s", len(calibration), data.origin, f", {len(held)} held out" if held else "")
    result = compress_with_result(model, calibration=calibration, config=config, tokenizer=tokenizer, source=source,
                                  heal_checkpoint=checkpoint_dir(out), resume=resume)
    report = size_report(spec, model, result, config)
    report["calibration"] = {"origin": data.origin, "samples": len(calibration), "inputs": sorted(data.inputs)}
    if held is not None:
        with saved_on_failure(result.module, out, force, "report.json", report):
            start = time.perf_counter()
            report["outputs"] = tensor_report(model, result, held, config, baseline=baseline)
            report["timings"]["evaluate"] = time.perf_counter() - start
            report["latency"] = tensor_latency(model, result.module, held)
    report["timings"]["total"] = time.perf_counter() - started
    save(result.module, out, force=force, extra={"report.json": report})
    report["out"] = os.path.abspath(out)
    return WorkflowResult(pathlib.Path(out), report, "graph", result, config)


def keep_head_dense(model: Any, config: Config) -> Config:
    """A classifier's output layer (its linears with num_labels outputs) stays dense unless the
    user chose what to exclude: it is small, and every class score goes through it."""
    import re

    import torch

    from ..models import CLASSIFIER_HEADS

    labels = getattr(getattr(model, "config", None), "num_labels", None)
    heads = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.out_features == labels]
    if config.exclude or not heads or not type(model).__name__.endswith(CLASSIFIER_HEADS):
        return config
    log.info("the classification head %s stays dense (pass --exclude to choose otherwise)", ", ".join(heads))
    return config.replace(exclude=tuple(f"^{re.escape(name)}$" for name in heads))


def compress_blockwise(source: Any, out: str | os.PathLike, given: dict[str, Any], *, calibration: str | None = None,
                       force: bool = False, resume: bool = False) -> WorkflowResult:
    """A Llama/Mistral/Qwen causal-LM folder block by block (tngraph.blockwise), whatever its size;
    `given`: the Config options chosen (the driver's defaults, blockwise.DEFAULTS, for the rest)."""
    from ..blockwise import blockwise_config, compress_causal_lm

    if resume:
        raise ConfigError("--resume is not available for block-by-block compression: it writes no healing checkpoint "
                          "(each block heals as it is compressed)", "leave --resume out, or pass --no-blockwise when the model fits in memory")
    config = blockwise_config(None, **given)  # the driver's defaults under the options given; what it cannot honour is refused
    tokenizer = causal_tokenizer(source.path)
    # without a tokenizer the calibration is random token ids: no text to build; a window takes several sentences
    texts = None if tokenizer is None else calibration_only(config, calibration, max(config.calibration_samples * 8, 256))
    group = distributed.init_from_env()  # torchrun --nproc-per-node N -m tngraph compress ...: decompositions shared
    rank, world = group.rank, group.world
    config = config.replace(progress=config.progress and rank == 0)
    result = compress_causal_lm(source.path, out, config, texts=texts, tokenizer=tokenizer, force=force)
    report = {**result.to_json(), "source": str(source.path), "out": os.path.abspath(out), "heal_steps": config.heal_steps,
              "world": world}
    return WorkflowResult(pathlib.Path(out), report, "blockwise", result, config, rank, world)


def causal_tokenizer(folder: str | os.PathLike) -> Any:
    """The folder's tokenizer, or None (logged) when it has none."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        log.warning("no tokenizer in %s (%s): calibrating on random token ids", folder,
                    str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__)
        return None
