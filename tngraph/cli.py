"""The tngraph command line: argument parsing, one tngraph.workflow call per command, and printing.
It owns the terminal; errors are one line, no traceback."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

from . import workflow
from .config import flags
from .errors import ConfigError, TngraphError

HEAL_FLAGS = {"heal_steps": "steps", "heal_lr": "lr", "heal_scope": "scope", "heal_data": "data", "heal_device": "device"}  # `tngraph heal` takes them without the prefix


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"tngraph: error: {message} (see `{self.prog} --help`)\n")


def _typed(parse: Any) -> Any:
    """A Config flag's parser; its ValueError (a ConfigError) is argparse's one-line message."""
    if parse in (None, int, float, str):
        return parse

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def _add_config_flags(p: argparse.ArgumentParser, only: dict[str, str] | None = None) -> None:
    """The flags of Config's fields (their field metadata), or of the fields in `only` under those dests."""
    groups: dict[str, Any] = {}
    for f in flags():
        if only is not None and f.name not in only:
            continue
        group = p if f.group is None else groups.setdefault(f.group, p.add_argument_group(f.group))
        dest = only[f.name] if only else f.name
        flag = f"--{dest}" if only else f.flag
        kw: dict[str, Any] = {"dest": dest, "default": f.default, "help": f.help}
        if f.kind == "value":
            kw.update(type=_typed(f.type), choices=f.choices, metavar=f.metavar)
        elif f.kind == "append":
            kw.update(action="append", metavar=f.metavar)
        elif f.kind == "const":
            kw.update(action="store_const", const=f.const)
        else:  # "bool": --flag / --no-flag
            kw.update(action=argparse.BooleanOptionalAction)
        group.add_argument(flag, **kw)


def _common(p: argparse.ArgumentParser, *, threads: str | None = "CPU threads (default 2)", what: str = "progress",
            quiet: str = "no progress bars or log lines") -> None:
    if threads:
        p.add_argument("--threads", type=int, default=2, help=threads)
    p.add_argument("--quiet", action="store_true", help=quiet)
    p.add_argument("-v", "--verbose", action="store_true", help=f"log {what}")


