"""The pass manager: runs a declared list of passes, timing, linting and dumping each one."""
from __future__ import annotations

import logging
import pathlib
import time
from typing import Sequence

import torch.fx as fx

from .debug import DumpState, write_pass_dump, write_report
from .debug.dump import trace_pass
from .debug.report import collect_spectra
from .errors import PassError, TngraphError
from .passes import PIPELINE, PassContext, PassFn, PassResult

log = logging.getLogger(__name__)


def dump_state(ctx: PassContext) -> DumpState | None:
    """The dump folder's state for this context (kept across run_passes calls), or None without dump_dir."""
    if not ctx.config.dump_dir:
        return None
    state = ctx.analysis.get("dump", {}).get("state")
    if state is None or str(state.root) != str(pathlib.Path(ctx.config.dump_dir)):
        state = DumpState(pathlib.Path(ctx.config.dump_dir))
        ctx.analysis.setdefault("dump", {})["state"] = state
    return state


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes: Sequence[PassFn] = PIPELINE) -> fx.GraphModule:
    """Run `passes` in order. A failure names the pass and those before it, and dumps the graph.

    With dump_dir (TNGRAPH_DUMP), every pass that changed the graph leaves a folder numbered by its
    place in the pipeline (calls after the first go on numbering), and index.html is rewritten at
    the end and after a failure."""
    state = dump_state(ctx)
    if state is not None and not state.folders:
        write_pass_dump(state, 0, "captured", gm, {"pass": "captured"})
        collect_spectra(state, gm)
    base = state.base if state is not None else 0
    for index, pass_fn in enumerate(passes, start=base + 1):
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
            dumped = _failure_dump(state, index, name, gm, ctx, exc, elapsed) if state is not None else ""
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
        if result.modified:
            info = {"pass": name, "seconds": round(elapsed, 4), "summary": result.summary, "counters": fired}
            if state is not None:
                write_pass_dump(state, index, name, gm, info)
                collect_spectra(state, gm)
            else:
                trace_pass(f"{index:02d}_{name}", gm, info)
    ctx.current_pass = ""
    if state is not None:
        state.base = base + len(passes)
        _report(state, gm, ctx)
    return gm


def _failure_dump(state: DumpState, index: int, name: str, gm: fx.GraphModule, ctx: PassContext, exc: Exception, elapsed: float) -> str:
    """Dump the graph the pass failed on and rewrite index.html; what was written, for the error's message.

    A failure here is logged and said in the message, never raised: it would hide the pass's own error."""
    try:
        where = f"graph dumped to {write_pass_dump(state, index, name, gm, {'pass': name, 'error': repr(exc), 'seconds': elapsed}, failed=True)}"
    except Exception as dump_exc:
        log.warning("tngraph dump: the graph pass %r failed on was not dumped: %s: %s", name, type(dump_exc).__name__, dump_exc, exc_info=True)
        where = f"graph not dumped ({type(dump_exc).__name__}: {dump_exc})"
    index_html = _report(state, gm, ctx)
    report = f"report: {index_html}" if index_html is not None else f"{state.root / 'index.html'} not written, see the log"
    return f"; {where} ({report})"


def _report(state: DumpState, gm: fx.GraphModule, ctx: PassContext) -> pathlib.Path | None:
    """Write index.html; its path, or None (logged) when it could not be written."""
    try:
        return write_report(state, gm, ctx)
    except Exception as exc:  # the report must never hide the pass's own result or error
        log.warning("tngraph dump: %s not written: %s: %s", state.root / "index.html", type(exc).__name__, exc, exc_info=True)
        return None


def _where(name: str, history: list[str]) -> str:
    before = ", ".join(history) if history else "none"
    return f"pass {name!r} (after: {before})"
