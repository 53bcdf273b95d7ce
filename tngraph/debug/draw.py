"""Graph drawings: fx graph -> networkx DiGraph (GraphML for users' own analysis) and -> Graphviz
(pydot) SVG with one box per module, the nodes a tngraph pass created in red."""
from __future__ import annotations

import functools
import logging
import pathlib
import re
import shutil
from typing import Any

import networkx as nx
import torch.fx as fx

from .table import graph_rows

log = logging.getLogger(__name__)

# above this many nodes dot's layout takes minutes: the SVG is skipped (GraphML and the table stay)
MAX_DRAWN_NODES = 4000
_COLOURS = {"placeholder": "#d9ead3", "output": "#d9ead3", "get_attr": "#fff2cc", "call_function": "#ffffff", "call_module": "#cfe2f3"}


def to_networkx(gm: fx.GraphModule, rows: list[dict[str, Any]] | None = None) -> nx.DiGraph:
    """One graph node per fx node (attributes: op, target, shape, dtype, params, flops, tngraph, module)."""
    graph = nx.DiGraph(name=type(gm).__name__)
    for row in rows if rows is not None else graph_rows(gm):
        attrs = {k: ("" if v is None else v) for k, v in row.items() if k not in ("node", "inputs")}
        graph.add_node(row["node"], **attrs)
        for source in row["inputs"]:
            graph.add_edge(source, row["node"])
    return graph


def write_graphml(gm: fx.GraphModule, path: pathlib.Path, rows: list[dict[str, Any]] | None = None) -> None:
    nx.write_graphml(to_networkx(gm, rows), str(path))


@functools.lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
    log.warning("graph drawings skipped: %s", reason)


def _dot_available() -> str | None:
    try:
        import pydot  # noqa: F401
    except ImportError:
        return "pydot is not installed (pip install pydot)"
    if shutil.which("dot") is None:
        return "Graphviz's `dot` is not on PATH (apt-get install graphviz)"
    return None


def _cluster_key(module: str) -> str:
    """Module boxes two levels deep below numbered blocks: encoder.layer.3.attention.self -> encoder.layer.3.attention."""
    parts = module.split(".") if module else []
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 2])
    return ".".join(parts[:2])


def to_pydot(gm: fx.GraphModule, rows: list[dict[str, Any]] | None = None) -> Any:
    import pydot

    dot = pydot.Dot(graph_type="digraph", rankdir="TB", fontname="Helvetica", fontsize="10")
    dot.set_node_defaults(shape="box", style="rounded,filled", fontname="Helvetica", fontsize="9", height="0.2")
    clusters: dict[str, Any] = {}
    rows = rows if rows is not None else graph_rows(gm)
    for row in rows:
        label = f"{row['node']}\\n{row['target'] if row['op'] != 'placeholder' else 'input'}"
        if row["shape"]:
            label += f"\\n{row['shape']} {row['dtype']}"
        colour = "#f4cccc" if "from=" in row["tngraph"] else _COLOURS.get(row["op"], "#ffffff")
        node = pydot.Node(_quote(row["node"]), label=_quote(label), fillcolor=colour, tooltip=_quote(row["tngraph"] or row["target"]))
        key = _cluster_key(row["module"])
        if key:
            if key not in clusters:
                clusters[key] = pydot.Cluster(re.sub(r"\W", "_", key), label=_quote(key), style="rounded", color="#999999")
                dot.add_subgraph(clusters[key])
            clusters[key].add_node(node)
        else:
            dot.add_node(node)
    for row in rows:
        for source in row["inputs"]:
            dot.add_edge(pydot.Edge(_quote(source), _quote(row["node"])))
    return dot


def _quote(text: str) -> str:
    return '"' + str(text).replace('"', "'") + '"'


def write_drawings(gm: fx.GraphModule, folder: pathlib.Path, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """graph.graphml always; graph.dot and graph.svg when pydot and Graphviz are there (else the reason, logged once)."""
    rows = rows if rows is not None else graph_rows(gm)
    write_graphml(gm, folder / "graph.graphml", rows)
    nodes = len(gm.graph.nodes)
    reason = _dot_available()
    if reason is None and nodes > MAX_DRAWN_NODES:
        reason = f"{nodes} nodes (more than {MAX_DRAWN_NODES}: Graphviz would take minutes)"
    if reason is not None:
        _warn_once(reason)
        return {"graphml": "graph.graphml", "svg": None, "reason": reason}
    dot = to_pydot(gm, rows)
    (folder / "graph.dot").write_text(dot.to_string(), encoding="utf-8")
    try:
        svg = dot.create_svg()
    except Exception as exc:  # dot crashed or timed out: keep the .dot, say why
        _warn_once(f"Graphviz failed: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}")
        return {"graphml": "graph.graphml", "dot": "graph.dot", "svg": None, "reason": str(exc)[:200]}
    (folder / "graph.svg").write_bytes(svg)
    return {"graphml": "graph.graphml", "dot": "graph.dot", "svg": "graph.svg"}
