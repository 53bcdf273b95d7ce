"""prune: structured neuron pruning of an MLP, up -> elementwise -> down, with the down projection refitted.

Keeping the hidden neurons K, the down projection's best weight on them (least squares over the
calibration's hidden activations h, Gram C = sum h h^T) is W' = W C[:, K] C[K, K]^-1: the dropped
neurons' contribution is carried, as far as it is linearly predictable, by the kept ones (the
Nystrom step of MoDeGPT's MLP compression). With the output-gradient Gram G of the down projection
(K-FAC, as for the low-rank decompositions) the predicted model error of a choice is
tr(G (W - W'_full) C (W - W'_full)^T), in the same units as a whitened low-rank truncation's.

Neurons are dropped greedily, a chunk at a time, by the optimal-brain-surgeon cost of removing each
from the current set with the rest refitted: w_j^T G w_j / [C_K^-1]_jj, w_j neuron j's refitted
column. One sweep from all neurons down to the smallest count asked gives every count's selection
on the way (`prune_curve`), so an allocator gets a whole error curve for the price of one.

The up projection (and a gate, in gated MLPs) keeps the rows of K; nothing else changes, and the
pruned MLP is a smaller MLP of the same form: no extra matmul, unlike a low-rank factor chain.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Selection:
    keep: torch.Tensor  # sorted int64 indices of the kept hidden neurons
    weight: torch.Tensor  # the down projection on them (out x len(keep)), refitted; the weight's dtype
    error: float  # predicted error tr(G dW C dW^T) (G the identity without an output Gram)


def _check(weight: torch.Tensor, gram: torch.Tensor, out_gram: torch.Tensor | None, counts: Sequence[int]) -> None:
    if weight.dim() != 2:
        raise ValueError(f"the down projection's weight must be 2-D (out x hidden), got shape {tuple(weight.shape)}")
    out, hidden = weight.shape
    if tuple(gram.shape) != (hidden, hidden):
        raise ValueError(f"the hidden Gram matrix must be {hidden}x{hidden} for a {out}x{hidden} weight, got {tuple(gram.shape)}")
    if out_gram is not None and tuple(out_gram.shape) != (out, out):
        raise ValueError(f"the output Gram matrix must be {out}x{out} for a {out}x{hidden} weight, got {tuple(out_gram.shape)}")
    for name, t in (("weight", weight), ("hidden Gram", gram), ("output Gram", out_gram)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"the {name} holds NaN or infinite values")
    bad = [c for c in counts if not 1 <= int(c) <= hidden]
    if not counts or bad:
        raise ValueError(f"neurons to keep must lie in [1, {hidden}], got {list(counts) if counts else 'none'}")


def _downdate(inverse: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The inverse of C_KK restricted to the `kept` rows and columns (a boolean mask) from the
    inverse of C_KK itself: P_aa - P_ab P_bb^-1 P_ba, O(k^2 d) for d dropped instead of O(k^3)."""
    dropped = ~kept
    p_ab = inverse[kept][:, dropped]
    return inverse[kept][:, kept] - p_ab @ torch.linalg.solve(inverse[dropped][:, dropped], p_ab.T)


def _solve(rhs: torch.Tensor, ckk: torch.Tensor) -> torch.Tensor:
    """rhs C_KK^-1 from C_KK itself (Cholesky; LU when rounding left it indefinite): the refit a
    selection returns, exact however the running inverse that chose it drifted."""
    factor, info = torch.linalg.cholesky_ex(ckk)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, factor).T
    return torch.linalg.solve(ckk, rhs.T).T


def _float64(weight: torch.Tensor, gram: torch.Tensor, out_gram: torch.Tensor | None, damping: float):
    """(W, C, G or None) in float64 and the ridge added to C_KK: `damping` times C's mean diagonal."""
    w, c = weight.detach().to(torch.float64), gram.detach().to(torch.float64)
    g = out_gram.detach().to(torch.float64) if out_gram is not None else None
    return w, c, g, damping * max(float(c.diagonal().mean()), 1e-300)


