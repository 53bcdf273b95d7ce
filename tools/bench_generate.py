#!/usr/bin/env python
"""Speculative decoding with the compressed model as the draft of its dense source: tokens/s and
acceptance rate against dense-only greedy decoding, measured in one run.

  python tools/bench_generate.py --model DENSE_DIR --draft ARTIFACT_DIR [--batch 1,8] [--new-tokens 64]
         [--prompt-tokens 32] [--draft-tokens 4] [--repeats 3] [--threads 2] [--json FILE]

Per batch size, on prompts cut from the built-in held-out documents (never calibrated or healed on):
  dense        target.generate(do_sample=False): the reference output and speed
  draft alone  the compressed model decoding by itself (how much cheaper a draft step is)
  hf-assisted  target.generate(assistant_model=draft), transformers' own (batch 1 only)
  tngraph      tngraph.speculative.generate (any batch; rejected drafts masked, no cache cropping)
Every speculative output is compared token for token with the dense greedy output; a mismatch is
reported and the exit code is 1. Times are medians of interleaved repeats (after one warm-up each).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the dense causal-LM folder (the target)")
    p.add_argument("--draft", required=True, help="an artifact compressed from it (tngraph compress)")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--draft-tokens", type=int, default=4, help="draft tokens proposed per target forward (default 4)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from tngraph import lm, speculative
    from tngraph.data import lm_documents
    from tngraph.errors import TngraphError

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        target, tokenizer, recipe = lm.load(args.model)
        draft, _, draft_recipe = lm.load(args.draft)
        batches = [int(b) for b in args.batch.split(",")]
    except (TngraphError, ValueError) as exc:
        print(f"bench_generate: error: {exc}", file=sys.stderr)
        return 2
    if recipe is not None or draft_recipe is None:
        print("bench_generate: error: --model must be a dense folder and --draft an artifact compressed from it", file=sys.stderr)
        return 2
    target.to(device)
    draft.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    docs = [ids for ids in tokenizer(lm_documents().heldout)["input_ids"] if len(ids) >= args.prompt_tokens]
    if len(docs) < max(batches):
        print(f"bench_generate: error: only {len(docs)} held-out documents hold {args.prompt_tokens} tokens", file=sys.stderr)
        return 2
    calls = {"target": 0}
    target.register_forward_pre_hook(lambda *_: calls.__setitem__("target", calls["target"] + 1))
    greedy = dict(do_sample=False, max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    rows, failed = [], False
    for batch in batches:
        ids = torch.tensor([d[: args.prompt_tokens] for d in docs[:batch]], device=device)
        mask = torch.ones_like(ids)
        methods = {
            "dense": lambda: (target.generate(ids, attention_mask=mask, **greedy), None),
            "draft alone": lambda: (draft.generate(ids, attention_mask=mask, **greedy), None),
            "tngraph": lambda: speculative.generate(target, draft, ids, mask, max_new_tokens=args.new_tokens, draft_tokens=args.draft_tokens),
        }
        if batch == 1:
            methods["hf-assisted"] = lambda: (target.generate(ids, attention_mask=mask, assistant_model=draft, **greedy), None)
        times = {name: [] for name in methods}
        outputs, stats, target_calls = {}, {}, {}
        for rep in range(args.repeats + 1):  # the first round warms up
            for name, run in methods.items():
                calls["target"] = 0
                sync()
                start = time.perf_counter()
                with torch.no_grad():
                    out, st = run()
                sync()
                elapsed = time.perf_counter() - start
                if rep:
                    times[name].append(elapsed)
                outputs[name], stats[name], target_calls[name] = out, st, calls["target"]
        ref = outputs["dense"]
        for name in methods:
            seconds = statistics.median(times[name])
            same = None if name in ("dense", "draft alone") else bool(torch.equal(outputs[name], ref))
            failed |= same is False
            st = stats[name]
            row = {"batch": batch, "method": name, "seconds": seconds, "tokens_per_s": batch * args.new_tokens / seconds,
                   "target_forwards": target_calls[name] if name != "draft alone" else 0, "identical_to_dense": same,
                   "acceptance_rate": st.acceptance_rate if st is not None else None}
            rows.append(row)
    dense_rate = {r["batch"]: r["tokens_per_s"] for r in rows if r["method"] == "dense"}
    where = f"{args.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"greedy decoding on {where}, {args.prompt_tokens}-token prompts + {args.new_tokens} new tokens, "
          f"{args.draft_tokens} draft tokens per target forward, median of {args.repeats}")
    print(f"{'batch':>5}  {'method':12} {'tokens/s':>10} {'vs dense':>9} {'accept':>7} {'target fwd':>10}  identical")
    for r in rows:
        acc = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.3f}"
        same = "-" if r["identical_to_dense"] is None else ("yes" if r["identical_to_dense"] else "NO")
        r["ratio_vs_dense"] = r["tokens_per_s"] / dense_rate[r["batch"]]
        print(f"{r['batch']:>5}  {r['method']:12} {r['tokens_per_s']:>10.1f} {r['ratio_vs_dense']:>9.3f} {acc:>7} {r['target_forwards']:>10}  {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": {**vars(args), "device": str(device)}, "rows": rows}, f, indent=2)
    if failed:
        print("bench_generate: a speculative output differs from the dense greedy output", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
