"""Reference decompositions applied by hand, to bound what tngraph reaches.

A compressed model is only as good as the decomposition it applies: these helpers rebuild that
decomposition outside the pipeline, from the model's own weights and the inputs that reach each
layer (plain torch: forward hooks, Cholesky, torch.linalg.svd), so that a test can assert that
the compressed model computes that reference, or that its error is within a few percent of the
reference's. A model that outputs zeros
(relative error 1), a factorization of the wrong layer or a wrong graph lies far outside that bound,
while random weights at half the parameters, whose truncation error is large, still pass.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (float64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _call(model: torch.nn.Module, sample: Any) -> Any:
    if isinstance(sample, torch.Tensor):
        return model(sample)
    if isinstance(sample, tuple) and len(sample) == 2 and isinstance(sample[0], tuple) and isinstance(sample[1], dict):
        return model(*sample[0], **sample[1])
    if isinstance(sample, (tuple, list)):
        return model(*sample)
    return model(**sample)


def linear_grams(model: torch.nn.Module, samples: Iterable[Any]) -> dict[str, torch.Tensor]:
    """X^T X (float64) of the inputs reaching each nn.Linear of `model` over the calibration samples
    (tensors, tuples of positional inputs or (args, kwargs) pairs), by forward hooks."""
    grams: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            def hook(mod, inputs, output, name=name):
                x = inputs[0].detach().reshape(-1, mod.in_features).double()
                grams[name] = grams.get(name, 0) + x.T @ x
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for sample in samples:
                _call(model, sample)
    finally:
        for h in hooks:
            h.remove()
    return grams


def truncated(weight: torch.Tensor, rank: int, gram: torch.Tensor | None = None, damping: float = 1e-4,
              out_factor: torch.Tensor | None = None) -> torch.Tensor:
    """The best rank-`rank` approximation W' of `weight` (out x in), by float64 torch.linalg.svd:
    in ||L^T (W - W') S||_F with S S^T = X^T X + damping * mean(diag) * I when `gram` is given
    (activation-aware, SVD-LLM) and L = `out_factor` (L L^T the output-side Gram matrix, as
    tngraph's output whitening holds it; Gauss-Newton / K-FAC) when given; the plain Frobenius
    norm without either. W' does not depend on which square roots S and L are. In the weight's dtype."""
    w = weight.detach().double()
    chol = None
    if gram is not None:
        g = gram.detach().double().clone()
        g.diagonal().add_(damping * float(g.diagonal().mean()))
        chol = torch.linalg.cholesky(g)
        w = w @ chol
    left = out_factor.detach().double().to(w.device) if out_factor is not None else None
    if left is not None:
        w = left.T @ w
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    low = (u[:, :rank] * s[:rank]) @ vh[:rank]
    if left is not None:
        low = torch.linalg.solve(left.T, low)
    if chol is not None:
        low = torch.linalg.solve_triangular(chol, low, upper=False, left=False)
    return low.to(weight.dtype)


def layer_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor | None = None,
                out_factor: torch.Tensor | None = None) -> float:
    """||L^T (W - W') X^T|| / ||L^T W X^T|| from the Gram matrix G = X^T X (the relative output error
    of the layer on those inputs, what tngraph's guard records, when `out_factor` is None)."""
    w = weight.detach().double()
    d = approx.detach().double().to(w.device) - w
    if out_factor is not None:
        left = out_factor.detach().double().to(w.device)
        w, d = left.T @ w, left.T @ d
    if gram is None:
        return float(d.norm() / w.norm())
    g = gram.detach().double().to(w.device)
    return float((((d @ g) * d).sum() / ((w @ g) * w).sum()).clamp_min(0).sqrt())


def by_hand(model: torch.nn.Module, ranks: dict[str, int], grams: dict[str, torch.Tensor] | None = None,
            damping: float = 1e-4, out_factors: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """A copy of `model` whose nn.Linear layers named in `ranks` hold their truncated SVD at that
    rank (whitened by the layer's entry in `grams` and `out_factors`, where there is one); every
    other layer as it was."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, rank in ranks.items():
            layer = ref.get_submodule(name)
            gram = grams.get(name) if grams else None
            left = out_factors.get(name) if out_factors else None
            layer.weight.copy_(truncated(layer.weight, rank, gram, damping, left))
    return ref


def substituted(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of `model` whose nn.Linear layers named in `weights` hold the given dense weights."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, weight in weights.items():
            ref.get_submodule(name).weight.copy_(weight.detach().to(ref.get_submodule(name).weight.dtype))
    return ref


def lowrank_ranks(module: torch.nn.Module) -> dict[str, int]:
    """{layer path: rank} of the LowRankLinear layers of a compressed module."""
    from tngraph.modules import LowRankLinear

    return {name: m.rank for name, m in module.named_modules() if isinstance(m, LowRankLinear)}


def graph_ranks(gm: torch.fx.GraphModule) -> dict[str, int]:
    """{layer path: rank} of the low-rank factors in a rewritten graph ("<path>.weight_lowrank_a", out x r)."""
    return {name.rsplit(".", 1)[0]: p.shape[1] for name, p in gm.named_parameters() if name.endswith(".weight_lowrank_a")}


def output_factors(ctx, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """{target: L} of the output whitening (L L^T the damped output-gradient Gram matrix) that
    tngraph's factorize applied to each low-rank target of a run's PassContext, where it applied one.
    A target whose gradient statistics were kept projected onto its inputs (W^T G W) has no L in
    the run: its G is summed again from `model` (the original), on the same batches and probes."""
    from tngraph.passes.fisher import output_whitening
    from tngraph.tn.whitening import ProjectedGradGram, whitening_from_gram

    factors, full = {}, None
    for name, plan in ctx.plan.items():
        white = output_whitening(ctx, name) if plan.format == "lowrank" else None
        if isinstance(white, ProjectedGradGram):
            if model is None:
                raise ValueError(f"{name}'s output-gradient statistics are projected: pass the original model to output_factors")
            full = full if full is not None else full_gradient_stats(ctx, model)
            white = whitening_from_gram(full[name].gram, full[name].damping(ctx.config.output_damping))
        if white is not None:
            factors[name] = white.s
    return factors


def full_gradient_stats(ctx, model: torch.nn.Module) -> dict:
    """The output-gradient statistics (G, out x out) of every linear target of `model`, by the
    fisher pass with Config.short_side off, on a run's batches, objective and seed."""
    import tngraph
    from tngraph.passes import PassContext, targets
    from tngraph.passes.fisher import collect
    from tngraph.pipeline import run_passes

    gm = tngraph.capture(model, ctx.calibration[0])
    full = PassContext(config=ctx.config.replace(short_side=False), calibration=ctx.calibration, objective=ctx.objective)
    run_passes(gm, full, [targets])
    collect(gm, full)
    return full.grad_stats


def plan_weights(ctx) -> dict[str, torch.Tensor]:
    """{target: W'}: the dense weight each target's factors in a run's plan stand for."""
    weights = {}
    for name, plan in ctx.plan.items():
        f = plan.factors
        if plan.format != "lowrank":
            weights[name] = plan.tensor_network().to_dense()
        elif "dense" in f:
            weights[name] = torch.cat([f["a"] @ f["b"], f["dense"]]).index_select(0, f["order"])
        else:
            weights[name] = f["a"] @ f["b"]
    return weights


def stats_sum(stats: Any) -> torch.Tensor | None:
    """A target's calibration sum in float64, whichever side it was taken on: X^T X (GramStats) or
    W X^T X W^T (OutputGramStats, a low-rank target narrower out than in)."""
    from tngraph.calibration import OutputGramStats

    return stats.output_gram if isinstance(stats, OutputGramStats) else stats.gram