def _damped(c: torch.Tensor, keep: torch.Tensor, ridge: float) -> torch.Tensor:
    """C_KK with the ridge on its diagonal."""
    return c[keep][:, keep] + ridge * torch.eye(len(keep), dtype=c.dtype, device=c.device)


def _error(w: torch.Tensor, c: torch.Tensor, g: torch.Tensor | None, keep: torch.Tensor, refit: torch.Tensor) -> float:
    delta = w.clone()
    delta[:, keep] -= refit
    weighted = delta if g is None else g @ delta
    return float(((weighted @ c) * delta).sum())


def refit_damping(rows: int, hidden: int) -> float:
    """The ridge damping of the down projection's refit (relative to C's mean diagonal) for a Gram
    summed over `rows` hidden vectors of width `hidden`: 0.01 (hidden / rows)^3, within [1e-6, 0.1].
    With fewer rows than neurons C is singular and an undamped refit overfits the calibration (the
    MiniLM at 0.5, 32 calibration sentences, 683 rows: mean cos 0.01 at 1e-6, 0.79 at 0.1); with many
    rows damping only loses (2,048 sentences, 48,156 rows: 0.884 at 1e-6, 0.848 at 0.1). Measured at
    683, about 5,500 and 48,156 rows (docs/formats.md); the rule is the best of those three."""
    if rows <= 0 or hidden <= 0:
        raise ValueError(f"refit_damping needs positive rows and hidden, got {rows} and {hidden}")
    return min(0.1, max(1e-6, 0.01 * (hidden / rows) ** 3))


@dataclass(frozen=True)
class Sweep:
    """One greedy sweep: the selection at each count asked, and `removal`, every hidden neuron in the
    order the sweep dropped it (those it never dropped last), from which the kept neurons at any of
    the swept `counts` can be read again without sweeping (`kept`)."""

    selections: list[Selection]
    removal: torch.Tensor
    counts: tuple[int, ...]

    def kept(self, count: int) -> torch.Tensor:
        """The sorted neurons the sweep kept at `count`, one of its counts (elsewhere a round of
        several neurons may have straddled the count: not a state the sweep was in)."""
        if count not in self.counts:
            raise ValueError(f"the sweep stopped at {sorted(self.counts)} neurons, not {count}")
        return self.removal[len(self.removal) - count:].sort().values


def prune_curve(weight: torch.Tensor, gram: torch.Tensor, counts: Sequence[int], out_gram: torch.Tensor | None = None, *,
                chunk: int | None = None, damping: float = 1e-6) -> list[Selection]:
    """The greedy selection at each of `counts` (neurons kept), in the order given, from one sweep
    (prune_sweep, which also says in which order the neurons left)."""
    return prune_sweep(weight, gram, counts, out_gram, chunk=chunk, damping=damping).selections


