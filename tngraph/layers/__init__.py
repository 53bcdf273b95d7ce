"""Factorized layer kinds defined once by a reference forward (tngraph.layers.base): one file per kind."""
from .base import Layer, LayerLinear, call_inputs, define, expand, inline
from .lrbd import LRBD

LAYERS: dict[str, Layer] = {layer.name: layer for layer in (LRBD,)}
OPS = {layer.op: layer for layer in LAYERS.values()}  # tngraph::<name>.default -> its layer


def expand_layers(gm) -> int:
    """Every defined layer's op node of `gm` expanded into its traced reference (in place)."""
    return expand(gm, OPS)


__all__ = ["LAYERS", "Layer", "LayerLinear", "OPS", "call_inputs", "define", "expand", "expand_layers", "inline"]
