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


def _refit(w: torch.Tensor, c: torch.Tensor, keep: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W C[:, K] C_KK^-1, C_KK^-1) with C_KK damped by `damping` times its mean diagonal."""
    ckk = c[keep][:, keep]
    ckk = ckk + damping * max(float(ckk.diagonal().mean()), 1e-300) * torch.eye(len(keep), dtype=c.dtype, device=c.device)
    inverse = torch.linalg.inv(ckk)
    return w @ c[:, keep] @ inverse, inverse


def _error(w: torch.Tensor, c: torch.Tensor, g: torch.Tensor | None, keep: torch.Tensor, refit: torch.Tensor) -> float:
    delta = w.clone()
    delta[:, keep] -= refit
    weighted = delta if g is None else g @ delta
    return float(((weighted @ c) * delta).sum())


def prune_curve(weight: torch.Tensor, gram: torch.Tensor, counts: Sequence[int], out_gram: torch.Tensor | None = None, *,
                chunk: int | None = None, damping: float = 1e-6) -> list[Selection]:
    """The greedy selection at each of `counts` (neurons kept), in the order given, from one sweep.

    weight: the down projection (out x hidden); gram: sum of h h^T of its inputs (hidden x hidden);
    out_gram: sum of g g^T of the objective's gradients at its output (out x out), or None for the
    plain output error. `chunk`: neurons dropped per round before refitting (default hidden / 48,
    at least 1: 48 rounds to prune everything; 1 is the exact one-at-a-time greedy). Computed in
    float64; the refitted weights come back in the weight's dtype."""
    _check(weight, gram, out_gram, counts)
    w, c = weight.detach().to(torch.float64), gram.detach().to(torch.float64)
    g = out_gram.detach().to(torch.float64) if out_gram is not None else None
    hidden = w.shape[1]
    step = max(1, int(chunk) if chunk else hidden // 48)
    wanted = sorted({int(n) for n in counts}, reverse=True)
    keep = torch.arange(hidden)
    found: dict[int, Selection] = {}
    for target in wanted:
        while len(keep) > target:
            refit, inverse = _refit(w, c, keep, damping)
            columns = refit if g is None else g @ refit
            cost = (columns * refit).sum(0) / inverse.diagonal()
            drop = torch.topk(cost, min(step, len(keep) - target), largest=False).indices
            mask = torch.ones(len(keep), dtype=torch.bool)
            mask[drop] = False
            keep = keep[mask]
        if target == hidden:  # nothing dropped: the weight itself, not a damped refit of it
            found[target] = Selection(keep.clone(), weight.detach().clone(), 0.0)
            continue
        refit, _ = _refit(w, c, keep, damping)
        found[target] = Selection(keep.clone(), refit.to(weight.dtype), _error(w, c, g, keep, refit))
    return [found[int(n)] for n in counts]


def prune_neurons(weight: torch.Tensor, gram: torch.Tensor, count: int, out_gram: torch.Tensor | None = None, *,
                  chunk: int | None = None, damping: float = 1e-6) -> Selection:
    """The greedy selection of `count` hidden neurons and the refitted down projection (prune_curve)."""
    return prune_curve(weight, gram, [count], out_gram, chunk=chunk, damping=damping)[0]


def params_kept(out_features: int, in_features: int, count: int, *, up_bias: bool = True, projections: int = 1) -> int:
    """Parameters of an MLP pruned to `count` hidden neurons: `projections` up projections (2 with a
    gate) of in_features inputs, with their biases when `up_bias`, and the down projection's weight
    (its bias, of out_features values, is unchanged and not counted)."""
    return count * (projections * (in_features + (1 if up_bias else 0)) + out_features)
