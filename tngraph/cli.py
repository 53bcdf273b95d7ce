"""The tngraph command line: compress and demo. It owns the terminal; errors are one line, no traceback."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import sys
import time
from typing import Any, Sequence

from .config import ALLOCATIONS, BUDGET_KINDS, SENSITIVITIES
from .errors import ConfigError, TngraphError

log = logging.getLogger("tngraph.cli")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"tngraph: error: {message} (see `{self.prog} --help`)\n")


def _budget(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number in (0, 1], got {text!r}") from None


def _add_compress_options(p: argparse.ArgumentParser, *, out_required: bool) -> None:
    p.add_argument("--budget", type=_budget, default=0.5, help="fraction of the targets' parameters kept, in (0, 1] (default 0.5)")
    p.add_argument("--out", required=out_required, default=None if out_required else "demo-out", help="artifact folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--format", default="lowrank", choices=["svd", "lowrank", "tucker", "tt", "tr", "cp", "kron", "monarch"], metavar="FORMAT",
                   help="svd (= lowrank, whitened SVD, default), tucker, tt (tensor train), tr (tensor ring), cp, kron "
                        "(sum of Kronecker products) or monarch; docs/formats.md compares them")
    p.add_argument("--targets", default=None, metavar="KINDS", help="linear (default) or linear,embedding (embedding tables too)")
    fmt = p.add_argument_group("format options (defaults: tngraph.Config)")
    fmt.add_argument("--tt-cores", type=int, default=None, help="cores of the tt format (default 2)")
    fmt.add_argument("--tucker-modes", type=int, default=None, help="modes per side of the tucker format (default 2)")
    fmt.add_argument("--tucker-iters", type=int, default=None, help="HOOI sweeps after the HOSVD (default 0)")
    fmt.add_argument("--tr-cores", type=int, default=None, help="cores of the tr format (default 3)")
    fmt.add_argument("--tr-ring", type=int, default=None, help="closing rank of the tr format (default 2)")
    fmt.add_argument("--tr-als", type=int, default=None, help="ALS sweeps refining the tensor ring (default 0)")
    fmt.add_argument("--cp-modes", type=int, default=None, help="modes per side of the cp format (default 2)")
    fmt.add_argument("--cp-max-iter", type=int, default=None, help="most ALS sweeps per layer (default 200)")
    fmt.add_argument("--cp-tol", type=float, default=None, help="stop when a sweep improves the error by less than this fraction (default 0.01)")
    fmt.add_argument("--cp-time-limit", type=float, default=None, help="seconds of ALS per layer (default 120)")
    fmt.add_argument("--kron-shape", default=None, metavar="RxC", help="shape of the first Kronecker factor, e.g. 16x16 (default balanced)")
    fmt.add_argument("--monarch-blocks", type=int, default=None, help="input blocks of the monarch format (default balanced)")
    p.add_argument("--allocation", default=None, choices=list(ALLOCATIONS),
                   help="budgeted: ranks per target from sensitivity curves, total within --budget; uniform: the same fraction "
                        "per target; auto (default): budgeted for svd, uniform for the tensor-network formats; block by block, "
                        "budgeted ranks come from each block's whitened spectra")
    p.add_argument("--budget-kind", default=None, choices=list(BUDGET_KINDS),
                   help="what --budget is a fraction of: params (default), bytes (weight bytes) or latency (budgeted only)")
    p.add_argument("--dense-rows", action=argparse.BooleanOptionalAction, default=None,
                   help="patch level (budgeted): let a target keep its most sensitive output rows dense")
    p.add_argument("--mixture", default=None, metavar="FMT[,FMT]",
                   help="tensor-network formats whose candidates join budgeted allocation, e.g. tucker,tt,tr")
    p.add_argument("--latency-rows", type=int, default=None, help="input rows a latency budget is timed at (default 4096)")
    p.add_argument("--sensitivity", default=None, choices=list(SENSITIVITIES),
                   help="loss the budgeted allocation minimises (default measured)")
    p.add_argument("--sensitivity-rounds", type=int, default=None,
                   help="measurements: around uniform ranks, then around each allocation found (default 1)")
    p.add_argument("--no-refit", action="store_true", help="skip the least-squares refit of one core on the calibration data")
    p.add_argument("--guard-tolerance", type=float, default=None, metavar="E",
                   help="keep a target dense when its relative output error on the calibration data exceeds E (default 1.0)")
    p.add_argument("--strict", action="store_true", help="make a target failing the numerical guard an error instead of keeping it dense")
    p.add_argument("--blockwise", action=argparse.BooleanOptionalAction, default=None,
                   help="causal LMs (Llama/Mistral/Qwen): compress block by block from the shards (ranks per block, healing per block with --heal-steps) "
                        "instead of the whole-graph pipeline; default: block by block when the weights exceed 2 GiB or "
                        "the folder has no tokenizer")
    p.add_argument("--calibration", metavar="FILE", help="calibration text, one sample per line (default: built-in stdlib sentences)")
    p.add_argument("--calibration-samples", type=int, default=None, help="calibration samples used (default 2048)")
    p.add_argument("--eval-samples", type=int, default=2000, help="held-out sentences for the agreement report (default 2000)")
    p.add_argument("--no-eval", action="store_true", help="skip the agreement and latency measurements")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain-SVD comparison in the report")
    p.add_argument("--no-whiten", action="store_true", help="plain (data-free) SVD instead of activation-whitened SVD")
    p.add_argument("--no-output-whiten", action="store_true",
                   help="whiten inputs only: skip the output-gradient (fisher) weighting of low-rank decompositions")
    p.add_argument("--fisher-batches", type=int, default=None, help="calibration batches of the output-gradient statistics (default 64)")
    _add_heal_options(p, prefix="heal-")
    p.add_argument("--include", action="append", default=None, metavar="REGEX", help="target only module paths matching REGEX (repeatable)")
    p.add_argument("--exclude", action="append", default=None, metavar="REGEX", help="never target module paths matching REGEX (repeatable)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for calibration and latency (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of data sets and latency inputs (default 0)")
    p.add_argument("--dump", metavar="DIR", help="write the graph after each pass to DIR (as TNGRAPH_DUMP=DIR)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    p.add_argument("-v", "--verbose", action="store_true", help="log each pass")


def _add_heal_options(p: argparse.ArgumentParser, *, prefix: str) -> None:
    p.add_argument(f"--{prefix}steps", type=int, default=None, metavar="N",
                   help="steps of the healing fine-tune (distillation against the original; default 500, 0 turns it off)")
    p.add_argument(f"--{prefix}lr", type=float, default=None, metavar="LR", help="peak learning rate of healing (default 1e-4)")
    p.add_argument(f"--{prefix}data", metavar="FILE", default=None,
                   help="text to heal on, one sample per line (default: the built-in sentences outside the evaluation set, "
                        "or the --calibration file)")
    p.add_argument("--resume", action="store_true", help="continue healing from the checkpoint an interrupted run left (OUT.heal-checkpoint)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tngraph", description="Compress PyTorch models by rewriting their graphs into tensor networks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = sub.add_parser("compress", help="compress a model and write an artifact folder with a report")
    c.add_argument("--model", required=True, help="'minilm' (the bundled all-MiniLM-L6-v2) or a local Hugging Face model folder")
    _add_compress_options(c, out_required=True)
    d = sub.add_parser("demo", help="compress the bundled MiniLM at budget 0.5 and print the report")
    _add_compress_options(d, out_required=False)
    h = sub.add_parser("heal", help="heal an existing artifact: distil it against its source model, then save it")
    h.add_argument("artifact", help="folder written by `tngraph compress`")
    h.add_argument("--out", default=None, help="write the healed artifact here (default: replace the artifact in place)")
    h.add_argument("--force", action="store_true", help="replace an existing --out folder")
    _add_heal_options(h, prefix="")
    h.add_argument("--eval-samples", type=int, default=None, help="held-out sentences of the before/after agreement (default: the artifact's)")
    h.add_argument("--no-eval", action="store_true", help="skip the before/after agreement")
    h.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    h.add_argument("--seed", type=int, default=None, help="seed of the batch order (default: the artifact's)")
    h.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    h.add_argument("-v", "--verbose", action="store_true", help="log progress")
    _add_export_parser(sub)
    dp = sub.add_parser("dump", help="compress with a dump of every pass (table, diff, drawing, GraphML) and an index.html, "
                                     "or diff two pass folders (--diff A B)")
    dp.add_argument("--model", default=None, help="'minilm' or a local Hugging Face model folder")
    dp.add_argument("--diff", nargs=2, metavar=("A", "B"), default=None, help="print the unified diff of two pass folders and stop")
    _add_compress_options(dp, out_required=False)
    dp.set_defaults(out=None)
    e = sub.add_parser("eval", help="perplexity of a causal LM (a model folder or a compressed artifact) on a text file")
    e.add_argument("--model", required=True, help="a causal-LM folder (save_pretrained) or an artifact written by `tngraph compress`")
    e.add_argument("--text", default=None, metavar="FILE",
                   help="UTF-8 text to score (default: the built-in held-out documents, never used for calibration or healing)")
    e.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's context, at most 256)")
    e.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: half a window)")
    e.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    e.add_argument("--no-source", action="store_true", help="for an artifact: skip scoring its dense source model too")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    e.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    e.add_argument("-v", "--verbose", action="store_true", help="log progress")
    i = sub.add_parser("info", help="verify an artifact folder (hashes, source model) and summarise it")
    i.add_argument("artifact", help="folder written by `tngraph compress`")
    i.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    i.add_argument("-v", "--verbose", action="store_true", help="log while loading")
    return parser


def _sizes(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX (three integers), got {text!r}")
    return values  # type: ignore[return-value]


def _add_export_parser(sub: Any) -> None:
    e = sub.add_parser("export", help="export a model as ONNX (checked in onnxruntime) or an ONNX file as a TensorRT engine")
    kinds = e.add_subparsers(dest="export", required=True, parser_class=_Parser)
    o = kinds.add_parser("onnx", help="export an artifact (or the dense model) to ONNX, check it and compare it with PyTorch in onnxruntime")
    o.add_argument("--model", required=True, help="an artifact folder of `tngraph compress`, 'minilm' (the dense bundled model) "
                                                  "or a local Hugging Face model folder")
    o.add_argument("--out", required=True, help="the .onnx file to write (weights over 2 GB go to FILE.onnx.data beside it)")
    o.add_argument("--force", action="store_true", help="replace an existing --out file")
    o.add_argument("--batch", type=int, default=2, help="rows of the example input (default 2)")
    o.add_argument("--length", type=int, default=16, help="tokens of the example input (default 16)")
    o.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="float type of the file's weights and values (default fp32); fp16/bf16 files are what TensorRT's "
                        "strongly typed engines run in reduced precision")
    o.add_argument("--tolerance", type=float, default=None,
                   help="largest allowed |onnxruntime - float32 PyTorch| (default 1e-4 for fp32; for fp16/bf16 the default "
                        "bounds each output's error relative to its largest value: 2 %% fp16, 25 %% bf16)")
    o.add_argument("--static", action="store_true", help="fix batch and sequence to the example's (default: dynamic axes)")
    o.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    o.add_argument("--quiet", action="store_true", help="no log lines")
    o.add_argument("-v", "--verbose", action="store_true", help="log the export's steps")
    t = kinds.add_parser("tensorrt", help="build a TensorRT engine from an ONNX file (needs an NVIDIA GPU and tensorrt), "
                                          "or only check the file against TensorRT's operators (--check-only, no GPU)")
    t.add_argument("--onnx", required=True, help="the ONNX file (from `tngraph export onnx`)")
    t.add_argument("--out", default=None, help="the engine file to write, e.g. model.plan (not needed with --check-only)")
    t.add_argument("--force", action="store_true", help="replace an existing --out file")
    precision = t.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="let TensorRT run layers of an fp32 file in float16 (TensorRT 10); "
                                                               "a file exported with --dtype fp16 runs in float16 without it")
    precision.add_argument("--bf16", action="store_true", help="the same for bfloat16 (or export with --dtype bf16)")
    t.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace limit in GiB (default 4)")
    t.add_argument("--batch", type=_sizes, default=(1, 8, 32), metavar="MIN,OPT,MAX", help="profile of the batch axis (default 1,8,32)")
    t.add_argument("--sequence", type=_sizes, default=(1, 128, 512), metavar="MIN,OPT,MAX",
                   help="profile of the sequence axis (default 1,128,512)")
    t.add_argument("--check-only", action="store_true", help="only check the graph against TensorRT's operators and types (no GPU needed)")
    t.add_argument("--quiet", action="store_true", help="no log lines")
    t.add_argument("-v", "--verbose", action="store_true", help="log the build")


def _export(args: argparse.Namespace) -> int:
    from .lowering.tensorrt import build_engine, check_tensorrt

    if args.export == "onnx":
        return _export_onnx(args)
    problems = check_tensorrt(args.onnx)
    errors = [p for p in problems if p.severity == "error"]
    for p in problems:
        print(f"  {p}")
    print(f"TensorRT check of {args.onnx}: {len(errors)} errors, {len(problems) - len(errors)} warnings")
    if args.check_only:
        return 1 if errors else 0
    if not args.out:
        raise ConfigError("--out is required to build an engine", "pass --out FILE.plan, or --check-only")
    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else None
    engine = build_engine(args.onnx, args.out, precision=precision, workspace_gb=args.workspace_gb, batch=args.batch,
                          sequence=args.sequence, force=args.force)
    print(f"TensorRT {engine.tensorrt_version} engine {engine.path} ({engine.bytes / 1e6:.1f} MB, {engine.precision}) in {engine.seconds:.1f} s")
    for name, (lo, opt, hi) in engine.profile.items():
        print(f"  profile {name}: min {lo}, opt {opt}, max {hi}")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from .lowering.onnx import _load, export_onnx, text_inputs, written_by_tngraph
    from .lowering.tensorrt import check_tensorrt
    from .ownership import check_output_file

    hf_logging.set_verbosity_error()
    if args.batch < 1 or args.length < 1:
        raise ConfigError(f"--batch and --length must be at least 1, got {args.batch} and {args.length}")
    check_output_file(args.out, args.force, ours=written_by_tngraph, what="an ONNX file")  # before the model is read
    model, tokenizer = _load(args.model)
    result = export_onnx(model, text_inputs(tokenizer, args.batch, args.length), args.out, dynamic=not args.static,
                         tolerance=args.tolerance, opset=args.opset, force=args.force, dtype=args.dtype)
    external = f" + {result.external_data.name}" if result.external_data else ""
    print(f"wrote {result.path}{external}: {result.bytes / 1e6:.2f} MB, {result.dtype}, opset {result.opset}, checker passed (full_check)")
    print(f"  inputs {', '.join(result.inputs)}; outputs {', '.join(result.outputs)}; dynamic axes "
          + (", ".join(f"{n}[{', '.join(f'{a}:{lab}' for a, lab in axes.items())}]" for n, axes in result.dynamic_axes.items()) or "none"))
    for check in result.checks:
        shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in check.shapes.items())
        runtime = f"onnxruntime ({result.providers[0]}{f', {result.dtype} emulated in float32' if result.emulated else ''})"
        reference = "PyTorch" if result.dtype == "fp32" else "float32 PyTorch"
        print(f"  {runtime} vs {reference} on {shapes}: max abs diff {check.max_abs_diff:.3g} ({check.max_rel_diff:.2%} of the largest value)")
    bound = (f"{result.max_rel_diff:.2%} of the largest value <= tolerance {result.tolerance:.0%}" if result.relative
             else f"max abs diff {result.max_abs_diff:.3g} <= tolerance {result.tolerance:g}")
    print(f"  {bound}; ops: "
          + ", ".join(f"{k} {v}" for k, v in sorted(result.op_counts.items(), key=lambda kv: -kv[1])))
    problems = check_tensorrt(result.path)
    errors = sum(p.severity == "error" for p in problems)
    print(f"  TensorRT check: {errors} errors, {len(problems) - errors} warnings"
          + (f" (see `tngraph export tensorrt --onnx {result.path} --check-only`)" if problems else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    _setup_logging(args)
    try:
        if args.command == "info":
            return _info(args)
        if args.command == "heal":
            return _heal(args)
        if args.command == "export":
            return _export(args)
        if args.command == "dump":
            return _dump(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "demo":
            args.model = "minilm"
        return _compress(args)
    except TngraphError as exc:
        print(f"tngraph: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None) or getattr(args, "artifact", None)
        if out and os.path.isdir(_checkpoint_dir(out)):
            print(f"tngraph: interrupted; the artifact was not written, healing's state is in {_checkpoint_dir(out)} "
                  "(rerun the same command with --resume)", file=sys.stderr)
        else:
            print("tngraph: interrupted; nothing was written", file=sys.stderr)
        return 130
    except MemoryError:
        print("tngraph: error: out of memory (try fewer --calibration-samples, --blockwise for a causal LM, "
              "or a machine with more memory)", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, not a user error: one line, the traceback with -v or TNGRAPH_TRACEBACK=1
        if getattr(args, "verbose", False) or os.environ.get("TNGRAPH_TRACEBACK"):
            raise
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        print(f"tngraph: internal error: {type(exc).__name__}: {first} (this is a tngraph bug: rerun with -v "
              "or TNGRAPH_TRACEBACK=1 for the traceback and report it)", file=sys.stderr)
        return 1


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet or not args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tngraph").setLevel(logging.ERROR if args.quiet else level)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _compress(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from .api import compress_with_result
    from .artifact import save
    from .data import healing_pool, lm_documents, passages, read_lines, sentence_sets
    from .lm import is_causal_lm, no_kv_cache
    from .models import load_model, resolve, source_folder
    from .ownership import check_output_dir

    hf_logging.set_verbosity_error()
    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    source = resolve(args.model)
    from .blockwise import causal_lm_config

    if source.kind == "hf" and causal_lm_config(source.path) is not None and _use_blockwise(args, source):
        return _compress_causal(args, source)
    if args.blockwise:
        raise ConfigError(f"--blockwise compresses Llama/Mistral/Qwen causal LM folders; {args.model!r} is not one",
                          "leave --blockwise out")
    config = _config(args, source)
    check_output_dir(args.out, args.force, keep=[source_folder(source), args.calibration, args.heal_data])
    started = time.perf_counter()
    model, tokenizer = load_model(source)
    if tokenizer is None:
        raise TngraphError(f"{args.model!r} has no tokenizer", "add the tokenizer files to the model folder")
    config = _fit_length(config, model)
    causal = is_causal_lm(model)
    if causal:  # running text: passages of the built-in training documents; held-out documents scored
        text = lm_documents()
        pool = passages(text.train)
        random.Random(config.seed).shuffle(pool)
        calibration = read_lines(args.calibration) if args.calibration else pool[: config.calibration_samples]
        heal_texts = None if args.calibration else pool
        evaluation: Any = "\n\n".join(text.heldout)
    else:
        builtin = sentence_sets(config.calibration_samples, config.eval_samples, config.seed)
        calibration = read_lines(args.calibration) if args.calibration else builtin.calibration
        heal_texts = None if args.calibration else healing_pool(builtin.evaluation)
        evaluation = builtin.evaluation
    result = compress_with_result(model, calibration=calibration, config=config, tokenizer=tokenizer, source=source,
                                  heal_texts=heal_texts, heal_checkpoint=_checkpoint_dir(args.out), resume=args.resume)
    with no_kv_cache(model, result.module):  # scored and timed without a KV cache
        report = _report(args, source, model, tokenizer, result, evaluation, config)
    report["timings"]["total"] = time.perf_counter() - started
    save(result.module, args.out, force=args.force, extra={"report.json": report})
    report["out"] = os.path.abspath(args.out)
    from .report import format_table

    print(format_table(report))
    return 0


BLOCKWISE_BYTES = 2 << 30


def _fit_length(config: Any, model: Any) -> Any:
    """Tokenise no longer than the model's position table (a small model may hold fewer than max_length)."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and 1 < positions < config.max_length:
        log.info("tokenising to %d tokens, the model's max_position_embeddings", positions)
        return config.replace(max_length=positions)
    return config


