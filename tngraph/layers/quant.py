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

import contextvars
from typing import Optional

import torch
import torch.nn.functional as F

from ..tn.quant import dequantize_layer, layer_weight
from .base import LayerLinear, define


def _int8_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """x (..., in) float against int8 codes (out x in) with per-channel scales and zero points (out x 1):
    each row of x quantized to int8 with its own scale, the product of the codes in int32, the zero
    points' share taken off after (q (c - z)^T = q c^T - rowsum(q) z^T: the weight is never rewritten
    per call), both scales applied last."""
    rows = x.reshape(-1, x.shape[-1])
    step = rows.abs().amax(-1, keepdim=True).clamp_min(1e-12) * (1 / 127)
    q = torch.round(rows * (1 / step)).clamp(-127, 127).to(torch.int8)
    acc = torch._int_mm(q, codes.t()) - q.sum(-1, keepdim=True, dtype=torch.int32) * zeros.reshape(1, -1).to(torch.int32)
    y = acc.to(torch.float32) * (step.to(torch.float32) * scales.reshape(1, -1).to(torch.float32))
    return y.to(x.dtype).reshape(*x.shape[:-1], codes.shape[0])


def _dense_part(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, act_bits: int) -> torch.Tensor:
    if act_bits == 8 and bits == 8 and scales.shape[1] == 1 and not x.requires_grad:
        return _int8_matmul(x, codes, scales, zeros)
    return F.linear(x, dequantize_layer(codes, scales, zeros, bits, x.dtype))


def _forward(x: torch.Tensor, factors: list[torch.Tensor], bias: Optional[torch.Tensor], bits: int, act_bits: int, part) -> torch.Tensor:
    """The three layers from one quantized product `part(x, codes, scales, zeros, bits, act_bits)` = x W'^T:
    quant, part alone; qlowrank, part plus the fp16 low-rank branch (x B^T) A^T; qfactors, part of
    part (x B'^T, then A'^T). The bias last."""
    if len(factors) == 6:
        y = part(part(x, *factors[3:], bits, act_bits), *factors[:3], bits, act_bits)
    else:
        y = part(x, *factors[:3], bits, act_bits)
        if len(factors) == 5:
            y = y + F.linear(F.linear(x, factors[4].to(x.dtype)), factors[3].to(x.dtype))
    return y + bias if bias is not None else y


def reference(x: torch.Tensor, factors: list[torch.Tensor], bias: Optional[torch.Tensor], bits: int = 4, act_bits: int = 0) -> torch.Tensor:
    """The three layers' reference (the CPU op, the graph factorize writes, the backward): each
    quantized product dequantizes its weight, or runs int8 x int8 (`_dense_part`)."""
    return _forward(x, factors, bias, bits, act_bits, _dense_part)


def weight(factors: list[torch.Tensor], bits: int = 4, act_bits: int = 0) -> torch.Tensor:
    return layer_weight(factors, bits)


QUANT_OPS = ("onnxruntime", "standard")
quant_ops: contextvars.ContextVar[str] = contextvars.ContextVar("tngraph_quant_ops", default="onnxruntime")  # export_onnx sets it
NBITS_BLOCKS = (256, 128, 64, 32, 16)  # MatMulNBits' block sizes along the input: powers of two, at least 16


def _gpu_part(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, act_bits: int) -> torch.Tensor:
    from .. import ops

    y = ops.quant_product_cuda(x, codes, scales, zeros, bits) if bits < 16 else None
    return y if y is not None else _dense_part(x, codes, scales, zeros, bits, act_bits)


def cuda(x: torch.Tensor, factors: list[torch.Tensor], bias: Optional[torch.Tensor], bits: int = 4, act_bits: int = 0) -> torch.Tensor:
    """The three layers on CUDA: each quantized product in the dequantizing GEMM kernel (tngraph.ops
    quant_product_cuda; the reference's where it cannot run), weight-only whatever act_bits."""
    return _forward(x, factors, bias, bits, act_bits, _gpu_part)