def _add_compress_options(p: argparse.ArgumentParser, *, out_required: bool) -> None:
    p.add_argument("--out", required=out_required, default=None if out_required else "demo-out", help="artifact folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    _add_config_flags(p)
    p.add_argument("--blockwise", action=argparse.BooleanOptionalAction, default=None,
                   help="causal LMs (Llama/Mistral/Qwen): compress block by block from the shards (ranks per block, healing per block "
                        "with --heal-steps) instead of the whole-graph pipeline; default: block by block when the weights exceed 2 GiB "
                        "or the folder has no tokenizer")
    p.add_argument("--calibration", metavar="FILE", help="calibration text, one sample per line (default: built-in stdlib sentences)")
    p.add_argument("--no-eval", action="store_true", help="skip the agreement and latency measurements")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain-SVD comparison in the report")
    p.add_argument("--resume", action="store_true", help="continue healing from the checkpoint an interrupted run left (OUT.heal-checkpoint)")
    _common(p, threads="CPU threads for calibration and latency (default 2)", what="each pass")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tngraph", description="Compress PyTorch models by rewriting their graphs into tensor networks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = sub.add_parser("compress", help="compress a model and write an artifact folder with a report")
    c.add_argument("--model", required=True, help="'minilm' (the bundled all-MiniLM-L6-v2) or a local Hugging Face model folder")
    _add_compress_options(c, out_required=True)
    _add_compress_options(sub.add_parser("demo", help="compress the bundled MiniLM at budget 0.5 and print the report"), out_required=False)
    h = sub.add_parser("heal", help="heal an existing artifact: distil it against its source model, then save it")
    h.add_argument("artifact", help="folder written by `tngraph compress`")
    h.add_argument("--out", default=None, help="write the healed artifact here (default: replace the artifact in place)")
    h.add_argument("--force", action="store_true", help="replace an existing --out folder")
    _add_config_flags(h, HEAL_FLAGS)
    h.add_argument("--resume", action="store_true", help="continue healing from the checkpoint an interrupted run left (OUT.heal-checkpoint)")
    h.add_argument("--eval-samples", type=int, default=None, help="held-out sentences of the before/after agreement (default: the artifact's)")
    h.add_argument("--no-eval", action="store_true", help="skip the before/after agreement")
    h.add_argument("--seed", type=int, default=None, help="seed of the batch order (default: the artifact's)")
    _common(h)
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
                   help="UTF-8 text to score (default: the built-in held-out documents, never used for calibration or healing, "
                        "and out-of-domain documents, third-party package docstrings, beside them)")
    e.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's context, at most 256)")
    e.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: half a window)")
    e.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    e.add_argument("--no-source", action="store_true", help="for an artifact: skip scoring its dense source model too")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    _common(e)
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
    o.add_argument("--quant-ops", default="onnxruntime", choices=("onnxruntime", "standard"),
                   help="quantized layers (--bits) as onnxruntime's MatMulNBits, codes kept packed (default), or in ONNX's own "
                        "operators only (standard: for TensorRT and other runtimes)")
    _common(o, threads=None, what="the export's steps", quiet="no log lines")
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
    _common(t, threads=None, what="the build", quiet="no log lines")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The Config options given on the command line (flags left out are Config's, or the driver's, defaults)."""
    return {f.name: getattr(args, f.name) for f in flags() if getattr(args, f.name) is not None} | {"progress": not args.quiet}


def _compress(args: argparse.Namespace) -> int:
    run = workflow.compress(args.model, args.out, calibration=args.calibration, force=args.force, resume=args.resume,
                            evaluate=not args.no_eval, baseline=not args.no_baseline, threads=args.threads, blockwise=args.blockwise,
                            **_options(args))
    if run.rank == 0:  # under torchrun, rank 0 speaks
        print(run.summary())
    return 0


def _heal(args: argparse.Namespace) -> int:
    print(workflow.heal(args.artifact, args.out, steps=args.steps, lr=args.lr, scope=args.scope, data=args.data, eval_samples=args.eval_samples,
                        evaluate=not args.no_eval, seed=args.seed, threads=args.threads, force=args.force, resume=args.resume,
                        progress=not args.quiet, device=args.device).summary())
    return 0


def _eval(args: argparse.Namespace) -> int:
    run = workflow.perplexity(args.model, args.text, window=args.window, stride=args.stride, batch_size=args.batch_size,
                              source=not args.no_source, threads=args.threads, progress=not args.quiet)
    print(json.dumps(run.report, indent=2) if args.json else run.summary())
    return 0


def _info(args: argparse.Namespace) -> int:
    print(workflow.info(args.artifact).summary())
    return 0


def _dump(args: argparse.Namespace) -> int:
    if args.diff:
        text = workflow.compare_dumps(*args.diff)
        print(text if text else f"no difference between {args.diff[0]} and {args.diff[1]}", end="" if text else "\n")
        return 0
    if not args.model or not args.out:
        raise ConfigError("tngraph dump needs --model and --out (or --diff A B)", "e.g. tngraph dump --model minilm --budget 0.5 --out dump/")
    print(workflow.dump(args.model, args.out, calibration=args.calibration, force=args.force, evaluate=not args.no_eval,
                        threads=args.threads, **_options(args)).summary())
    return 0


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
    engine = build_engine(args.onnx, args.out, precision="fp16" if args.fp16 else "bf16" if args.bf16 else None,
                          workspace_gb=args.workspace_gb, batch=args.batch, sequence=args.sequence, force=args.force)
    print(f"TensorRT {engine.tensorrt_version} engine {engine.path} ({engine.bytes / 1e6:.1f} MB, {engine.precision}) in {engine.seconds:.1f} s")
    for name, (lo, opt, hi) in engine.profile.items():
        print(f"  profile {name}: min {lo}, opt {opt}, max {hi}")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    print(workflow.export_onnx(args.model, args.out, batch=args.batch, length=args.length, dtype=args.dtype, tolerance=args.tolerance,
                               static=args.static, opset=args.opset, force=args.force, quant_ops=args.quant_ops).summary())
    return 0


COMMANDS = {"info": _info, "heal": _heal, "export": _export, "dump": _dump, "eval": _eval, "compress": _compress, "demo": _compress}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    _setup_logging(args)
    if args.command == "demo":
        args.model = "minilm"
    try:
        return COMMANDS[args.command](args)
    except TngraphError as exc:
        print(f"tngraph: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None) or getattr(args, "artifact", None)
        if out and os.path.isdir(workflow.checkpoint_dir(out)):
            print(f"tngraph: interrupted; the artifact was not written, healing's state is in {workflow.checkpoint_dir(out)} "
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
    if args.command not in ("info", "eval"):  # transformers' own warnings are not the user's business here
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
