"""`tngraph dump` as one Python call: compress with a dump of every pass (table, diff, drawing,
GraphML) and an index.html; and the diff of two pass folders."""
from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..errors import TngraphError
from .common import calibration_only, fit_length, load_with_tokenizer, uses_threads, whole_graph_config

DUMP_LATENCY_SHAPE = (8, 128)  # rows x tokens of the dump's latency measurement


@dataclass
class DumpRun:
    """What `dump` wrote: the pass folders, index.html, and the latency measurement (empty without evaluate)."""

    out: str | os.PathLike
    folders: list[pathlib.Path]
    index: str
    measurements: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """What `tngraph dump` prints."""
        m = self.measurements
        lines = [f"dumped {len(self.folders)} passes to {self.out}: " + ", ".join(f.name for f in self.folders)]
        if m:
            lines.append(f"latency {m['shape']} ({m['threads']} threads): dense {m['dense_ms']:.1f} ms, "
                         f"compressed {m['compressed_ms']:.1f} ms ({m['compressed_ms'] / m['dense_ms']:.3f})")
        lines.append(f"report: {os.path.abspath(self.index)}")
        return "\n".join(lines)


def compare_dumps(a: str | os.PathLike, b: str | os.PathLike) -> str:
    """The unified diff of two pass folders ("" when they are the same)."""
    from ..debug import compare_dumps as diff

    return diff(a, b)


@uses_threads
def dump(model: str, out: str | os.PathLike, config: Config | None = None, *, calibration: str | None = None, force: bool = False,
         evaluate: bool = True, threads: int = 2, **options: Any) -> DumpRun:
    """`tngraph dump --model MODEL --out OUT ...` as one call: the compress options (healing off
    unless heal_steps is given: it is not a graph pass), the dump written to `out`."""
    import torch

    from ..api import compress_with_result
    from ..debug import write_report
    from ..instruments import dump_state
    from ..evaluate import latency, latency_inputs
    from ..models import resolve, source_folder
    from ..ownership import check_output_dir, fresh_dir

    source = resolve(model)
    if config is None:
        options = {"heal_steps": 0, **options}
    keep = [source_folder(source), calibration]
    check_output_dir(out, force, keep=keep)  # refused before any work
    config = whole_graph_config(source, config, options).replace(dump_dir=str(out))
    module, tokenizer = load_with_tokenizer(source, model)
    config = fit_length(config, module)
    texts = calibration_only(config, calibration)
    fresh_dir(out, force, kind="dump", keep=keep)  # an old dump is emptied now; anything else was refused
    try:
        result = compress_with_result(module, calibration=texts, config=config, tokenizer=tokenizer, source=source)
    except TngraphError as exc:
        raise TngraphError(f"{exc.problem}; the dump of every pass up to it is in {out} (open index.html)", exc.fix) from exc
    state = dump_state(result.context)
    measurements: dict[str, Any] = {}
    if evaluate:
        rows, length = DUMP_LATENCY_SHAPE
        times = latency({"dense": module, "compressed": result.module}, latency_inputs(tokenizer.vocab_size, rows, length, config.seed))
        measurements = {"dense_ms": times["dense"] * 1e3, "compressed_ms": times["compressed"] * 1e3, "shape": f"{rows}x{length}",
                        "threads": torch.get_num_threads()}
    index = write_report(state, result.graph, result.context, measurements)
    return DumpRun(out, list(state.folders), index, measurements)
