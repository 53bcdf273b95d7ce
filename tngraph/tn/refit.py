"""Closed-form least-squares refit of one core on calibration statistics, for any TensorNetwork.

With the other cores fixed, W' is linear in core k: W'[O, I] = Σ_B G_k[O_k, I_k, B] E[O_rest, I_rest, B],
where E is the rest of the network and O_k / I_k are the output / input labels core k holds.
Minimising tr((W - W') X^T X (W - W')^T) gives one symmetric system N g = b of size |I_k|·|B|
shared by every output index of the core. The per-axis whitening of the formats approximates
X^T X by a Kronecker product; the refit uses the exact Gram matrix.
"""
from __future__ import annotations

import logging
import math

import opt_einsum as oe
import torch

from .network import TensorNetwork

log = logging.getLogger(__name__)

MAX_NORMAL = 6144  # largest system solved (a 6144-square float64 solve: ~0.3 GB, seconds)
MAX_ELEMENTS = 30_000_000  # largest intermediate (float64 elements) built


def refit_core(
    net: TensorNetwork, weight: torch.Tensor, gram: torch.Tensor, damping: float = 1e-6, core: int | None = None
) -> TensorNetwork | None:
    """The network with one core refitted (the largest that fits the size limits, or `core`);
    None when no core qualifies (a core sharing an input or output label with another, or too large)."""
    k = _choose(net) if core is None else core
    if k is None:
        return None
    lab_k = net.core_labels[k]
    o_all, i_all = net.out_labels, net.in_labels
    size = dict(zip(o_all + i_all, (*net.out_dims, *net.in_dims)))
    for labs, c in zip(net.core_labels, net.cores):
        size.update(zip(labs, c.shape))
    o_k = [c for c in o_all if c in lab_k]
    i_k = [c for c in i_all if c in lab_k]
    bonds = [c for c in lab_k if c not in o_all + i_all]
    o_r = [c for c in o_all if c not in lab_k]
    i_r = [c for c in i_all if c not in lab_k]
    n = lambda labs: math.prod(size[c] for c in labs)  # noqa: E731
    others = [j for j in range(len(net.cores)) if j != k]
    e = oe.contract(
        ",".join(net.core_labels[j] for j in others) + "->" + "".join(o_r + i_r + bonds),
        *(net.cores[j].to(torch.float64) for j in others), backend="torch",
    ).reshape(n(o_r), n(i_r), n(bonds)) if others else torch.ones(1, 1, 1, dtype=torch.float64)
    # Gram and W·Gram with the input split as (I_k, I_rest), the output as (O_k, O_rest)
    g = gram.to(torch.float64)
    in_perm = [i_all.index(c) for c in i_k + i_r]
    g4 = g.reshape(*net.in_dims, *net.in_dims).permute(in_perm + [len(i_all) + p for p in in_perm])
    g4 = g4.reshape(n(i_k), n(i_r), n(i_k), n(i_r))
    wg = (weight.to(torch.float64) @ g).reshape(*net.out_dims, *net.in_dims)
    out_perm = [o_all.index(c) for c in o_k + o_r]
    wg = wg.permute(out_perm + [len(o_all) + p for p in in_perm]).reshape(n(o_k), n(o_r), n(i_k), n(i_r))
    m = n(i_k) * n(bonds)
    if (n(i_r) * n(bonds)) ** 2 <= MAX_ELEMENTS:
        # sum over the outputs first: P = E^T E (I_rest·B square), then contract with the Gram
        pairs = oe.contract("oqb,orc->qbrc", e, e, backend="torch")
        normal = oe.contract("kqlr,qbrc->kblc", g4, pairs, backend="torch")
    else:  # P too large: output rows in chunks, each through the Gram
        normal = torch.zeros(n(i_k), n(bonds), n(i_k), n(bonds), dtype=torch.float64)
        chunk = max(1, MAX_ELEMENTS // max(1, n(i_k) * n(bonds) * n(i_k) * n(i_r)))
        for start in range(0, n(o_r), chunk):
            part = e[start : start + chunk]
            left = oe.contract("oqb,kqlr->okblr", part, g4, backend="torch")
            normal += oe.contract("okblr,orc->kblc", left, part, backend="torch")
    normal = normal.reshape(m, m)
    rhs = oe.contract("aolr,orc->alc", wg, e, backend="torch").reshape(n(o_k), m)
    normal = normal + damping * torch.diagonal(normal).mean().clamp_min(1e-300) * torch.eye(m, dtype=torch.float64)
    solution = torch.linalg.solve(normal, rhs.T).T  # (O_k, I_k·B)
    order = o_k + i_k + bonds
    new = solution.reshape([size[c] for c in order]).permute([order.index(c) for c in lab_k])
    cores = list(net.cores)
    cores[k] = new.to(net.cores[k].dtype).contiguous()
    return TensorNetwork(cores, list(net.core_labels), net.in_dims, net.out_dims, net.in_labels, net.out_labels, format=net.format)


def _choose(net: TensorNetwork) -> int | None:
    physical = net.out_labels + net.in_labels
    size = dict(zip(physical, (*net.out_dims, *net.in_dims)))
    for labs, c in zip(net.core_labels, net.cores):
        size.update(zip(labs, c.shape))
    best = None
    for k, labs in enumerate(net.core_labels):
        mine = [c for c in labs if c in physical]
        if any(c in other for c in mine for j, other in enumerate(net.core_labels) if j != k):
            continue
        bonds = math.prod(size[c] for c in labs if c not in physical)
        i_k = math.prod(size[c] for c in labs if c in net.in_labels)
        o_k = math.prod(size[c] for c in labs if c in net.out_labels)
        e_size = (net.out_features // o_k) * (net.in_features // i_k) * bonds
        if i_k * bonds > MAX_NORMAL or e_size > MAX_ELEMENTS:
            continue
        if best is None or net.cores[k].numel() > net.cores[best].numel():
            best = k
    return best
