"""The quantized layers: a weight stored as integer codes with fp16 scales, optionally with a
low-rank part that absorbs the quantization error (tngraph.tn.quant makes the codes):

    quant:    y = x W'^T + bias,                 W' = scales * (codes - zeros), per output channel or
                                                 per group of input columns
    qlowrank: y = x W'^T + (x B^T) A^T + bias,   A (out x r), B (r x in) fp16
    qfactors: y = (x B'^T) A'^T + bias,           A' (out x r), B' (r x in) each quantized as W' is

codes: int8 (out x in) at 8 bits (symmetric, zeros 0), uint8 packed two (4 bits) or four (2 bits)
to a byte along the input, first value in the low bits; fp16 values at 16 bits. Statics: `bits`, and
`act_bits` 8 for 8-bit per-channel weights to run int8 x int8 on the CPU (torch._int_mm, each row of
x quantized on the fly with its own scale; the integer GEMM is several times faster than fp32 there),
0 for weight-only (dequantize, then one fp32 GEMM). The ONNX translation (`onnx` below) writes the
dequantization in standard operators before a MatMul (activations float; a DequantizeLinear with
act_bits 8, which onnxruntime runs as its own integer GEMM).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..tn.quant import dequantize_layer, layer_weight
from .base import define


def _int8_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """x (..., in) float against int8 codes (out x in) with per-channel scales and zero points (out x 1):
    each row of x quantized to int8 with its own scale, the product in int32, both scales applied after."""
    rows = x.reshape(-1, x.shape[-1])
    step = rows.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    q = torch.round(rows / step).clamp(-127, 127).to(torch.int8)
    y = torch._int_mm(q, (codes - zeros).t()).to(torch.float32) * step.to(torch.float32) * scales.reshape(1, -1).to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], codes.shape[0])


def _dense_part(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, act_bits: int) -> torch.Tensor:
    if act_bits == 8 and bits == 8 and scales.shape[1] == 1 and not x.requires_grad:
        return _int8_matmul(x, codes, scales, zeros)
    return F.linear(x, dequantize_layer(codes, scales, zeros, bits, x.dtype))


def reference(x: torch.Tensor, factors: list[torch.Tensor], bias: Optional[torch.Tensor], bits: int = 4, act_bits: int = 0) -> torch.Tensor:
    codes, scales, zeros = factors
    y = _dense_part(x, codes, scales, zeros, bits, act_bits)
    return y + bias if bias is not None else y


def weight(factors: list[torch.Tensor], bits: int = 4, act_bits: int = 0) -> torch.Tensor:
    return layer_weight(factors, bits)


def lowrank_reference(x: torch.Tensor, factors: list[torch.Tensor], bias: Optional[torch.Tensor], bits: int = 4,
                      act_bits: int = 0) -> torch.Tensor:
    codes, scales, zeros, a, b = factors
    y = _dense_part(x, codes, scales, zeros, bits, act_bits) + F.linear(F.linear(x, b.to(x.dtype)), a.to(x.dtype))
    return y + bias if bias is not None else y


def factors_reference(x: torch.Tensor, factors: list[torch.Tensor], bias: Optional[torch.Tensor], bits: int = 8,
                      act_bits: int = 0) -> torch.Tensor:
    y = _dense_part(_dense_part(x, *factors[3:], bits, act_bits), *factors[:3], bits, act_bits)
    return y + bias if bias is not None else y


def _onnx_weight(op, codes, scales, zeros, bits: int, act_bits: int):
    """W' (out x in, float) in ONNX: codes unpacked by BitShift / BitwiseAnd below 8 bits, then
    (q - zero) * scale per group, which onnxruntime folds into a float weight at load (weight-only,
    as the PyTorch layer runs); a Cast at 16. With act_bits 8, the 8-bit weight is a
    DequantizeLinear feeding the MatMul, the pattern onnxruntime runs as an integer GEMM on
    activations it quantizes itself (per tensor: its numerics, close to the layer's per-row ones)."""
    from onnx import TensorProto

    if bits == 16:
        return op.Cast(codes, to=TensorProto.FLOAT)
    last = op.Constant(value_ints=[-1])
    if bits == 8 and act_bits == 8:
        return op.DequantizeLinear(codes, op.Reshape(op.Cast(scales, to=TensorProto.FLOAT), last), op.Reshape(zeros, last), axis=0)
    out, groups = (int(d) for d in scales.shape)
    width = int(codes.shape[1]) * (8 // bits)
    if bits == 8:
        q = op.Cast(codes, to=TensorProto.FLOAT)
    else:
        shifts = op.Cast(op.Constant(value_ints=list(range(0, 8, bits))), to=TensorProto.UINT8)
        mask = op.Cast(op.Constant(value_ints=[2**bits - 1]), to=TensorProto.UINT8)
        q = op.Cast(op.BitwiseAnd(op.BitShift(op.Unsqueeze(codes, last), shifts, direction="RIGHT"), mask), to=TensorProto.FLOAT)
    q = op.Reshape(q, op.Constant(value_ints=[out, groups, width // groups]))
    w = op.Mul(op.Sub(q, op.Unsqueeze(op.Cast(zeros, to=TensorProto.FLOAT), last)), op.Unsqueeze(op.Cast(scales, to=TensorProto.FLOAT), last))
    return op.Reshape(w, op.Constant(value_ints=[out, width]))


def _onnx_linear(op, x, w):
    return op.MatMul(x, op.Transpose(op.CastLike(w, x), perm=[1, 0]))


def onnx(x, factors, bias, bits: int = 4, act_bits: int = 0):
    """ONNX: the dequantized weight (standard operators, which onnxruntime folds once at load) ->
    MatMul (+ the low-rank branch) (+ Add). Activations stay float: act_bits is an execution choice of the CPU op."""
    from onnxscript import opset18 as op

    if len(factors) == 6:  # quantized factors: x B'^T, then A'^T
        y = _onnx_linear(op, _onnx_linear(op, x, _onnx_weight(op, *factors[3:], bits, act_bits)), _onnx_weight(op, *factors[:3], bits, act_bits))
        return op.Add(y, bias) if bias is not None else y
    y = _onnx_linear(op, x, _onnx_weight(op, *factors[:3], bits, act_bits))
    if len(factors) == 5:
        y = op.Add(y, _onnx_linear(op, _onnx_linear(op, x, factors[4]), factors[3]))
    return op.Add(y, bias) if bias is not None else y


def statics_of(plan) -> dict:
    return {"bits": plan.quant["bits"], "act_bits": plan.quant.get("act_bits", 0)}


_STATICS = {"bits": (int, 4), "act_bits": (int, 0)}

QUANT = define("quant", reference, ("codes", "scales", "zeros"), statics=_STATICS, statics_of=statics_of, weight=weight, onnx=onnx,
               summary="quantized weight, x·(s·(q − z))ᵀ + bias (int8/int4/int2 codes, fp16 scales)")
QLOWRANK = define("qlowrank", lowrank_reference, ("codes", "scales", "zeros", "a", "b"), statics=_STATICS, statics_of=statics_of,
                  weight=weight, onnx=onnx, summary="quantized weight + low-rank compensation, x·(s·(q − z) + A·B)ᵀ + bias")
QFACTORS = define("qfactors", factors_reference, ("codes_a", "scales_a", "zeros_a", "codes_b", "scales_b", "zeros_b"), statics=_STATICS,
                  statics_of=statics_of, weight=weight, onnx=onnx,
                  summary="quantized low-rank factors, (x·B'ᵀ)·A'ᵀ + bias (int8/int4 codes of both factors, fp16 scales)")
QUANT_LAYERS = {"quant": QUANT, "qlowrank": QLOWRANK, "qfactors": QFACTORS}  # a plan's format -> its layer