def _use_blockwise(args: argparse.Namespace, source: Any) -> bool:
    """--blockwise / --no-blockwise, else block by block for weights over 2 GiB or a folder without a tokenizer."""
    import pathlib

    if args.blockwise is not None:
        return args.blockwise
    folder = pathlib.Path(source.path)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    has_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    if size > BLOCKWISE_BYTES or not has_tokenizer:
        log.info("compressing %s block by block (%s)", source.path,
                 f"weights {size / 2**30:.1f} GiB > 2 GiB" if size > BLOCKWISE_BYTES else "no tokenizer")
        return True
    return False


def _compress_causal(args: argparse.Namespace, source: Any) -> int:
    """A Llama/Mistral/Qwen causal LM folder: block by block, whatever its size (tngraph.blockwise)."""
    import torch

    from .blockwise import compress_causal_lm, init_distributed
    from .data import read_lines, sentence_sets

    if args.format not in ("svd", "lowrank"):
        raise ConfigError(f"--format {args.format} is not available for block-by-block compression of causal LMs", "use --format svd (the default)")
    _refuse_blockwise_options(args)
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source.path, local_files_only=True)
    except Exception as exc:
        log.warning("no tokenizer in %s (%s): calibrating on random token ids", source.path, str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__)
    samples = args.calibration_samples or 32
    texts = None
    if tokenizer is not None:  # without one the calibration is random token ids: no text to build
        texts = read_lines(args.calibration) if args.calibration else sentence_sets(max(samples * 8, 256), 1, args.seed).calibration
    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    rank, world = init_distributed()  # torchrun --nproc-per-node N -m tngraph compress ...: decompositions shared
    allocation = "budgeted" if args.allocation in (None, "auto") else args.allocation
    heal_steps = args.heal_steps or 0  # block by block, healing is off unless asked for
    heal_lr = args.heal_lr if args.heal_lr is not None else 1e-4  # compress_causal_lm checks both
    result = compress_causal_lm(source.path, args.out, budget=args.budget, texts=texts, tokenizer=tokenizer, samples=samples,
                                seed=args.seed, force=args.force, progress=not args.quiet and rank == 0, allocation=allocation,
                                heal_steps=heal_steps, heal_lr=heal_lr, strict=args.strict, include=tuple(args.include or ()),
                                exclude=tuple(args.exclude or ()), whiten=not args.no_whiten,
                                guard_tolerance=args.guard_tolerance if args.guard_tolerance is not None else 1.0)
    if rank != 0:
        return 0
    r = result.to_json()
    print(f"compressed {r['blocks']} decoder blocks of {source.path} block by block: {r['targets']} targets, "
          f"parameters {r['params_before']:,} -> {r['params_after']:,} ({r['kept']:.3f} kept), "
          f"{r['calibration_tokens']:,} calibration tokens, {r['seconds']:.1f} s"
          + (f" on {world} processes" if world > 1 else "")
          + (f", {heal_steps} healing steps per block (mean held-out relative error of the blocks' outputs "
             f"{sum(b for b, _ in r['healed']) / len(r['healed']):.4g} -> {sum(a for _, a in r['healed']) / len(r['healed']):.4g})"
             if r["healed"] else " (no healing: --heal-steps N heals each block)")
          + "; `tngraph eval --model DIR` scores it")
    print(f"artifact: {os.path.abspath(args.out)}  (tngraph.load(DIR) gives the model for generate())")
    return 0