def _onnx_weight(op, codes, scales, zeros, bits: int, act_bits: int):
    """W' (out x in, float) in ONNX's own operators: codes unpacked below 8 bits (the low bits of a
    byte are its first value: p - 2^bits floor(p / 2^bits), in float arithmetic, which is exact on
    bytes and which every runtime has, TensorRT included), then (q - zero) * scale per group;
    onnxruntime folds it into a float weight at load. A Cast at 16. With act_bits 8, the 8-bit
    weight is a DequantizeLinear feeding the MatMul, the pattern onnxruntime runs as an integer
    GEMM on activations it quantizes itself (per tensor: its numerics, close to the layer's per-row ones)."""
    from onnx import TensorProto

    if bits == 16:
        return op.Cast(codes, to=TensorProto.FLOAT)
    last = op.Constant(value_ints=[-1])
    if bits == 8 and act_bits == 8:
        return op.DequantizeLinear(codes, op.Reshape(op.Cast(scales, to=TensorProto.FLOAT), last), op.Reshape(zeros, last), axis=0)
    out, groups = (int(d) for d in scales.shape)
    width = int(codes.shape[1]) * (8 // bits)
    q = op.Cast(codes, to=TensorProto.FLOAT)
    if bits < 8:  # the values of each byte, first in the low bits: (p // 2^(bits k)) mod 2^bits for k = 0, 1, ...
        steps = op.Constant(value_floats=[float(2 ** (bits * k)) for k in range(8 // bits)])
        shifted = op.Floor(op.Div(op.Unsqueeze(q, last), steps))
        size = op.Constant(value_float=float(2**bits))
        q = op.Sub(shifted, op.Mul(op.Floor(op.Div(shifted, size)), size))
    q = op.Reshape(q, op.Constant(value_ints=[out, groups, width // groups]))
    w = op.Mul(op.Sub(q, op.Unsqueeze(op.Cast(zeros, to=TensorProto.FLOAT), last)), op.Unsqueeze(op.Cast(scales, to=TensorProto.FLOAT), last))
    return op.Reshape(w, op.Constant(value_ints=[out, width]))


def nbits_block(width: int, groups: int) -> int | None:
    """The MatMulNBits block for `groups` groups along a `width`-wide input: the largest power of two
    (at least 16) dividing a group (a group of several blocks repeats its scale over them); None
    where none divides."""
    return next((b for b in NBITS_BLOCKS if (width // groups) % b == 0), None)


def _onnx_nbits(op, x, codes, scales, zeros, bits: int):
    """x W'^T as onnxruntime's MatMulNBits (com.microsoft): the codes stay packed in memory and run in
    its blocked low-bit GEMM; None where the layer does not fit it (no block divides a group)."""
    from onnx import TensorProto
    from onnxscript import values

    out, groups = (int(d) for d in scales.shape)
    width = int(codes.shape[1]) * (8 // bits)
    block = nbits_block(width, groups)
    if block is None:
        return None
    blocks, repeat = width // block, (width // groups) // block
    int32 = TensorProto.INT32
    scale, packed = op.CastLike(scales, x), codes
    if bits == 8:  # symmetric int8 codes as MatMulNBits' unsigned ones, zero points 128 + theirs (uint8: its 8-bit kernel's only kind)
        offset = op.Cast(op.Constant(value_int=128), to=int32)
        packed = op.Cast(op.Add(op.Cast(codes, to=int32), offset), to=TensorProto.UINT8)
        zero = op.Cast(op.Add(op.Cast(zeros, to=int32), offset), to=TensorProto.UINT8)
    else:
        zero = op.CastLike(zeros, x)
    if repeat > 1:  # per channel (or a wide group): each block of the group takes its scale and zero point
        shape = op.Constant(value_ints=[out, groups, repeat])
        flat = op.Constant(value_ints=[out, blocks])
        scale = op.Reshape(op.Expand(op.Unsqueeze(scale, op.Constant(value_ints=[-1])), shape), flat)
        zero = op.Reshape(op.Expand(op.Unsqueeze(zero, op.Constant(value_ints=[-1])), shape), flat)
    packed = op.Reshape(packed, op.Constant(value_ints=[out, blocks, block * bits // 8]))
    matmul_nbits = values.Op(values.Opset("com.microsoft", 1), "MatMulNBits", _matmul_nbits_schema())
    return matmul_nbits(x, packed, scale, zero, K=width, N=out, bits=bits, block_size=block, accuracy_level=0)


def _matmul_nbits_schema():
    """onnxruntime's MatMulNBits signature (the inputs tngraph writes), registered with onnx once: onnx
    ships no schemas of onnxruntime's contrib ops, and onnxscript and the checker look ops up there."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("MatMulNBits", 1, "com.microsoft"):
        return onnx.defs.get_schema("MatMulNBits", 1, "com.microsoft")
    p = OpSchema.FormalParameter
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[p("A", "T1"), p("B", "T2"), p("scales", "T1"), p("zero_points", "T3", param_option=OpSchema.FormalParameterOption.Optional)],
        outputs=[p("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], "")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, "") for name in ("K", "N", "bits", "block_size", "accuracy_level")])
    onnx.defs.register_schema(schema)
    return schema


def _onnx_linear(op, x, w):
    return op.MatMul(x, op.Transpose(op.CastLike(w, x), perm=[1, 0]))


def _onnx_quantized(op, x, codes, scales, zeros, bits: int, act_bits: int):
    """x W'^T for one quantized tensor: MatMulNBits for onnxruntime (weight-only codes below 16 bits),
    standard operators otherwise."""
    if quant_ops.get() == "onnxruntime" and bits < 16 and not (bits == 8 and act_bits == 8):
        y = _onnx_nbits(op, x, codes, scales, zeros, bits)
        if y is not None:
            return y
    return _onnx_linear(op, x, _onnx_weight(op, codes, scales, zeros, bits, act_bits))


def onnx(x, factors, bias, bits: int = 4, act_bits: int = 0):
    """ONNX: each quantized tensor's product (`_onnx_quantized`: onnxruntime's MatMulNBits, or the
    dequantized weight in standard operators -> MatMul, as `quant_ops` says), the low-rank branch,
    the bias. Activations stay float unless act_bits 8 (onnxruntime's integer GEMM)."""
    from onnxscript import opset18 as op

    if len(factors) == 6:  # quantized factors: x B'^T, then A'^T
        y = _onnx_quantized(op, _onnx_quantized(op, x, *factors[3:], bits, act_bits), *factors[:3], bits, act_bits)
    else:
        y = _onnx_quantized(op, x, *factors[:3], bits, act_bits)
    if len(factors) == 5:
        y = op.Add(y, _onnx_linear(op, _onnx_linear(op, x, factors[4]), factors[3]))
    return op.Add(y, bias) if bias is not None else y


def statics_of(plan) -> dict:
    return {"bits": plan.quant["bits"], "act_bits": plan.quant.get("act_bits", 0)}


_STATICS = {"bits": (int, 4), "act_bits": (int, 0)}

QUANT = define("quant", reference, ("codes", "scales", "zeros"), statics=_STATICS, statics_of=statics_of, weight=weight, onnx=onnx, cuda=cuda,
               summary="quantized weight, x·(s·(q − z))ᵀ + bias (int8/int4/int2 codes, fp16 scales)")
QLOWRANK = define("qlowrank", reference, ("codes", "scales", "zeros", "a", "b"), statics=_STATICS, statics_of=statics_of,
                  weight=weight, onnx=onnx, cuda=cuda, summary="quantized weight + low-rank compensation, x·(s·(q − z) + A·B)ᵀ + bias")
QFACTORS = define("qfactors", reference, ("codes_a", "scales_a", "zeros_a", "codes_b", "scales_b", "zeros_b"), statics=_STATICS,
                  statics_of=statics_of, weight=weight, onnx=onnx, cuda=cuda,
                  summary="quantized low-rank factors, (x·B'ᵀ)·A'ᵀ + bias (int8/int4 codes of both factors, fp16 scales)")
QUANT_LAYERS = {"quant": QUANT, "qlowrank": QLOWRANK, "qfactors": QFACTORS}  # a plan's format -> its layer

# Inductor's options for a CPU graph with int8 x int8 layers. Each such layer reads its input twice (the
# row maximum, then the rounding), and Inductor, below its default of 30 operations, inlines the
# producer (a LayerNorm; a dequantize + bias + GELU) into both reads and computes it twice; at 8 it
# stores it once. MiniLM at torch.ao's bytes, 32 x 128, 2 threads (docs/quantization.md): 249 -> 225 ms.
INT8_ACTIVATION_OPTIONS = {"realize_opcount_threshold": 8}


def compile_options(model: torch.nn.Module) -> dict:
    """The Inductor options (torch.compile's `options`) that suit `model`'s quantized layers on the
    CPU: INT8_ACTIVATION_OPTIONS where it holds an int8 x int8 layer (a module's quantized layer with
    8-bit codes and act_bits 8, or a graph's `_int_mm`), else none. The tngraph backend applies them
    itself; `torch.compile(model, options=tngraph.compile_options(model))` for a compressed module."""
    if any(p.is_cuda for p in model.parameters()) or any(b.is_cuda for b in model.buffers()):
        return {}
    for sub in model.modules():
        graph = getattr(sub, "graph", None)
        nodes = graph.nodes if isinstance(graph, torch.fx.Graph) else ()
        if (isinstance(sub, LayerLinear) and sub.layer_name in QUANT_LAYERS and _int8(sub.statics)) or any(map(_int8_node, nodes)):
            return dict(INT8_ACTIVATION_OPTIONS)
    return {}


def _int8(statics: dict) -> bool:
    return statics.get("bits") == 8 and statics.get("act_bits") == 8


def _int8_node(node: torch.fx.Node) -> bool:
    """An integer GEMM, or a fused quantized layer's op node running int8 x int8."""
    if node.op != "call_function":
        return False
    if node.target in (torch.ops.aten._int_mm.default, torch._int_mm):
        return True
    layer = next((q for q in QUANT_LAYERS.values() if q.op is node.target), None)
    return layer is not None and _int8(layer.op_statics(node))
