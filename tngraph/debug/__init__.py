"""Pass-level debugging: readable graph dumps."""
from .dump import graph_table, write_pass_dump

__all__ = ["graph_table", "write_pass_dump"]