def prune_sweep(weight: torch.Tensor, gram: torch.Tensor, counts: Sequence[int], out_gram: torch.Tensor | None = None, *,
                chunk: int | None = None, damping: float = 1e-6) -> Sweep:
    """The greedy selection at each of `counts` (neurons kept), in the order given, from one sweep.

    weight: the down projection (out x hidden); gram: sum of h h^T of its inputs (hidden x hidden);
    out_gram: sum of g g^T of the objective's gradients at its output (out x out), or None for the
    plain output error. `chunk`: neurons dropped per round before refitting (default hidden / 48,
    at least 1: 48 rounds to prune everything; 1 is the exact one-at-a-time greedy). `damping`:
    the ridge added to C, relative to its mean diagonal (refit_damping chooses it). Computed in
    float64; the refitted weights come back in the weight's dtype."""
    _check(weight, gram, out_gram, counts)
    w, c, g, ridge = _float64(weight, gram, out_gram, damping)
    hidden = w.shape[1]
    step = max(1, int(chunk) if chunk else hidden // 48)
    wanted = sorted({int(n) for n in counts}, reverse=True)
    inverse = torch.linalg.inv(_damped(c, torch.arange(hidden), ridge))  # of C_KK, K shrinking
    wc = w @ c  # the refit of K is (W C)[:, K] C_KK^-1
    keep = torch.arange(hidden)
    found: dict[int, Selection] = {}
    removed: list[torch.Tensor] = []
    for target in wanted:
        while len(keep) > target:
            refit = wc[:, keep] @ inverse
            columns = refit if g is None else g @ refit
            cost = (columns * refit).sum(0) / inverse.diagonal()
            drop = torch.topk(cost, min(step, len(keep) - target), largest=False).indices
            mask = torch.ones(len(keep), dtype=torch.bool)
            mask[drop] = False
            diagonal = inverse.diagonal()
            removed.append(keep[drop])
            keep = keep[mask]
            if float(diagonal[drop].max()) > 1e6 * float(diagonal.min()):  # near-null directions: the downdate would cancel
                inverse = torch.linalg.inv(_damped(c, keep, ridge))
            else:
                inverse = _downdate(inverse, mask)
        found[target] = _refit(weight, w, c, g, keep, wc[:, keep], _damped(c, keep, ridge))
    removal = torch.cat([*removed, keep])
    return Sweep([found[int(n)] for n in counts], removal, tuple(wanted))


def _refit(weight: torch.Tensor, w: torch.Tensor, c: torch.Tensor, g: torch.Tensor | None, keep: torch.Tensor,
           wc_keep: torch.Tensor, ckk: torch.Tensor) -> Selection:
    """The selection of the sorted neurons `keep`: the down projection refitted on them (float64 `w`,
    `c`, `g`; wc_keep = (W C)[:, K], ckk = C_KK with the ridge), with its predicted error."""
    if len(keep) == w.shape[1]:  # nothing dropped: the weight itself, not a damped refit of it
        return Selection(keep.clone(), weight.detach().clone(), 0.0)
    refit = _solve(wc_keep, ckk)
    return Selection(keep.clone(), refit.to(weight.dtype), _error(w, c, g, keep, refit))


def refit_kept(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, out_gram: torch.Tensor | None = None, *,
               damping: float = 1e-6) -> Selection:
    """The selection of given kept neurons (`keep`, sorted; e.g. Sweep.kept of an earlier sweep): the
    down projection refitted on them, as prune_sweep refits its own, without choosing again."""
    _check(weight, gram, out_gram, [len(keep)])
    keep = keep.to(torch.long)
    if keep.dim() != 1 or bool((keep[1:] <= keep[:-1]).any()) or int(keep.min()) < 0 or int(keep.max()) >= weight.shape[1]:
        raise ValueError(f"the kept neurons must be sorted, unique indices in [0, {weight.shape[1]})")
    w, c, g, ridge = _float64(weight, gram, out_gram, damping)
    return _refit(weight, w, c, g, keep, w @ c[:, keep], _damped(c, keep, ridge))


def prune_neurons(weight: torch.Tensor, gram: torch.Tensor, count: int, out_gram: torch.Tensor | None = None, *,
                  chunk: int | None = None, damping: float = 1e-6) -> Selection:
    """The greedy selection of `count` hidden neurons and the refitted down projection (prune_curve)."""
    return prune_curve(weight, gram, [count], out_gram, chunk=chunk, damping=damping)[0]


def params_kept(out_features: int, in_features: int, count: int, *, up_bias: bool = True, projections: int = 1) -> int:
    """Parameters of an MLP pruned to `count` hidden neurons: `projections` up projections (2 with a
    gate) of in_features inputs, with their biases when `up_bias`, and the down projection's weight
    (its bias, of out_features values, is unchanged and not counted)."""
    return count * (projections * (in_features + (1 if up_bias else 0)) + out_features)
