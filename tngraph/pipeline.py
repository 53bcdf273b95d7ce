"""The pass manager: runs a declared list of passes, timing, linting and dumping each one."""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch.fx as fx

from .debug import write_pass_dump
from .errors import PassError, TngraphError
from .passes import PIPELINE, PassContext, PassFn, PassResult

log = logging.getLogger(__name__)


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes: Sequence[PassFn] = PIPELINE) -> fx.GraphModule:
    """Run `passes` in order. A failure names the pass and those before it, and dumps the graph."""
    dump_dir = ctx.config.dump_dir
    if dump_dir:
        write_pass_dump(dump_dir, 0, "captured", gm, {"pass": "captured"})
    for index, pass_fn in enumerate(passes, start=1):
        name = pass_fn.__name__
        ctx.current_pass = name
        before = dict(ctx.counters)
        start = time.perf_counter()
        try:
            result: PassResult = pass_fn(gm, ctx)
            if ctx.config.check_graph:
                result.gm.graph.lint()
        except Exception as exc:
            elapsed = time.perf_counter() - start
            where = _where(name, ctx.history)
            dumped = ""
            if dump_dir:
                folder = write_pass_dump(dump_dir, index, name, gm, {"pass": name, "error": repr(exc), "seconds": elapsed}, failed=True)
                dumped = f"; graph dumped to {folder}"
            if isinstance(exc, TngraphError):
                raise type(exc)(f"{exc.problem} [{where}{dumped}]", exc.fix) from exc
            raise PassError(
                f"{where} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{dumped}",
                "this is a tngraph bug unless the message names your model's code; rerun with TNGRAPH_DUMP=dir and report it",
            ) from exc
        elapsed = time.perf_counter() - start
        gm = result.gm
        ctx.timings[name] = ctx.timings.get(name, 0.0) + elapsed
        ctx.history.append(name)
        fired = {k: v - before.get(k, 0) for k, v in ctx.counters.items() if v != before.get(k, 0)}
        log.info("pass %s: %.2fs, modified=%s, %s", name, elapsed, result.modified, result.summary)
        if dump_dir and result.modified:
            info = {"pass": name, "seconds": round(elapsed, 4), "summary": result.summary, "counters": fired}
            write_pass_dump(dump_dir, index, name, gm, info)
    ctx.current_pass = ""
    return gm


def _where(name: str, history: list[str]) -> str:
    before = ", ".join(history) if history else "none"
    return f"pass {name!r} (after: {before})"
