"""The pass manager: runs a declared list of passes, checks their contracts, calls the instruments."""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch.fx as fx

from .errors import PassError, TngraphError
from .instruments import Instrument, Step, default_instruments
from .passes import PIPELINE, PassContext, PassFn, PassResult

log = logging.getLogger(__name__)


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes: Sequence[PassFn] = PIPELINE,
               instruments: Sequence[Instrument] | None = None) -> fx.GraphModule:
    """Run `passes` in order. Before each, its declared requirements are checked against what the
    passes run so far on this context produced (ctx.produced); a failure names the pass and those
    before it, with what the instruments add (the dump's folder). `instruments` default to the
    Config's (tngraph.instruments.default_instruments)."""
    instruments = default_instruments(ctx) if instruments is None else list(instruments)
    for instrument in instruments:
        instrument.begin(gm, ctx)
    base = _dump_base(ctx)
    ctx.passes = tuple(p.__name__ for p in passes)
    for index, pass_fn in enumerate(passes, start=base + 1):
        gm = _run_one(gm, ctx, pass_fn, index, instruments)
    ctx.current_pass = ""
    for instrument in instruments:
        instrument.end(gm, ctx, len(passes))
    return gm


def _dump_base(ctx: PassContext) -> int:
    state = ctx.instrument_state.get("dump")
    return state.base if state is not None else 0


def _run_one(gm: fx.GraphModule, ctx: PassContext, pass_fn: PassFn, index: int, instruments: Sequence[Instrument]) -> fx.GraphModule:
    name = pass_fn.__name__
    _check_requirements(pass_fn, ctx)
    ctx.current_pass = name
    before = dict(ctx.counters)
    start = time.perf_counter()
    try:
        result: PassResult = pass_fn(gm, ctx)
        for instrument in instruments:
            instrument.verify(name, result.gm, ctx)
    except Exception as exc:
        step = Step(index, name, time.perf_counter() - start)
        said = "".join(instrument.failed(step, gm, ctx, exc) for instrument in instruments)
        where = _where(name, ctx.history)
        if isinstance(exc, TngraphError):
            raise type(exc)(f"{exc.problem} [{where}{said}]", exc.fix) from exc
        raise PassError(
            f"{where} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{said}",
            "this is a tngraph bug unless the message names your model's code; rerun with TNGRAPH_DUMP=dir and report it",
        ) from exc
    moved = {k: v - before.get(k, 0) for k, v in ctx.counters.items() if v != before.get(k, 0)}
    step = Step(index, name, time.perf_counter() - start, result, moved)
    ctx.history.append(name)
    ctx.produced |= getattr(pass_fn, "produces", frozenset())
    for instrument in instruments:
        instrument.after(step, result.gm, ctx)
    return result.gm


def _check_requirements(pass_fn: PassFn, ctx: PassContext) -> None:
    missing = sorted(getattr(pass_fn, "requires", frozenset()) - ctx.produced)
    if missing:
        producers = sorted({p.__name__ for p in PIPELINE if set(missing) & getattr(p, "produces", set())})
        raise PassError(f"pass {pass_fn.__name__!r} requires {', '.join(missing)}, which no pass run so far on this context produced "
                        f"(after: {', '.join(ctx.history) or 'none'})",
                        f"run {', '.join(producers) or 'the passes that produce them'} before it (tngraph.passes.PIPELINE gives the order)")


def _where(name: str, history: list[str]) -> str:
    before = ", ".join(history) if history else "none"
    return f"pass {name!r} (after: {before})"
