"""Triton kernels of tngraph's fused ops (installed as `tngraph.kernels`).

Importing this package needs triton; `tngraph.ops` imports it only when a kernel is about to run,
so the CPU path never does.
"""