# The whole-graph options block-by-block compression does not take, each with the reason: refused by
# name rather than ignored. (Honoured there: --budget, --allocation, --budget-kind params/bytes (the
# same fraction for weights of one dtype), --sensitivity spectral (what the block allocator uses),
# --guard-tolerance, --strict, --include/--exclude, --no-whiten, --calibration(-samples), --heal-steps,
# --heal-lr, --threads, --seed; --no-refit and --no-output-whiten describe what it always does.)
BLOCKWISE_REFUSED = (
    ("--budget-kind latency", lambda a: a.budget_kind == "latency", "blocks are not timed"),
    ("--sensitivity", lambda a: a.sensitivity not in (None, "spectral"), "block ranks come from the whitened spectra (--sensitivity spectral)"),
    ("--sensitivity-rounds", lambda a: a.sensitivity_rounds is not None, "nothing is measured"),
    ("--dense-rows", lambda a: bool(a.dense_rows), "patch-level plans are whole-graph only"),
    ("--mixture", lambda a: a.mixture is not None, "block by block factorizes low-rank only"),
    ("--latency-rows", lambda a: a.latency_rows is not None, "blocks are not timed"),
    ("--fisher-batches", lambda a: a.fisher_batches is not None, "there is no output-gradient pass"),
    ("--targets", lambda a: a.targets not in (None, "linear"), "only the blocks' linear projections are targets"),
    ("--heal-data", lambda a: a.heal_data is not None, "each block heals on its calibration activations"),
    ("--dump", lambda a: a.dump is not None, "there is no graph to dump"),
    ("--resume", lambda a: a.resume, "block by block writes no healing checkpoint"),
)


