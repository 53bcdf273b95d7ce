"""Decompositions of a convolution's weight W (out, in, *kernel) that keep its kernel whole:

- Tucker-2 (`tucker`): W = core x_0 U_out x_1 U_in, a 1x1 convolution to r_in channels, the k x k
  core convolution to r_out channels, a 1x1 convolution to `out` (Kim et al., 2016). rank r sets
  r_in = min(r, in) and r_out = min(r, out); at r = max(in, out) it is exact.
- CP (`cp`): W = sum of `rank` terms u_out (x) u_in (x) s_1 (x) ... (x) s_d, a 1x1 convolution to
  `rank` channels, one depthwise convolution per spatial axis, a 1x1 convolution to `out`
  (Lebedev et al., 2015); fitted by ALS.

Both are whitened by the Gram G of the unfolded input patches (in * prod(kernel) square, ordered as
W.view(out, -1) is: channel-major), the statistics the low-rank convolution uses: the error they
make small is ||(W - W') S||_F with S S^T = G (damped), the error on the convolution's outputs over
the calibration data. Tucker-2's input channel basis comes from the channel Gram (G summed over
kernel positions), its output basis from the SVD of W S, and its core is then the least-squares
optimum on G itself; CP's last factor (u_out) is refit by least squares on G after the ALS fit.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .als import als
from .formats.cp import CPConvergenceError, exact_factors, initial_factors
from .network import TensorNetwork, labels

FORMATS = ("tucker", "cp")  # the formats a convolution takes besides channel low rank


def refusal(name: str, fmt: str) -> "ConfigError":
    """The error for convolution `name` planned in a format it does not take."""
    from ..errors import ConfigError

    return ConfigError(f"{name} is a convolution, and convolutions take the formats lowrank, {', '.join(FORMATS)}, not {fmt!r}",
                       f"--exclude {name} (or every convolution) to use --format {fmt} on the linear layers")


def params(fmt: str, out_channels: int, in_channels: int, kernel: Sequence[int], rank: int) -> int:
    """Parameters of the factors (bias aside)."""
    k = math.prod(kernel)
    if fmt == "tucker":
        r_in, r_out = min(rank, in_channels), min(rank, out_channels)
        return r_in * in_channels + r_in * r_out * k + out_channels * r_out
    if fmt == "cp":
        return rank * (in_channels + sum(kernel) + out_channels)
    raise KeyError(f"a convolution takes the formats lowrank, {', '.join(FORMATS)}, not {fmt!r}")


def max_rank(fmt: str, out_channels: int, in_channels: int, kernel: Sequence[int]) -> int:
    if fmt == "tucker":
        return max(in_channels, out_channels)
    # CP: an exact decomposition exists at prod(sizes) / max(sizes) terms
    sizes = [out_channels, in_channels, *kernel]
    return math.prod(sizes) // max(sizes)


def _damped(gram: torch.Tensor | None, n: int, damping: float) -> torch.Tensor:
    if gram is None:
        return torch.eye(n, dtype=torch.float64)
    g = gram.to(torch.float64)
    return g + damping * max(float(g.diagonal().mean()), 1e-12) * torch.eye(n, dtype=torch.float64)


def _check(weight: torch.Tensor, rank: int, top: int) -> None:
    if weight.dim() not in (3, 4):
        raise ValueError(f"expected a conv1d/conv2d weight (out, in, *kernel), got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("the weight holds NaN/Inf values; repair the model's weights first")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
        raise ValueError(f"rank must be an integer in [1, {top}] for a {tuple(weight.shape)} convolution, got {rank!r}")


def tucker2(weight: torch.Tensor, rank: int, gram: torch.Tensor | None = None, damping: float = 1e-4) -> dict[str, torch.Tensor]:
    """{"u_in": (r_in, in), "core": (r_out, r_in, *kernel), "u_out": (out, r_out)}."""
    out_c, in_c, *kernel = weight.shape
    _check(weight, rank, max_rank("tucker", out_c, in_c, kernel))
    k = math.prod(kernel)
    r_in, r_out = min(rank, in_c), min(rank, out_c)
    w = weight.detach().to(torch.float64)
    wm = w.reshape(out_c, in_c * k)
    g = _damped(gram, in_c * k, damping)
    s = torch.linalg.cholesky(g)
    # output basis: the leading left singular vectors of the whitened matrix W S
    u_out = torch.linalg.svd(wm @ s, full_matrices=False)[0][:, :r_out]
    # input basis: in the coordinates where the channels are white (x = L_c w, L_c L_c^T = G_c), the
    # leading directions of the mode-1 unfolding; z = U_c^T L_c^-1 x keeps them
    g_c = g.view(in_c, k, in_c, k).diagonal(dim1=1, dim2=3).sum(-1)
    l_c = torch.linalg.cholesky(g_c)
    mode1 = w.transpose(0, 1).reshape(in_c, out_c * k)
    u_c = torch.linalg.svd(l_c.T @ mode1, full_matrices=False)[0][:, :r_in]
    u_in = torch.linalg.solve_triangular(l_c.T, u_c, upper=True).T  # (r_in, in) = U_c^T L_c^-1
    u_in = u_in / u_in.norm(dim=1, keepdim=True).clamp_min(1e-300)
    # core: the least-squares optimum of ||(W - U_out C P) S|| with P = U_in (x) I_k, on G itself
    p = torch.kron(u_in, torch.eye(k, dtype=torch.float64))  # (r_in k, in k), channel-major like W.view(out, -1)
    core = torch.linalg.solve(p @ g @ p.T, p @ g @ wm.T @ u_out).T  # (r_out, r_in k)
    dtype = weight.dtype
    return {"u_in": u_in.to(dtype).contiguous(), "core": core.reshape(r_out, r_in, *kernel).to(dtype).contiguous(),
            "u_out": u_out.to(dtype).contiguous()}


def cp(weight: torch.Tensor, rank: int, gram: torch.Tensor | None = None, damping: float = 1e-4, max_iter: int = 200,
       tol: float = 1e-2, time_limit: float | None = 120.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """{"u_in": (rank, in), "spatial": (rank, sum(kernel)), "u_out": (out, rank)}: the spatial
    factors of the axes side by side."""
    out_c, in_c, *kernel = weight.shape
    _check(weight, rank, max_rank("cp", out_c, in_c, kernel))
    w = weight.detach().to(torch.float64)
    if rank >= max_rank("cp", out_c, in_c, kernel):
        factors = exact_factors(w, rank)
    else:
        names = labels(w.dim())
        r = labels(1, skip=names)
        net = TensorNetwork(initial_factors(w, rank, seed), [n + r for n in names], (in_c, *kernel), (out_c,), names[1:], names[:1], format="cp")
        fit = als(net, w, sweeps=max_iter, tol=tol, time_limit=time_limit)
        if not fit.converged:
            raise CPConvergenceError(
                f"CP-ALS at rank {rank} for a {tuple(weight.shape)} convolution did not converge in {fit.sweeps} sweeps "
                f"({fit.seconds:.1f} s; relative error {fit.errors[-1]:.4g}, tol {tol:g})",
                "raise cp_max_iter or cp_time_limit, loosen cp_tol, or choose another format")
        factors = fit.network.cores
    u_out, u_in, *spatial = factors  # each (size, rank)
    # the last factor refit on the patch Gram: min ||(W - U_out M) S|| with M the other factors' rows
    k = math.prod(kernel)
    rows = u_in.T[:, :, None]
    for s in spatial:
        rows = (rows[..., None] * s.T[:, None, None, :]).flatten(-2)
    m = rows.reshape(rank, in_c * k)
    g = _damped(gram, in_c * k, damping)
    wm = w.reshape(out_c, in_c * k)
    mgm = m @ g @ m.T
    mgm = mgm + 1e-12 * max(float(mgm.diagonal().mean()), 1e-300) * torch.eye(rank, dtype=torch.float64)
    u_out = torch.linalg.solve(mgm, m @ g @ wm.T).T
    dtype = weight.dtype
    return {"u_in": u_in.T.to(dtype).contiguous(), "spatial": torch.cat([s.T for s in spatial], dim=1).to(dtype).contiguous(),
            "u_out": u_out.to(dtype).contiguous()}


def format_for(fmt: str, conv) -> "Format":
    """A Format whose parameter count and largest rank are those of `fmt` on the convolution of
    geometry `conv` (a meta.Conv): what the allocation sizes a convolution's rank by."""
    from .formats import Format

    return Format(fmt, decompose, lambda out, _in, rank, **_: params(fmt, out, conv.in_channels, conv.kernel, rank),
                  lambda out, _in, **_: max_rank(fmt, out, conv.in_channels, conv.kernel), "full",
                  summary=f"{fmt} of a convolution, the kernel kept whole")


def decompose(fmt: str, weight: torch.Tensor, rank: int, gram: torch.Tensor | None = None, damping: float = 1e-4,
              **options) -> dict[str, torch.Tensor]:
    """The factors of `fmt` (tucker or cp) for a convolution's weight; a ValueError names a shape or
    rank it cannot take."""
    if fmt == "tucker":
        return tucker2(weight, rank, gram, damping)
    if fmt == "cp":
        return cp(weight, rank, gram, damping, **{k: v for k, v in options.items() if k in ("max_iter", "tol", "time_limit")})
    raise ValueError(f"a convolution takes the formats lowrank, {', '.join(FORMATS)}, not {fmt!r}")


__all__ = ["FORMATS", "cp", "decompose", "format_for", "max_rank", "params", "refusal", "tucker2"]
