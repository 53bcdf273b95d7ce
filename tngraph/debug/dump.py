"""Graph dumps: one folder per pass that changed the graph (and one for a pass that failed), each
with the graph as a table, its diff against the previous dump, the drawing, a GraphML copy, the
generated code and the pass's counters and time; a structured-trace artifact for tlparse."""
from __future__ import annotations

import difflib
import json
import logging
import pathlib
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from ..ownership import mark
from .table import diff_lines, graph_rows, graph_table

log = logging.getLogger(__name__)

TABLE = "graph.txt"
DIFF = "graph.diff"
PASS_INFO = "pass.json"


@dataclass
class DumpState:
    """Numbering and the previous table of one dump folder, kept across run_passes calls."""

    root: pathlib.Path
    next_index: int = 0
    previous: str | None = None
    previous_name: str | None = None
    folders: list[pathlib.Path] = field(default_factory=list)
    base: int = 0  # folder number of the pass before the current run_passes call's first
    extra: dict[str, Any] = field(default_factory=dict)  # what the report gathers on the way (spectra, measurements)


def unified_diff(before: str, after: str, a: str, b: str) -> str:
    return "".join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True), fromfile=a, tofile=b, n=2))


def write_pass_dump(state: DumpState | str | pathlib.Path, index: int | None, name: str, gm: fx.GraphModule, info: dict[str, Any],
                    failed: bool = False) -> pathlib.Path:
    """Write the dump of `gm` after pass `name` as folder NN_name (NN_name.failed for a failure)."""
    from .draw import write_drawings

    if not isinstance(state, DumpState):
        state = DumpState(pathlib.Path(state), next_index=index or 0)
    number = state.next_index if index is None else index
    state.next_index = number + 1
    folder = state.root / f"{number:02d}_{name}{'.failed' if failed else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = graph_rows(gm)  # once: the table, the diff lines and the drawings all read it
    table = graph_table(gm, rows)
    (folder / TABLE).write_text(table, encoding="utf-8")
    lines = diff_lines(gm, rows)
    if state.previous is not None:
        (folder / DIFF).write_text(unified_diff(state.previous, lines, state.previous_name or "", folder.name), encoding="utf-8")
    (folder / "code.py").write_text(gm.code, encoding="utf-8")
    info = {**info, "nodes": len(gm.graph.nodes), "failed": failed}
    info["drawing"] = write_drawings(gm, folder, rows)
    (folder / PASS_INFO).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    _trace(folder.name, table, info)
    (folder / "graph.lines").write_text(lines, encoding="utf-8")  # what `tngraph dump --diff` compares
    state.previous, state.previous_name = lines, folder.name
    state.folders.append(folder)
    mark(state.root, "dump", [folder.name], add=True)  # the folder is tngraph's: a later `tngraph dump --force` may replace it
    return folder


def trace_pass(name: str, gm: fx.GraphModule, info: dict[str, Any]) -> None:
    """Without a dump folder: only the structured-trace artifacts of a pass (when TORCH_TRACE is set)."""
    import os

    if os.environ.get("TORCH_TRACE"):
        _trace(name, graph_table(gm), info)


def _trace(name: str, table: str, info: dict[str, Any]) -> None:
    """Structured-trace artifacts (TORCH_TRACE=dir; tlparse lists them beside dynamo's own)."""
    try:
        from torch._logging import trace_structured
    except ImportError:
        return
    trace_structured("artifact", metadata_fn=lambda: {"name": f"tngraph_{name}", "encoding": "string"}, payload_fn=lambda: table)
    trace_structured("artifact", metadata_fn=lambda: {"name": f"tngraph_{name}_pass", "encoding": "json"},
                     payload_fn=lambda: json.dumps(info, default=str))


def compare_dumps(a: str | pathlib.Path, b: str | pathlib.Path) -> str:
    """The unified diff of two pass folders' tables (or two table files)."""
    from ..errors import DataError

    texts = []
    for path in (pathlib.Path(a), pathlib.Path(b)):
        table = path / "graph.lines" if path.is_dir() else path
        if not table.is_file():
            raise DataError(f"{str(path)!r} is not a pass folder of a dump (no graph.lines)", "pass two NN_pass folders written by `tngraph dump`")
        texts.append(table.read_text(encoding="utf-8"))
    return unified_diff(texts[0], texts[1], str(a), str(b))
