"""The command line's workflows as Python calls, one call per command (tngraph/cli.py only parses
arguments, calls these and prints): ``compress`` reproduces ``tngraph compress``, ``heal``,
``perplexity`` (``tngraph eval``), ``dump``, ``info`` and ``export_onnx`` the others. Nothing here
prints; progress and decisions are logged (logger "tngraph.workflow")."""
from .artifacts import ArtifactInfo, OnnxRun, export_onnx, info
from .common import TextSets, builtin_texts, checkpoint_dir, compress_texts, fit_length, set_threads, whole_graph_config
from .compress import (BLOCKWISE_BYTES, WorkflowResult, compress, compress_blockwise, compress_graph, given_options, use_blockwise)
from .dump import DumpRun, compare_dumps, dump
from .heal import HealRun, heal
from .measure import build_report, model_inputs, per_target, unhealed
from .perplexity import PerplexityRun, perplexity

__all__ = [
    "ArtifactInfo", "BLOCKWISE_BYTES", "DumpRun", "HealRun", "OnnxRun", "PerplexityRun", "TextSets",
    "WorkflowResult", "build_report", "builtin_texts", "checkpoint_dir", "compare_dumps", "compress", "compress_blockwise",
    "compress_graph", "compress_texts", "dump", "given_options", "export_onnx", "fit_length", "heal", "info", "model_inputs", "per_target",
    "perplexity", "set_threads", "unhealed", "use_blockwise", "whole_graph_config",
]
