"""tngraph: compress trained PyTorch models by rewriting their graphs into tensor networks."""
from __future__ import annotations

__version__ = "0.1.0"

import logging

from .api import CompressResult, compress, compress_with_result
from .artifact import load, save
from .capture import capture
from .config import Config
from .errors import ArtifactError, CaptureError, ConfigError, DataError, ExportError, ModelError, PassError, TngraphError
from .layers.quant import compile_options
from .lowering.onnx import OnnxExport, export_onnx
from .passes import PassContext, PassResult
from .samples import TensorSamples, read_calibration

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "ArtifactError",
    "CaptureError",
    "CompressResult",
    "Config",
    "ConfigError",
    "DataError",
    "ExportError",
    "ModelError",
    "OnnxExport",
    "PassContext",
    "PassError",
    "PassResult",
    "TensorSamples",
    "TngraphError",
    "capture",
    "compile_options",
    "compress",
    "compress_with_result",
    "export_onnx",
    "load",
    "read_calibration",
    "save",
]
