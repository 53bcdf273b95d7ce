"""Factorized layer kinds, each defined once by a reference forward (tngraph.layers.base): one file per kind."""
from .base import Layer, LayerLinear, call_inputs, define, expand, inline
from .conv import CONV, CONV_CP, CONV_LAYERS, CONV_TUCKER
from .lowrank import LOWRANK
from .lrbd import LRBD
from .network import NETWORK
from .quant import QFACTORS, QLOWRANK, QUANT, QUANT_LAYERS
from ..tn.formats import FORMATS

LAYERS: dict[str, Layer] = {layer.name: layer for layer in (LOWRANK, NETWORK, LRBD, CONV, CONV_TUCKER, CONV_CP, QUANT, QLOWRANK, QFACTORS)}
OPS = {layer.op: layer for layer in LAYERS.values()}  # tngraph::<name>.default -> its layer


def layer_for(format_name: str, conv: bool = False) -> Layer:
    """The layer a plan's format becomes: the low-rank layer (lowrank, svd), the format's own defined
    layer, or the tensor-network layer every other format shares; for a convolution's plan, the
    low-rank, Tucker-2 or CP convolution; a quantized plan's (quant, qlowrank, qfactors), the quantized layer."""
    if format_name in QUANT_LAYERS:
        return QUANT_LAYERS[format_name]
    if conv:
        if format_name not in CONV_LAYERS:
            raise KeyError(f"a convolution takes the formats lowrank, tucker and cp, not {format_name!r}")
        return CONV_LAYERS[format_name]
    if format_name in ("lowrank", "svd"):
        return LOWRANK
    fmt = FORMATS.get(format_name)
    if fmt is None:
        raise KeyError(f"no layer for the format {format_name!r}")
    return LAYERS[fmt.layer] if fmt.layer is not None else NETWORK


def expand_layers(gm, *, translated: bool = True) -> int:
    """Every defined layer's op node of `gm` expanded into its traced reference (in place); with
    translated=False, those of layers with an ONNX translation of their own are left as they are."""
    return expand(gm, OPS, keep=() if translated else tuple(n for n, layer in LAYERS.items() if layer.onnx is not None))


__all__ = ["CONV", "CONV_CP", "CONV_LAYERS", "CONV_TUCKER", "LAYERS", "LOWRANK", "Layer", "LayerLinear", "NETWORK", "OPS", "QFACTORS", "QLOWRANK", "QUANT", "QUANT_LAYERS", "call_inputs", "define", "expand", "expand_layers",
           "inline", "layer_for"]
