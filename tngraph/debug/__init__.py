"""Pass-level debugging: graph dumps (table, diff, drawing, GraphML), the index.html report, diffs of two dumps."""
from .dump import DumpState, compare_dumps, write_pass_dump
from .table import graph_table
from .report import write_report

__all__ = ["DumpState", "compare_dumps", "graph_table", "write_pass_dump", "write_report"]
