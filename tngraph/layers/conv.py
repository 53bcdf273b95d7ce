"""The convolution layers. The low-rank convolution (channel low rank): a k x k convolution W (out, in, *kernel) as
the (out x in*prod(kernel)) matrix it unfolds to, A (out x r) @ B (r x in*prod(kernel)), the
whitened truncated SVD of that matrix (whitened by the Gram of the unfolded inputs):

    y = conv(conv(x, B as (r, in, *kernel), stride, padding, dilation), A as (out, r, 1, ...)) + bias

a k x k convolution to r channels followed by a 1 x 1 convolution to `out`. A 1 x 1 convolution is a
linear layer over channels and the same layer with kernel 1. conv1d and conv2d (len(kernel) 1 or 2).

Tucker-2 (conv_tucker) and CP (conv_cp) keep the kernel whole (tngraph.tn.conv decomposes them):

    tucker: y = conv(conv(conv(x, U_in 1x1), core k x k, stride, padding, dilation), U_out 1x1) + bias
    cp:     y = conv(dw_d(...dw_1(conv(x, U_in 1x1))), U_out 1x1) + bias, dw_a the depthwise
            convolution along spatial axis a (its kernel s_a, its stride, padding and dilation)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .base import define

_CONVS = {1: F.conv1d, 2: F.conv2d}


def reference(x: torch.Tensor, factors: list[torch.Tensor], bias: Optional[torch.Tensor], in_channels: int = 0,
              kernel: Sequence[int] = (), stride: Sequence[int] = (), padding: Sequence[int] = (),
              dilation: Sequence[int] = ()) -> torch.Tensor:
    a, b = factors
    conv = _CONVS[len(kernel)]
    # no reads of the factors' sizes: the traced pattern stays free of symbolic sizes
    hidden = conv(x, b.unflatten(1, [in_channels, *kernel]), None, list(stride), list(padding), list(dilation))
    for _ in kernel:
        a = a.unsqueeze(-1)
    return conv(hidden, a, bias)


def weight(factors: list[torch.Tensor], **statics) -> torch.Tensor:
    a, b = factors
    return a @ b


def statics_of(plan) -> dict:
    return dict(plan.conv)


def _pointwise(w: torch.Tensor, dims: int) -> torch.Tensor:
    for _ in range(dims):
        w = w.unsqueeze(-1)
    return w


def tucker_reference(x: torch.Tensor, factors: list[torch.Tensor], bias: Optional[torch.Tensor], in_channels: int = 0,
                     kernel: Sequence[int] = (), stride: Sequence[int] = (), padding: Sequence[int] = (),
                     dilation: Sequence[int] = ()) -> torch.Tensor:
    u_in, core, u_out = factors
    conv, dims = _CONVS[len(kernel)], len(kernel)
    hidden = conv(conv(x, _pointwise(u_in, dims)), core, None, list(stride), list(padding), list(dilation))
    return conv(hidden, _pointwise(u_out, dims), bias)


def tucker_weight(factors: list[torch.Tensor], **statics) -> torch.Tensor:
    u_in, core, u_out = factors
    return torch.einsum("or,rs...,si->oi...", u_out, core, u_in).flatten(1)


def cp_reference(x: torch.Tensor, factors: list[torch.Tensor], bias: Optional[torch.Tensor], in_channels: int = 0,
                 kernel: Sequence[int] = (), stride: Sequence[int] = (), padding: Sequence[int] = (),
                 dilation: Sequence[int] = ()) -> torch.Tensor:
    u_in, spatial, u_out = factors
    conv, dims = _CONVS[len(kernel)], len(kernel)
    rank = u_in.shape[0]  # a parameter's size: a constant in every trace
    hidden = conv(x, _pointwise(u_in, dims))
    for axis, s in enumerate(spatial.split(list(kernel), dim=1)):
        w = s.unsqueeze(1)  # (rank, 1, k_axis), then 1-sized kernel axes elsewhere
        for other in range(dims):
            if other != axis:
                w = w.unsqueeze(2 + other)
        one = [1] * dims
        step, pad, dil = list(one), [0] * dims, list(one)
        step[axis], pad[axis], dil[axis] = stride[axis], padding[axis], dilation[axis]
        hidden = conv(hidden, w, None, step, pad, dil, rank)
    return conv(hidden, _pointwise(u_out, dims), bias)


def cp_weight(factors: list[torch.Tensor], kernel: Sequence[int] = (), **statics) -> torch.Tensor:
    u_in, spatial, u_out = factors
    rows = u_in[:, :, None]
    for s in spatial.split(list(kernel), dim=1):
        rows = (rows[..., None] * s[:, None, None, :]).flatten(-2)
    return u_out @ rows.flatten(1)


_GEOMETRY = {"in_channels": (int, 0), "kernel": (list[int], []), "stride": (list[int], []), "padding": (list[int], []),
             "dilation": (list[int], [])}

CONV = define("conv", reference, ("a", "b"),
              statics=_GEOMETRY, statics_of=statics_of, weight=weight, summary="low-rank convolution, conv(conv(x, B), A) + bias (channel low rank)")
CONV_TUCKER = define("conv_tucker", tucker_reference, ("u_in", "core", "u_out"), statics=_GEOMETRY, statics_of=statics_of,
                     weight=tucker_weight, summary="Tucker-2 convolution, 1x1 -> k x k core -> 1x1 (+ bias)")
CONV_CP = define("conv_cp", cp_reference, ("u_in", "spatial", "u_out"), statics=_GEOMETRY, statics_of=statics_of,
                 weight=cp_weight, summary="CP convolution, 1x1 -> depthwise per spatial axis -> 1x1 (+ bias)")
CONV_LAYERS = {"lowrank": CONV, "svd": CONV, "tucker": CONV_TUCKER, "cp": CONV_CP}  # a convolution's plan format -> its layer
