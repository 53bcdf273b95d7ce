"""The low-rank convolution layer (channel low rank): a k x k convolution W (out, in, *kernel) as
the (out x in*prod(kernel)) matrix it unfolds to, A (out x r) @ B (r x in*prod(kernel)), the
whitened truncated SVD of that matrix (whitened by the Gram of the unfolded inputs):

    y = conv(conv(x, B as (r, in, *kernel), stride, padding, dilation), A as (out, r, 1, ...)) + bias

a k x k convolution to r channels followed by a 1 x 1 convolution to `out`. A 1 x 1 convolution is a
linear layer over channels and the same layer with kernel 1. conv1d and conv2d (len(kernel) 1 or 2).
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


CONV = define("conv", reference, ("a", "b"),
              statics={"in_channels": (int, 0), "kernel": (list[int], []), "stride": (list[int], []), "padding": (list[int], []),
                       "dilation": (list[int], [])},
              statics_of=statics_of, weight=weight, summary="low-rank convolution, conv(conv(x, B), A) + bias (channel low rank)")