def _refuse_blockwise_options(args: argparse.Namespace) -> None:
    for flag, given, why in BLOCKWISE_REFUSED:
        if given(args):
            raise ConfigError(f"{flag} is not available for block-by-block compression ({why})",
                              "leave it out, or pass --no-blockwise for the whole-graph pipeline when the model fits in memory")


def _config(args: argparse.Namespace, source: Any) -> Any:
    """The Config of the compress options on the command line."""
    from .config import Config
    from .models import default_include

    options: dict[str, Any] = dict(
        budget=args.budget,
        format=args.format,
        refit=not args.no_refit,
        whiten=not args.no_whiten,
        output_whiten=not args.no_output_whiten,
        exclude=tuple(args.exclude or ()),
        strict=args.strict,
        eval_samples=args.eval_samples,
        seed=args.seed,
        progress=not args.quiet,
    )
    for key in ("guard_tolerance", "heal_steps", "heal_lr", "heal_data", "allocation", "budget_kind", "dense_rows", "mixture", "latency_rows", "fisher_batches", "sensitivity", "sensitivity_rounds", "targets", "tt_cores", "tucker_modes", "tucker_iters", "tr_cores", "tr_ring", "tr_als", "cp_modes",
                "cp_max_iter", "cp_tol", "cp_time_limit", "kron_shape", "monarch_blocks", "calibration_samples"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.dump:
        options["dump_dir"] = args.dump
    config = Config(**options)
    return config.replace(include=tuple(args.include) if args.include else default_include(source, config.targets))


def _dump(args: argparse.Namespace) -> int:
    """tngraph dump: compress with a dump of every pass (and index.html), or diff two pass folders."""
    import torch
    from transformers.utils import logging as hf_logging

    from .api import compress_with_result
    from .data import read_lines, sentence_sets
    from .debug import compare_dumps, write_report
    from .evaluate import latency, latency_inputs
    from .models import load_model, resolve, source_folder
    from .ownership import check_output_dir, fresh_dir

    if args.diff:
        text = compare_dumps(*args.diff)
        print(text if text else f"no difference between {args.diff[0]} and {args.diff[1]}", end="" if text else "\n")
        return 0
    if not args.model or not args.out:
        raise ConfigError("tngraph dump needs --model and --out (or --diff A B)", "e.g. tngraph dump --model minilm --budget 0.5 --out dump/")
    hf_logging.set_verbosity_error()
    source = resolve(args.model)
    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    if args.heal_steps is None:
        args.heal_steps = 0  # healing is not a graph pass: off unless asked for
    torch.set_num_threads(args.threads)
    keep = [source_folder(source), args.calibration]
    check_output_dir(args.out, args.force, keep=keep)  # refused before any work
    config = _config(args, source).replace(dump_dir=args.out)
    model, tokenizer = load_model(source)
    config = _fit_length(config, model)
    if tokenizer is None:
        raise TngraphError(f"{args.model!r} has no tokenizer", "add the tokenizer files to the model folder")
    calibration = read_lines(args.calibration) if args.calibration else sentence_sets(config.calibration_samples, 1, config.seed).calibration
    fresh_dir(args.out, args.force, kind="dump", keep=keep)  # an old dump is emptied now; anything else was refused
    try:
        result = compress_with_result(model, calibration=calibration, config=config, tokenizer=tokenizer, source=source)
    except TngraphError as exc:
        raise TngraphError(f"{exc.problem}; the dump of every pass up to it is in {args.out} (open index.html)", exc.fix) from exc
    state = result.context.analysis["dump"]["state"]
    measurements = {}
    if not args.no_eval:
        rows, length = 8, 128
        times = latency({"dense": model, "compressed": result.module}, latency_inputs(tokenizer.vocab_size, rows, length, config.seed))
        measurements = {"dense_ms": times["dense"] * 1e3, "compressed_ms": times["compressed"] * 1e3, "shape": f"{rows}x{length}",
                        "threads": torch.get_num_threads()}
    index = write_report(state, result.graph, result.context, measurements)
    print(f"dumped {len(state.folders)} passes to {args.out}: " + ", ".join(f.name for f in state.folders))
    if measurements:
        print(f"latency {measurements['shape']} ({measurements['threads']} threads): dense {measurements['dense_ms']:.1f} ms, "
              f"compressed {measurements['compressed_ms']:.1f} ms ({measurements['compressed_ms'] / measurements['dense_ms']:.3f})")
    print(f"report: {os.path.abspath(index)}")
    return 0


def _checkpoint_dir(out: str) -> str:
    """Healing checkpoints live beside the artifact (the artifact folder is replaced in one rename)."""
    path = os.path.abspath(out).rstrip(os.sep)
    return path + ".heal-checkpoint"


def _heal(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from .api import heal_config, heal_model
    from .artifact import load, read_recipe, save
    from .config import Config
    from .data import healing_pool, lm_documents, passages, read_lines, sentence_sets
    from .evaluate import agreement, sentence_embeddings
    from .lm import is_causal_lm, no_kv_cache, perplexity
    from .models import ModelSource, load_model, source_folder
    from .ownership import check_output_dir

    hf_logging.set_verbosity_error()
    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    out = args.out or args.artifact
    in_place = os.path.realpath(out) == os.path.realpath(args.artifact)
    recipe = read_recipe(args.artifact)
    if not in_place:  # a new folder: never the artifact being healed, its source, or a stranger's folder
        check_output_dir(out, args.force, keep=[args.artifact, source_folder(recipe["source"]), args.data])
    if recipe.get("layout") == "causal-lm-blockwise":  # refused before the model is built
        raise ConfigError("an artifact compressed block by block cannot be healed afterwards (that needs the whole model in memory)",
                          "compress again with --heal-steps N (each block healed as it is compressed), or with --no-blockwise "
                          "(the whole-graph pipeline heals) when the model fits in memory")
    module = load(args.artifact)
    recipe = module.tngraph_recipe
    source = ModelSource.from_json(recipe["source"])
    if source.kind == "module":
        raise TngraphError("this artifact was made from a user module, which the command line cannot rebuild",
                           "heal it in Python: tngraph.heal.heal(tngraph.load(DIR, model), model, texts, tokenizer)")
    teacher, tokenizer = load_model(source)
    if tokenizer is None:
        raise TngraphError("the artifact's source model has no tokenizer", "add the tokenizer files to the model folder")
    saved = recipe["config"]
    changes = {k: v for k, v in (("heal_steps", args.steps), ("heal_lr", args.lr), ("seed", args.seed),
                                 ("eval_samples", args.eval_samples)) if v is not None}
    # an artifact compressed with --heal-steps 0 still heals the default number of steps here
    config = Config(**{k: v for k, v in saved.items() if k in ("heal_lr", "max_length", "batch_size", "seed",
                                                               "calibration_samples", "eval_samples")}).replace(**changes)
    if config.heal_steps == 0:
        raise ConfigError("--steps 0 heals nothing", "pass --steps N with N > 0")
    show = not args.quiet
    causal = is_causal_lm(teacher)
    if causal:  # running text: the built-in training passages; perplexity on the held-out documents
        lm_text = lm_documents()
        texts = read_lines(args.data, what="healing data") if args.data else passages(lm_text.train)
        heldout = "\n\n".join(lm_text.heldout)

        def score(m):
            return perplexity(m, tokenizer, heldout, show=show)

        key = "perplexity"
    else:
        sets = sentence_sets(config.calibration_samples, config.eval_samples, config.seed)
        texts = read_lines(args.data, what="healing data") if args.data else healing_pool(sets.evaluation)
        ref = None if args.no_eval else sentence_embeddings(teacher, tokenizer, sets.evaluation, max_length=config.max_length, show=show)

        def score(m):
            return agreement(ref, sentence_embeddings(m, tokenizer, sets.evaluation, max_length=config.max_length, show=show))

        key = "agreement"
    with no_kv_cache(module, teacher) if causal else contextlib.nullcontext():
        before = None if args.no_eval else score(module)
        outcome, _ = heal_model(module, teacher, texts, tokenizer, heal_config(config), show=show,
                                checkpoint=_checkpoint_dir(out), resume=args.resume)
        report = {"heal": outcome.to_json()}
        if before is not None:
            after = score(module)
            report[key] = {"before": before.to_json(), "after": after.to_json()}
            if causal:
                report[key]["dense"] = score(teacher).to_json()
    save(module, out, force=args.force or in_place, extra={"heal.json": report})
    h = outcome
    print(f"healed {args.artifact}: held-out {h.metric} {h.start_loss:.4f} -> {h.best_loss:.4f} "
          f"(best at step {h.best_step} of {h.steps}, {h.seconds:.0f}s)")
    if before is not None and causal:
        print(f"perplexity on {after.tokens:,} held-out tokens: {before.perplexity:.3f} -> {after.perplexity:.3f} "
              f"(dense {report[key]['dense']['perplexity']:.3f})")
    elif before is not None:
        print(f"embedding agreement on {before.sentences} evaluation sentences: mean cos {before.mean_cos:.4f} -> {after.mean_cos:.4f}, "
              f"min cos {before.min_cos:.4f} -> {after.min_cos:.4f}, top-10 {before.top10_overlap:.4f} -> {after.top10_overlap:.4f}")
    print(f"artifact: {os.path.abspath(out)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    """tngraph eval: sliding-window perplexity of a causal LM, and of an artifact's source next to it."""
    import json

    import torch

    from . import lm
    from .data import lm_documents, read_text

    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    torch.set_num_threads(args.threads)
    if args.text:
        text, label = read_text(args.text), args.text
    else:
        text, label = "\n\n".join(lm_documents().heldout), "the built-in held-out documents"
    kwargs = dict(window=args.window, stride=args.stride, batch_size=args.batch_size, show=not args.quiet)

    def score(model, tokenizer):
        with lm.no_kv_cache(model):
            return lm.perplexity(model, tokenizer, text, **kwargs)

    recipe = lm.artifact_recipe(args.model)
    if recipe is not None and not args.no_source:
        # the dense source first, then the same model compressed in place: one model in memory, read once
        models = lm.load_source_then_artifact(args.model)
        dense = score(*next(models))
        kwargs["window"], kwargs["stride"] = dense.window, dense.stride  # the same windows
        result = score(*next(models))
    else:
        model, tokenizer, recipe = lm.load(args.model)
        result, dense = score(model, tokenizer), None
    out: dict[str, Any] = {"model": args.model, "text": label, **result.to_json()}
    if dense is not None:
        out["source"] = {"model": recipe["source"]["path"], **dense.to_json(), "ratio": result.perplexity / dense.perplexity}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    kind = "compressed artifact" if recipe is not None else "model"
    print(f"{kind} {args.model}: perplexity {result.perplexity:.3f} on {result.tokens:,} tokens of {label} "
          f"({result.windows} windows of {result.window}, stride {result.stride})")
    if "source" in out:
        print(f"dense source {out['source']['model']}: perplexity {out['source']['perplexity']:.3f} "
              f"(compressed / dense {out['source']['ratio']:.3f})")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .artifact import load
    from .evaluate import count_params

    module = load(args.artifact)
    recipe = module.tngraph_recipe
    names = tuple(t["name"] for t in recipe["targets"])
    kept, _ = count_params(module, names)
    dense = sum(t["in_features"] * t["out_features"] + (t["out_features"] if t["bias"] else 0) for t in recipe["targets"])
    print(f"artifact {args.artifact}: verified (factors hash, source model {recipe['source']['kind']})")
    print(f"{len(names)} targets, parameters kept {kept:,} of {dense:,} ({kept / dense:.3f})")
    for t in recipe["targets"]:
        print(f"  {t['name']:48} {t['format']:8} rank {t['rank']:5}  {t['out_features']}x{t['in_features']}")
    return 0


def _per_target(result) -> dict[str, dict[str, Any]]:
    """Per target: its sensitivity (when measured), the chosen format and rank, parameters kept."""
    from . import meta

    rows = {}
    errors = result.context.analysis.get("guard", {})
    for node in meta.targets(result.graph):
        node_info = meta.info(node)
        t, plan, sens = node_info.target, node_info.plan, node_info.sensitivity
        rows[t.name] = {
            "error": errors.get(t.name),  # relative output error on the calibration data (the guard's)
            "guard_reverted": bool(plan and plan.reason == "guard"),
            "format": plan.format if plan else "dense",
            "rank": plan.rank if plan else None,
            "dense_rows": plan.dense_rows if plan else 0,
            "params_kept": (plan.params_after / plan.params_before) if plan else 1.0,
            "sensitivity": None if sens is None else {"kind": sens.kind, "score": sens.score},
        }
    return rows


@contextlib.contextmanager
def _unhealed(result):
    """The compressed model as it was before healing (its trained parameters swapped back) for the duration."""
    import torch

    params = dict(result.module.named_parameters())
    healed = {n: params[n].detach().clone() for n in result.unhealed}
    with torch.no_grad():
        for n, v in result.unhealed.items():
            params[n].copy_(v)
    try:
        yield result.module
    finally:
        with torch.no_grad():
            for n, v in healed.items():
                params[n].copy_(v)


def _model_inputs(model, vocab_size: int, batch: int, length: int, seed: int) -> dict[str, Any]:
    """Random token inputs of the model's forward (a causal LM takes no token_type_ids)."""
    from .evaluate import latency_inputs
    from .lm import is_causal_lm

    inputs = latency_inputs(vocab_size, batch, length, seed)
    if is_causal_lm(model):
        inputs.pop("token_type_ids")
    return inputs


def _report(args, source, model, tokenizer, result, evaluation, config) -> dict[str, Any]:
    import torch

    from .api import compress_with_result
    from .evaluate import agreement, count_params, latency, sentence_embeddings
    from .lm import is_causal_lm, perplexity

    per_target = _per_target(result)
    names = tuple(per_target)  # every target, the ones kept dense included
    tb, tbb = count_params(model, names)
    ta, tab = count_params(result.module, names)
    mb, mbb = count_params(model)
    ma, mab = count_params(result.module)
    report: dict[str, Any] = {
        "model": args.model,
        "budget": config.budget,
        "format": config.format,
        "whiten": config.whiten,
        "targets": len(names),
        "params": {"targets_before": tb, "targets_after": ta, "model_before": mb, "model_after": ma, "targets_kept": ta / tb if tb else None},
        "bytes": {"targets_before": tbb, "targets_after": tab, "model_before": mbb, "model_after": mab},
        "allocation": config.allocation_kind,
        "budget_kind": config.budget_kind,
        "sensitivity": config.sensitivity if config.allocation_kind == "budgeted" else None,
        "output_whiten": config.output_whiten,
        "ranks": {t["name"]: t["rank"] for t in result.recipe["targets"]},
        "per_target": per_target,
        "counters": dict(result.context.counters),
        "guard": {"tolerance": config.guard_tolerance, "reverted": dict(result.context.analysis.get("guard_reverted", {}))},
        "timings": dict(result.timings),
    }
    if result.heal is not None:
        report["heal"] = result.heal.to_json()
    if args.no_eval:
        return report
    start = time.perf_counter()
    show = not args.quiet
    causal = is_causal_lm(model)
    if causal:  # evaluation is the held-out text
        def score(m):
            return perplexity(m, tokenizer, evaluation, show=show).to_json()

        key = "perplexity"
        report[key] = {"dense": score(model), "compressed": score(result.module)}
    else:
        ref = sentence_embeddings(model, tokenizer, evaluation, max_length=config.max_length, show=show)

        def score(m):
            return agreement(ref, sentence_embeddings(m, tokenizer, evaluation, max_length=config.max_length, show=show)).to_json()

        key = "agreement"
        report[key] = {"compressed": score(result.module)}
    if result.unhealed is not None:
        with _unhealed(result) as before:
            report[key]["unhealed"] = score(before)
    if not args.no_baseline and config.whiten and config.format == "lowrank":
        # the data-free baseline: plain truncated SVD at the budget's uniform ranks
        baseline = config.replace(whiten=False, allocation="uniform", budget_kind="params", dense_rows=False, heal_steps=0, dump_dir=None)
        plain = compress_with_result(model, example_inputs=_model_inputs(model, tokenizer.vocab_size, 2, 16, 0), config=baseline)
        report[key]["plain_svd"] = score(plain.module)
    report["timings"]["evaluate"] = time.perf_counter() - start
    start = time.perf_counter()
    batch, length = 32, min(128, config.max_length)
    inputs = _model_inputs(model, tokenizer.vocab_size, batch, length, config.seed)
    times = latency({"dense": model, "compressed": result.module}, inputs)
    report["latency"] = {
        "batch": batch,
        "length": length,
        "threads": torch.get_num_threads(),
        "dense_ms": times["dense"] * 1e3,
        "compressed_ms": times["compressed"] * 1e3,
        "ratio": times["compressed"] / times["dense"],
    }
    report["timings"]["latency"] = time.perf_counter() - start
    return report


if __name__ == "__main__":
    sys.exit(main())
