"""Alternating least squares over any TensorNetwork: each core in turn is the exact least-squares fit
to a target tensor with the other cores fixed, so the error never rises from one update to the next.

This one routine is CP-ALS (cores = factor matrices sharing one hyper-edge label), TR-ALS (a ring of
three-way cores) and TT-ALS; the contractions are planned by opt_einsum, so the Khatri-Rao products of
textbook CP-ALS are never formed. The target is the (whitened) weight reshaped to out_dims + in_dims.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import opt_einsum as oe
import torch

from .network import TensorNetwork, labels

log = logging.getLogger(__name__)


@dataclass
class ALSResult:
    network: TensorNetwork
    errors: list[float] = field(default_factory=list)  # relative error after every sweep (errors[0]: the start)
    sweeps: int = 0
    converged: bool = False
    seconds: float = 0.0
    skipped_cores: list[int] = field(default_factory=list)  # normal equations too large to solve


def relative_error(net: TensorNetwork, target: torch.Tensor) -> float:
    eq = ",".join(net.core_labels) + "->" + net.out_labels + net.in_labels
    approx = oe.contract(eq, *net.cores, backend="torch")
    return (torch.linalg.norm(approx - target) / torch.linalg.norm(target).clamp_min(1e-300)).item()


def als(
    net: TensorNetwork,
    target: torch.Tensor,
    *,
    sweeps: int,
    tol: float = 0.0,
    time_limit: float | None = None,
    ridge: float = 1e-10,
    max_normal: int = 4096,
) -> ALSResult:
    """Up to `sweeps` ALS sweeps fitting `net` to `target` (shape out_dims + in_dims).

    Stops early when the relative error improves by less than `tol` (relative to itself) over a
    sweep, or when `time_limit` seconds have passed. A core whose normal matrix would be larger than
    `max_normal` squared is left as it is (recorded in `skipped_cores`).
    """
    start = time.perf_counter()
    t = target.to(torch.float64)
    t_labels = net.out_labels + net.in_labels
    physical = set(t_labels)
    cores = [c.to(torch.float64) for c in net.cores]
    norm_t = torch.linalg.norm(t).clamp_min(1e-300)
    result = ALSResult(net, errors=[relative_error(_with(net, cores), t)])
    used = "".join(net.core_labels) + t_labels
    for sweep in range(sweeps):
        err = None
        for k, lab_k in enumerate(net.core_labels):
            others = [j for j in range(len(cores)) if j != k]
            other_labels = [net.core_labels[j] for j in others]
            in_others = set("".join(other_labels))
            bonds = [c for c in lab_k if c not in physical]
            batch = [c for c in lab_k if c in physical and c in in_others]
            free = [c for c in lab_k if c in physical and c not in in_others]
            size = dict(zip(lab_k, cores[k].shape))
            n_bond = math.prod(size[c] for c in bonds)
            if n_bond > max_normal:
                if sweep == 0:
                    result.skipped_cores.append(k)
                continue
            # rhs[lab_k] = <target, network without core k>
            rhs = oe.contract(t_labels + "," + ",".join(other_labels) + "->" + lab_k, t, *(cores[j] for j in others), backend="torch")
            # normal[batch, bonds, bonds'] = <network without k (bonds), the same (bonds')>
            inner = sorted({c for c in in_others if c not in physical} | set(bonds))
            fresh = dict(zip(inner, labels(len(inner), skip=used)))
            primed = ["".join(fresh.get(c, c) for c in labs) for labs in other_labels]
            bonds_p = "".join(fresh[c] for c in bonds)
            normal = oe.contract(
                ",".join(other_labels + primed) + "->" + "".join(batch) + "".join(bonds) + bonds_p,
                *(cores[j] for j in others), *(cores[j] for j in others), backend="torch",
            )
            n_batch = math.prod(size[c] for c in batch)
            normal = normal.reshape(n_batch, n_bond, n_bond)
            scale = torch.diagonal(normal, dim1=-2, dim2=-1).mean().clamp_min(1e-300)
            normal = normal + ridge * scale * torch.eye(n_bond, dtype=torch.float64)
            order = batch + bonds + free
            b = rhs.permute([lab_k.index(c) for c in order]).reshape(n_batch, n_bond, -1)
            g = torch.linalg.solve(normal, b)  # (batch, bonds, free)
            shape = [size[c] for c in order]
            cores[k] = g.reshape(shape).permute([order.index(c) for c in lab_k]).contiguous()
            # ||T - W'||^2 = ||T||^2 - 2 <T, W'> + ||W'||^2, with both inner products at hand
            gb = cores[k].permute([lab_k.index(c) for c in order]).reshape(n_batch, n_bond, -1)
            rb = rhs.permute([lab_k.index(c) for c in order]).reshape(n_batch, n_bond, -1)
            cross = (gb * rb).sum()
            sq = (gb * (normal @ gb)).sum()
            err = (norm_t**2 - 2 * cross + sq).clamp_min(0).sqrt().div(norm_t).item()
        if err is None:  # every core skipped
            break
        result.errors.append(err)
        result.sweeps = sweep + 1
        prev = result.errors[-2]
        if prev - err <= tol * max(prev, 1e-300):
            result.converged = True
            break
        if time_limit is not None and time.perf_counter() - start > time_limit:
            break
    result.network = _with(net, cores)
    result.seconds = time.perf_counter() - start
    return result


def _with(net: TensorNetwork, cores: list[torch.Tensor]) -> TensorNetwork:
    return TensorNetwork(list(cores), list(net.core_labels), net.in_dims, net.out_dims, net.in_labels, net.out_labels, format=net.format)
