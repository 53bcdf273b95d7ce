"""Pass instruments: what the pass manager calls around every pass, beside the pass itself.

Linting, timing, dumping and tracing are instruments, not code in the manager's loop (as TVM's
PassInstrument and torch.fx's GraphTransformObserver). An instrument implements any of the hooks
below; the manager calls them in order for every instrument it was given (by default the ones the
Config asks for, `default_instruments`).

- `begin(gm, ctx)`: before the first pass of a run_passes call.
- `verify(name, gm, ctx)`: after a pass, inside its error handling: a failure here is the pass's.
- `after(step, gm, ctx)`: after a pass succeeded.
- `failed(step, gm, ctx, exc) -> str`: after a pass failed; what it says is added to the error.
- `end(gm, ctx, passes)`: after the last pass.
"""
from __future__ import annotations

import logging
import pathlib
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from .debug import DumpState, write_pass_dump, write_report
from .debug.dump import trace_pass
from .debug.report import collect_spectra
from .passes import PassContext, PassResult

log = logging.getLogger(__name__)


@dataclass
class Step:
    """One pass as the instruments see it: its place in the pipeline, name, result and cost."""

    index: int
    name: str
    seconds: float
    result: PassResult | None = None
    counters: dict[str, int] = field(default_factory=dict)  # the counters this pass moved

    def info(self) -> dict[str, Any]:
        summary = self.result.summary if self.result is not None else {}
        return {"pass": self.name, "seconds": round(self.seconds, 4), "summary": summary, "counters": self.counters}


class Instrument:
    """The hooks, each doing nothing; subclasses implement the ones they need."""

    def begin(self, gm: fx.GraphModule, ctx: PassContext) -> None: ...

    def verify(self, name: str, gm: fx.GraphModule, ctx: PassContext) -> None: ...

    def after(self, step: Step, gm: fx.GraphModule, ctx: PassContext) -> None: ...

    def failed(self, step: Step, gm: fx.GraphModule, ctx: PassContext, exc: Exception) -> str:
        return ""

    def end(self, gm: fx.GraphModule, ctx: PassContext, passes: int) -> None: ...


class Lint(Instrument):
    """graph.lint() after every pass (Config.check_graph)."""

    def verify(self, name: str, gm: fx.GraphModule, ctx: PassContext) -> None:
        gm.graph.lint()


class Timing(Instrument):
    """Seconds per pass into ctx.timings (summed over calls), and a log line per pass."""

    def after(self, step: Step, gm: fx.GraphModule, ctx: PassContext) -> None:
        ctx.timings[step.name] = ctx.timings.get(step.name, 0.0) + step.seconds
        log.info("pass %s: %.2fs, modified=%s, %s", step.name, step.seconds, step.result.modified, step.result.summary)


class Trace(Instrument):
    """Without a dump folder: the structured-trace artifacts of every pass that changed the graph
    (only when TORCH_TRACE is set)."""

    def after(self, step: Step, gm: fx.GraphModule, ctx: PassContext) -> None:
        if step.result.modified:
            trace_pass(f"{step.index:02d}_{step.name}", gm, step.info())


class Dump(Instrument):
    """Config.dump_dir (TNGRAPH_DUMP): the captured graph, a folder per pass that changed the graph,
    numbered by its place in the pipeline (calls after the first go on numbering), the graph a pass
    failed on, and index.html rewritten at the end and after a failure. Its state (the folder's
    numbering) is kept in ctx.instrument_state across run_passes calls."""

    def __init__(self, root: str | pathlib.Path):
        self.root = pathlib.Path(root)

    def state(self, ctx: PassContext) -> DumpState:
        state = ctx.instrument_state.get("dump")
        if state is None or state.root != self.root:
            state = ctx.instrument_state["dump"] = DumpState(self.root)
        return state

    def begin(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        state = self.state(ctx)
        if not state.folders:
            write_pass_dump(state, 0, "captured", gm, {"pass": "captured"})
            collect_spectra(state, gm)

    def after(self, step: Step, gm: fx.GraphModule, ctx: PassContext) -> None:
        if step.result.modified:
            state = self.state(ctx)
            write_pass_dump(state, step.index, step.name, gm, step.info())
            collect_spectra(state, gm)

    def failed(self, step: Step, gm: fx.GraphModule, ctx: PassContext, exc: Exception) -> str:
        """Dump the graph the pass failed on and rewrite index.html; what was written, for the
        error's message. A failure here is logged and said in the message, never raised: it would
        hide the pass's own error."""
        state = self.state(ctx)
        try:
            info = {"pass": step.name, "error": repr(exc), "seconds": step.seconds}
            where = f"graph dumped to {write_pass_dump(state, step.index, step.name, gm, info, failed=True)}"
        except Exception as dump_exc:
            log.warning("tngraph dump: the graph pass %r failed on was not dumped: %s: %s", step.name, type(dump_exc).__name__, dump_exc,
                        exc_info=True)
            where = f"graph not dumped ({type(dump_exc).__name__}: {dump_exc})"
        index_html = self.report(gm, ctx)
        report = f"report: {index_html}" if index_html is not None else f"{state.root / 'index.html'} not written, see the log"
        return f"; {where} ({report})"

    def end(self, gm: fx.GraphModule, ctx: PassContext, passes: int) -> None:
        self.state(ctx).base += passes
        self.report(gm, ctx)

    def report(self, gm: fx.GraphModule, ctx: PassContext) -> pathlib.Path | None:
        """Write index.html; its path, or None (logged) when it could not be written."""
        state = self.state(ctx)
        try:
            return write_report(state, gm, ctx)
        except Exception as exc:  # the report must never hide the pass's own result or error
            log.warning("tngraph dump: %s not written: %s: %s", state.root / "index.html", type(exc).__name__, exc, exc_info=True)
            return None


def dump_state(ctx: PassContext) -> DumpState | None:
    """The dump folder's state of this context (after run_passes with a dump_dir), else None."""
    return ctx.instrument_state.get("dump")


def default_instruments(ctx: PassContext) -> list[Instrument]:
    """What the Config asks for: lint (check_graph), timing, and a dump folder (dump_dir) or traces."""
    out: list[Instrument] = [Lint()] if ctx.config.check_graph else []
    out.append(Timing())
    out.append(Dump(ctx.config.dump_dir) if ctx.config.dump_dir else Trace())
    return out
