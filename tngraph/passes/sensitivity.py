"""sensitivity: how much each target's compression costs, as a loss-versus-parameters curve.

For every target and every candidate rank of the low-rank format, the loss is the predicted squared
relative error of the model's output when only that target is compressed:

- "spectral": the whitened singular-value tail. With X^T X = S S^T, the rank-r whitened SVD leaves
  ||(W - W')X^T||^2 = sum_{i>r} s_i^2 of W·S, so tail(r) = sum_{i>r} s_i^2 / sum_i s_i^2 is the
  target's own relative output error, free once the Gram matrix is known (with output whitening,
  of L^T·W·S, the output channels weighted by the fisher pass's gradient Gram G = L L^T). It ignores
  how much the target's error matters to the model's output.
- "fisher": the Gauss-Newton (K-FAC) prediction of the model's output error: tail(r) times
  ||L^T W S||^2 over the objective's energy, so targets are compared in the same units; no forward
  passes beyond the fisher pass's.
- "measured": the spectral curve rescaled per target by end-to-end measurements: at a few ranks
  the target is replaced by its whitened SVD, every other target held at an operating point (first
  the uniform ranks, then, for each further `sensitivity_rounds`, the allocation the previous curves
  give), and its share of the model's output error on calibration batches is measured; between the
  ranks the ratio share / tail is interpolated.

The curves go to ctx.curves for the budgeted allocator; node.meta["tngraph"].sensitivity holds a
summary (the loss at the uniform rank of the budget).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .. import latency, memory, meta, predictor
from ..layers import QUANT_LAYERS
from ..progress import progress
from ..tn.formats import FORMATS, rank_for_params
from ..tn.lowrank import decompose_lowrank, squared_singular_values
from ..tn.prune import prune_sweep
from ..tn.quant import Choice, candidates, layer_weight, quantize_choice, tensor_bytes
from ..tn.whitening import OutputGram, ProjectedGradGram
from .allocate import budgeted_choice, budgeted_plans
from ..distributed import share_map
from .base import PassContext, PassResult, declare, recorded, replay, spread
from .calibrate import input_whitening
from .head import head_targets, reduced_head
from .fisher import output_whitening
from .mlp import block_params, block_statistics, marked_pairs, pair_members, record_sweep
from .targets import target_weight

log = logging.getLogger(__name__)

GRID = predictor.GRID  # kept fractions measured end to end ("measured") and predicted ("predicted")
MEASURE_BATCHES = 4


@dataclass
class Curve:
    """Candidates for one target, cheapest first: (rank or None for dense, parameters, loss, cost);
    cost is what the budget counts (Config.budget_kind: parameters, weight bytes or seconds)."""

    name: str
    ranks: list[int | None]
    params: list[int]
    loss: list[float]
    cost: list[float] | None = None
    dense_rows: list[int] | None = None  # patch level: output rows kept dense beside the rank
    formats: list[str] | None = None  # "lowrank" unless Config.mixture adds tensor-network candidates
    quant: list[Choice | None] | None = None  # the precision of quantized candidates (Config.bits), None elsewhere

    def __post_init__(self) -> None:
        if self.cost is None:
            self.cost = [float(p) for p in self.params]
        if self.dense_rows is None:
            self.dense_rows = [0] * len(self.ranks)
        if self.formats is None:
            self.formats = ["lowrank"] * (len(self.ranks) - 1) + ["dense"]
        if self.quant is None:
            self.quant = [None] * len(self.ranks)

    def index(self, rank: int | None, dense_rows: int = 0, fmt: str = "lowrank") -> int:
        fmt = "dense" if rank is None else fmt
        return next(i for i, (r, k, f) in enumerate(zip(self.ranks, self.dense_rows, self.formats))
                    if r == rank and k == dense_rows and f == fmt)

    def at_rank(self, rank: int, dense_rows: int = 0, fmt: str = "lowrank") -> float:
        return self.loss[self.index(rank, dense_rows, fmt)]


def _target_spectrum(gm: fx.GraphModule, ctx: PassContext, node: fx.Node, keep: bool = False) -> dict[str, Any]:
    """One target's whitened spectrum (tail[r] for r = 0..n), whitenings (`keep`: for measuring) and
    predicted energy, and the patch-level and mixture points the configuration asks for (into ctx.analysis)."""
    cfg, t = ctx.config, meta.info(node).target
    w, white, out_white = whitened_weight(gm, ctx, t)
    s2 = _spectrum(target_weight(gm, t), w, white, out_white)
    tail = (s2.sum() - torch.cumsum(s2, 0)) / s2.sum().clamp_min(1e-300)
    out = {"spectrum": torch.cat([torch.ones(1, dtype=torch.float64), tail]).clamp_min(0).tolist(),
           # kept only where measurement rounds decompose again; else they go as soon as the spectrum is known
           "whitenings": (white, out_white) if keep else (None, None),
           "energy": _predicted_energy(ctx, t.name, out_white is not None, s2)}
    if t.name in ctx.analysis.get("head_targets", {}) and white is not None and out_white is None:
        out["energy"] = _head_energy(ctx, t, s2)
    # a convolution's candidates are low rank only (its layer has no dense rows or tensor networks)
    if cfg.dense_rows and white is not None and t.conv is None:
        _row_spectra(gm, ctx, t, white, out_white, float(s2.sum()))
    if cfg.mixture and t.conv is None:
        _mixture_points(gm, ctx, t, white, out_white, float(s2.sum()))
    if cfg.bits and t.conv is None and not t.lookups:  # a tied head's table gathers its low-rank rows: low rank only
        _quant_points(gm, ctx, t, white, out_white, float(s2.sum()))
    if cfg.sensitivity == "predicted" and out["energy"] is not None:
        image, scalars = predictor.features(w, out["energy"])
        out["predicted"] = predictor.predict(image, scalars)
    return out


@declare(kind="analysis", requires=("targets", "calibration"), produces=("sensitivity",))
def sensitivity(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    cfg = ctx.config
    if cfg.allocation_kind == "uniform":
        return PassResult(gm, modified=False, summary={"skipped": "uniform allocation"})
    pruned = pair_members(gm, ctx)  # pruned MLP blocks: one curve each, under the down projection's name (_block_curves)
    nodes = [n for n in meta.targets(gm) if meta.info(n).target.kind == "linear" and meta.info(n).target.name not in pruned]
    measures = cfg.sensitivity == "measured" or cfg.refine
    # the measurements compare outputs through their squared error: a language model's head runs
    # reduced; a head that is a target is held dense meanwhile, its share known without measuring
    held = head_targets(gm, ctx) if measures and cfg.whiten else set()
    with reduced_head(gm, ctx, held=bool(held)) if measures else contextlib.nullcontext() as reduced:
        held = held if reduced else set()
        # the measured search is timed and counted first (its grid; then with the candidates the
        # spectra add): over Config.time_budget, the whitenings it would keep are never made twice
        error = _probe(gm, ctx) if cfg.sensitivity == "measured" and ctx.calibration else None
        if marked_pairs(gm, ctx):  # pruned MLP blocks: their curves, measured against a dense background
            _block_curves(gm, ctx, error)
        over = _over_time_budget(ctx, nodes, held, error)
        spectra, whitenings, energy, scale = _spectra(gm, ctx, nodes, keep=error is not None and over is None)
        over = over or _over_time_budget(ctx, nodes, held, error)
        if over is not None:
            scale = _fall_back(ctx, over, energy, spectra)
        if error is not None and over is None:
            _measured_curves(gm, ctx, nodes, spectra, whitenings, held, error)
        else:
            _build_curves(gm, ctx, nodes, spectra, scale, kind=over["used"] if over else None)
        del whitenings
        for _ in range(cfg.sensitivity_rounds if cfg.refine else 0):
            refine(gm, ctx, cfg.refine, held)
    memory.return_freed(collect=False)  # the whitenings and measurement buffers go back to the system
    kind = ctx.analysis.get("sensitivity_fallback", {}).get("used", cfg.sensitivity)
    ctx.counters[f"sensitivity.{kind}"] += len(nodes)
    log.info("sensitivity (%s): %d targets", kind, len(nodes))
    return PassResult(gm, modified=bool(nodes), summary={"targets": len(nodes), "kind": kind})


BLOCK_GRID = 32  # a pruned block's candidates: every hidden/BLOCK_GRID neurons


def _block_curves(gm: fx.GraphModule, ctx: PassContext, error: Any = None) -> None:
    """Each pruned MLP block's curve (Config.mlp == "prune", budgeted allocation), kept under its down
    projection's name: every hidden/BLOCK_GRID neurons, the whole block's parameters, and the
    predicted error of one greedy sweep (tngraph.tn.prune) as a fraction of the block's output
    energy, scaled like the other targets' curves: by the fisher energy ("fisher", "predicted"), or
    by the share of the model's output error measured at the GRID fractions with every other target
    dense ("measured": `error`, the probe; a pruned candidate is its refitted down projection with the
    dropped columns zeroed, shapes unchanged)."""
    infos = {meta.info(n).target.name: meta.info(n).target for n in meta.targets(gm)}
    for down, pair in progress(list(marked_pairs(gm, ctx).items()), desc="blocks", enabled=ctx.config.progress, unit="block"):
        weight, gram, out_gram, damping = block_statistics(gm, ctx, pair)
        counts = sorted({max(1, pair.hidden * k // BLOCK_GRID) for k in range(1, BLOCK_GRID)})
        swept = prune_sweep(weight, gram, counts, out_gram, damping=damping)
        record_sweep(ctx, down, swept)  # factorize reads the chosen count's neurons back instead of sweeping again
        sweep = swept.selections
        w = weight.detach().to(torch.float64)
        total = float((((w if out_gram is None else out_gram @ w) @ gram.to(torch.float64)) * w).sum())
        rel = [s.error / max(total, 1e-300) for s in sweep]
        scale = _block_scale(ctx, pair, weight, counts, sweep, rel, total, error)
        members = [infos[name] for name in (*pair.ups, down)]
        params = [sum(block_params(members, n)) for n in counts]
        dense = sum(t.dense_params for t in members)
        unit = weight.element_size() if ctx.config.budget_kind == "bytes" else 1
        ctx.curves[down] = Curve(down, [*counts, None], [*params, dense], [r * scale(n) for r, n in zip(rel, counts)] + [0.0],
                                 [float(p * unit) for p in params] + [float(dense * unit)], formats=["prune"] * len(counts) + ["dense"])
        ctx.counters["sensitivity.pruned_blocks"] += 1


def _block_scale(ctx: PassContext, pair, weight: torch.Tensor, counts: list[int], sweep, rel: list[float], total: float, error: Any):
    """count -> what turns a block's relative error into the curves' loss (see _block_curves); `weight`
    is the down projection's, swapped in place while measuring."""
    stats, grads = ctx.stats.get(pair.down), ctx.grad_stats.get(pair.down)
    if error is not None:
        original, points = weight.detach().clone(), []
        try:
            with torch.no_grad():
                for kept in GRID:
                    i = min(range(len(counts)), key=lambda j: abs(counts[j] - kept * pair.hidden))
                    candidate = torch.zeros_like(weight)
                    candidate[:, sweep[i].keep] = sweep[i].weight.to(weight.dtype)
                    weight.copy_(candidate)
                    share = error()
                    points.append((counts[i], share / rel[i] if rel[i] > 1e-12 else 1.0))
        finally:
            with torch.no_grad():
                weight.copy_(original)
        positive = [p for p in points if p[1] > 0]
        return _interpolator(positive or [(n, 1e-12) for n, _ in points])
    if ctx.config.sensitivity in ("fisher", "predicted", "measured") and grads is not None and grads.energy > 0 and stats.rows > 0:
        energy = total / stats.rows / grads.energy
        return lambda n: energy
    return lambda n: 1.0


def _spectra(gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node], keep: bool) -> tuple[dict, dict, dict, dict]:
    """(spectra, whitenings (kept with `keep`, for measuring), predicted energies, the curves' scale
    for the fisher and predicted sensitivities) of every target."""
    cfg = ctx.config
    spectra, whitenings, energy, predicted = {}, {}, {}, {}
    # per target, on the rank that owns it (ctx.group), what the spectra loop records shared after
    done = share_map(ctx.group, nodes, lambda node: recorded(ctx, meta.info(node).target.name, lambda: _target_spectrum(gm, ctx, node, keep)),
                     wrap=lambda items: progress(items, desc="spectra", enabled=cfg.progress, unit="layer"))
    for j, (node, (result, effects)) in enumerate(done.items()):
        name = meta.info(node).target.name
        if ctx.group is not None and ctx.group.owner(j) != ctx.group.rank:
            replay(ctx, name, effects)
        spectra[name], whitenings[name], energy[name] = result["spectrum"], result["whitenings"], result["energy"]
        if "predicted" in result:
            predicted[name] = result["predicted"]
    ctx.analysis["fisher_energy"] = dict(energy)
    scale = {name: (lambda r: 1.0) for name in spectra}
    if cfg.sensitivity in ("fisher", "predicted"):
        if any(e is None for e in energy.values()):
            log.warning("sensitivity: %s needs calibration data and output whitening; using the spectral curves", cfg.sensitivity)
        elif cfg.sensitivity == "fisher":
            scale = {name: (lambda r, e=e: e) for name, e in energy.items()}
        else:
            scale = {}
            for node in nodes:
                t = meta.info(node).target
                ratios, patches = predicted[t.name]
                interp = _interpolator([(r, math.exp(v)) for r, v in zip(_grid_ranks(t), ratios)])
                scale[t.name] = lambda r, e=energy[t.name], f=interp: e * f(r)
                ctx.analysis.setdefault("patch_sensitivity", {})[t.name] = patches.exp()
    return spectra, whitenings, energy, scale


def _over_time_budget(ctx: PassContext, nodes: list[fx.Node], held: set[str], error: Any) -> dict[str, Any] | None:
    """The measured search's prediction ({"predicted_seconds", "forwards"}) when its forwards, timed
    on the probe's first, would take longer than Config.time_budget; None when they fit (or nothing
    is measured). Before the spectra it counts the grid only; after, the candidates they add."""
    cfg = ctx.config
    if error is None or not cfg.time_budget:
        return None
    forwards = cfg.sensitivity_rounds * sum(_measure_forwards(ctx, meta.info(n).target) for n in nodes if meta.info(n).target.name not in held)
    seconds = forwards * error.seconds
    return {"predicted_seconds": seconds, "forwards": forwards, "seconds_per_forward": error.seconds} if seconds > cfg.time_budget else None


def _fall_back(ctx: PassContext, over: dict[str, Any], energy: dict[str, float | None], spectra: dict[str, list[float]]) -> dict[str, Any]:
    """The curves' scale in place of a measured search over its time budget: fisher's, else spectral (logged)."""
    fisher = all(e is not None for e in energy.values())
    over["used"] = "fisher" if fisher else "spectral"
    log.warning("sensitivity: measuring would take about %.0f s (%d forwards of %.2f s), over the time budget of %.0f s "
                "(--time-budget); using the %s sensitivity instead", over["predicted_seconds"], over["forwards"],
                over["seconds_per_forward"], ctx.config.time_budget, over["used"])
    ctx.analysis["sensitivity_fallback"] = over
    ctx.counters["sensitivity.time_budget_fallback"] += 1
    return {name: (lambda r, e=e: e) for name, e in energy.items()} if fisher else {name: (lambda r: 1.0) for name in spectra}


def _measured_curves(gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node], spectra: dict[str, list[float]],
                     whitenings: dict[str, Any], held: set[str], error: Any) -> None:
    """The measured sensitivity's curves: measured around the uniform ranks (or, with precision
    candidates, with the others dense), then `sensitivity_rounds - 1` times around the allocation
    the last curves give."""
    cfg = ctx.config
    # with precision candidates, each target is measured with the others dense: quantization errors
    # are small and add up, and the uniform low-rank point would be far from where the model operates
    dense_point = {meta.info(n).target.name: None for n in nodes} if cfg.bits else None
    scale = _measure(gm, ctx, nodes, spectra, whitenings, dense_point, held, error)
    _build_curves(gm, ctx, nodes, spectra, scale)
    for _ in range(cfg.sensitivity_rounds - 1):
        # measure again around the allocation the last curves give: errors interact, so the shares
        # are best measured where the model will actually operate
        plans = budgeted_plans(gm, ctx)
        ranks = {t.name: _operating_rank(t, plans[t.name]) for t in (meta.info(n).target for n in nodes) if t.name in plans}
        scale = _measure(gm, ctx, nodes, spectra, whitenings, ranks, held)
        _build_curves(gm, ctx, nodes, spectra, scale)


def _measure_forwards(ctx: PassContext, t: meta.TargetInfo) -> int:
    """The probe forwards `_measure` runs for one target: its floor, the grid, its mixture and precision candidates."""
    return 1 + len(_grid_ranks(t)) + len(ctx.analysis.get("mixture", {}).get(t.name, [])) + len(ctx.analysis.get("quant", {}).get(t.name, []))


def whitened_weight(gm: fx.GraphModule, ctx: PassContext, t: meta.TargetInfo):
    """(L^T W S in float64, the input whitening, the output whitening): the weight in the
    coordinates the low-rank decomposition truncates (either side None when not used). A target
    calibrated through its outputs has no S, and one whose output gradients were kept projected
    onto its inputs no L: their whitened weight is None (their OutputGram or ProjectedGradGram gives
    the spectrum and the factors)."""
    w = target_weight(gm, t).detach().to(torch.float64)
    white, out_white = input_whitening(ctx, t), None
    if white is not None:
        out_white = output_whitening(ctx, t.name)
        if isinstance(white, OutputGram) or isinstance(out_white, ProjectedGradGram):
            return None, white, out_white
        w = white.apply(w)
        w = out_white.apply_left(w) if out_white is not None else w
    return w, white, out_white


def _spectrum(weight: torch.Tensor, w: torch.Tensor | None, white, out_white) -> torch.Tensor:
    """The squared singular values of the whitened weight `w`, or, where whitened_weight gave None,
    from the Gram matrix of its short side."""
    if w is not None:
        return squared_singular_values(w)
    if isinstance(out_white, ProjectedGradGram):
        return out_white.spectrum(weight, white)
    return white.spectrum(weight, out_white)


DENSE_ROWS = (1, 4, 16, 64)  # patch level: how many of a target's output rows may stay dense


def _row_spectra(gm: fx.GraphModule, ctx: PassContext, t: meta.TargetInfo, white, out_white, total: float) -> None:
    """Patch level: order the target's output rows by their share of the error the uniform-rank
    decomposition leaves (the Gauss-Newton error's diagonal, G_ii · r_i X^T X r_i^T), and for each
    count k in DENSE_ROWS the relative tails of the rest once the k worst rows stay dense:
    tail_k(r) = ||L_rest^T (W_rest - W_rest,r) S||^2 / ||L^T W S||^2."""
    cfg = ctx.config
    fmt = FORMATS["svd"]
    weight = target_weight(gm, t).detach().to(torch.float64)
    bias = t.out_features if t.bias else 0
    uniform = rank_for_params(fmt, t.out_features, t.in_features, cfg.budget * t.dense_params - bias)
    a, b = decompose_lowrank(weight, uniform, white, out_white)
    residual = weight - a @ b
    gram = ctx.stats[t.name].gram.to(torch.float64)
    grads = ctx.grad_stats.get(t.name)
    g_diag = grads.diag() if grads is not None and grads.rows > 0 else torch.ones(t.out_features, dtype=torch.float64)
    score = g_diag * ((residual @ gram) * residual).sum(1)
    order = torch.argsort(score, descending=True)
    ctx.analysis.setdefault("row_order", {})[t.name] = order
    tails = {}
    for k in DENSE_ROWS:
        if k > t.out_features // 4:
            break
        rest = order[k:].sort().values
        w = white.apply(weight[rest])
        rest_white = output_whitening(ctx, t.name, rows=rest) if out_white is not None else None
        w = rest_white.apply_left(w) if rest_white is not None else w
        s2 = squared_singular_values(w)
        tails[k] = ((s2.sum() - torch.cumsum(s2, 0)) / max(total, 1e-300)).clamp_min(0)
    ctx.analysis.setdefault("row_tails", {})[t.name] = tails
    ctx.counters["sensitivity.dense_rows.targets"] += 1


def _mixture_approx(ctx: PassContext, weight: torch.Tensor, name: str, rank: int, whitening) -> torch.Tensor:
    """The dense matrix of a mixture format's decomposition of `weight` at `rank` with the format's
    `whitening` (input_whitening, as factorize uses), without the refit."""
    fmt = FORMATS[name]
    return fmt.decompose(weight.detach().to(torch.float64), rank, whitening, **fmt.options(ctx.config)).to_dense().to(torch.float64)


def _mixture_points(gm: fx.GraphModule, ctx: PassContext, t: meta.TargetInfo, white, out_white, total: float) -> None:
    """Format mixture: each Config.mixture format decomposed at the ranks keeping the GRID fractions
    (with its own whitening, as factorize does, without the refit), and its error measured in the
    units of the low-rank curve: ||L^T (W - W') S||^2 / ||L^T W S||^2 (S the full input whitening)."""
    cfg = ctx.config
    weight = target_weight(gm, t).detach().to(torch.float64)
    bias = t.out_features if t.bias else 0
    points = []
    for name in cfg.mixture:
        fmt = FORMATS[name]
        options = fmt.options(cfg)
        fmt_white = input_whitening(ctx, t, name, **options)
        for rank in sorted(set(_grid_ranks(t, name, **options))):
            params = fmt.params(t.out_features, t.in_features, rank, **options) + bias
            if params >= t.dense_params:
                continue
            try:
                approx = _mixture_approx(ctx, weight, name, rank, fmt_white)
            except Exception as exc:  # a format that cannot reach this rank (CP not converging): not a candidate
                log.info("mixture: %s at rank %d of %s skipped: %s", name, rank, t.name, exc)
                continue
            delta = weight - approx
            delta = white.apply(delta) if white is not None else delta
            delta = out_white.apply_left(delta) if out_white is not None else delta
            points.append((name, rank, params, float((delta**2).sum()) / max(total, 1e-300)))
    ctx.analysis.setdefault("mixture", {})[t.name] = points
    ctx.counters["sensitivity.mixture.targets"] += 1


def quant_tensors(ctx: PassContext, t: meta.TargetInfo, weight: torch.Tensor, choice: Choice) -> dict[str, torch.Tensor]:
    """The quantized layer's tensors of a target's `weight` at `choice`, error feedback on its
    calibration Gram when whitening is on (what factorize stores)."""
    stats = ctx.stats.get(t.name)
    usable = ctx.config.whiten and stats is not None and stats.rows > 0 and stats.gram is not None
    return quantize_choice(weight.detach(), choice, stats.gram if usable else None)


def quant_weight(tensors: dict[str, torch.Tensor], choice: Choice) -> torch.Tensor:
    """The (out x in) matrix a quantized layer's tensors stand for (its layer's key order)."""
    return layer_weight([tensors[k] for k in QUANT_LAYERS[choice.format].factors], choice.bits)


def _quant_points(gm: fx.GraphModule, ctx: PassContext, t: meta.TargetInfo, white, out_white, total: float) -> None:
    """Precision candidates (Config.bits): each quantized as factorize would, its stored bytes, and
    its error in the low-rank curve's units, ||L^T (W - W') S||^2 / ||L^T W S||^2."""
    weight = target_weight(gm, t).detach()
    bias_bytes = (t.out_features if t.bias else 0) * weight.element_size()
    points = []
    for choice in candidates(ctx.config.bits, t.out_features, t.in_features):
        tensors = quant_tensors(ctx, t, weight, choice)
        delta = weight.to(torch.float64) - quant_weight(tensors, choice).to(torch.float64)
        delta = white.apply(delta) if white is not None else delta
        delta = out_white.apply_left(delta) if out_white is not None else delta
        points.append((choice, tensor_bytes(tensors) + bias_bytes, float((delta**2).sum()) / max(total, 1e-300)))
    kept = undominated(points)
    ctx.analysis.setdefault("quant", {})[t.name] = kept
    ctx.counters["sensitivity.quant.candidates"] += len(kept)
    ctx.counters["sensitivity.quant.dominated"] += len(points) - len(kept)


def undominated(points: list[tuple[Choice, int, float]]) -> list[tuple[Choice, int, float]]:
    """The candidates no other candidate of the target beats in both stored bytes and predicted
    error (one that costs as much or more and loses more is never worth measuring or allocating)."""
    return [p for p in points if not any(q[1] <= p[1] and q[2] <= p[2] and (q[1], q[2]) != (p[1], p[2]) for q in points)]


def _grid_ranks(t: meta.TargetInfo, fmt_name: str = "svd", **options) -> list[int]:
    """The ranks of a format (low-rank by default) keeping the GRID fractions of a target's weight."""
    fmt = FORMATS[fmt_name]
    top = fmt.max_rank(t.out_features, t.in_features, **options)
    size = t.in_features * t.out_features
    return [max(1, min(top, rank_for_params(fmt, t.out_features, t.in_features, kept * size, **options))) for kept in GRID]


def _predicted_energy(ctx: PassContext, name: str, whitened: bool, s2: torch.Tensor) -> float | None:
    """The Gauss-Newton prediction of the objective's squared relative error when the target is
    removed altogether (tail(r) times this is the predicted error at rank r). K-FAC takes the
    per-row expectation E[g g^T ⊗ x x^T] as E[g g^T] ⊗ E[x x^T]: summed over the N_g rows the
    gradients saw, ||L^T W S||^2 / (N_g N_x) · N_g with G and X^T X summed over N_g and N_x rows,
    over the objective's energy on the same batches."""
    grads, stats = ctx.grad_stats.get(name), ctx.stats.get(name)
    if not whitened or grads is None or stats is None or grads.energy <= 0 or stats.rows <= 0:
        return None
    return float(s2.sum()) / stats.rows / grads.energy


def _head_energy(ctx: PassContext, t: meta.TargetInfo, s2: torch.Tensor, per_row: float | None = None) -> float | None:
    """The same prediction for a vocabulary head that is a target, and exact: the objective is its
    output (tngraph.passes.head), so the error of a candidate is ||(W - W') X^T||^2 over the
    objective's energy, and its input-whitened tail is that error's fraction of ||W X^T||^2 =
    ||W S||^2. Per row of each: ||W S||^2 over the head's calibration rows, and the objective's
    energy per output row (`per_row`; default: the fisher probes')."""
    stats = ctx.stats.get(t.name)
    if per_row is None:
        seen = [g for g in ctx.grad_stats.values() if g.samples > 0 and g.energy > 0]
        per_row = seen[0].energy / seen[0].samples if seen else None
    if per_row is None or per_row <= 0 or stats is None or stats.rows <= 0:
        return None
    return float(s2.sum()) / stats.rows / per_row


def _costs(gm: fx.GraphModule, ctx: PassContext, t: meta.TargetInfo, ranks: list[int], params: list[int],
           rows: int = 0) -> tuple[list[float], float]:
    """What each candidate rank (with `rows` output rows kept dense), and the dense layer, spend of
    the budget (Config.budget_kind)."""
    kind = ctx.config.budget_kind
    if kind == "params":
        return [float(p) for p in params], float(t.dense_params)
    weight = target_weight(gm, t)
    if kind == "bytes":  # factors are stored in the weight's dtype
        size = weight.element_size()
        return [float(p * size) for p in params], float(t.dense_params * size)
    bias = t.bias is not None
    m = ctx.config.latency_rows
    seconds = latency.lowrank_curve(t.out_features - rows, t.in_features, ranks, bias, m, weight.dtype)
    if rows:  # the dense rows' linear (the concatenation and reordering are not timed)
        seconds = [s + latency.dense_seconds(rows, t.in_features, False, m, weight.dtype) for s in seconds]
    for i in range(1, len(seconds)):  # timing noise: never cheaper at a higher rank
        seconds[i] = max(seconds[i], seconds[i - 1])
    return seconds, latency.dense_seconds(t.out_features, t.in_features, bias, m, weight.dtype)


def _operating_rank(t: meta.TargetInfo, plan: meta.PlanInfo) -> int | None:
    """The low-rank rank standing in for a plan when measuring around it (None: dense): its own for
    low-rank plans, the rank of equal parameters for a mixture format's."""
    if plan.format == "dense" or plan.rank is None:
        return None
    if plan.format == "lowrank":
        return plan.rank
    return rank_for_params(FORMATS["svd"], t.out_features, t.in_features, plan.params_after - (t.out_features if t.bias else 0))


def _build_curves(gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node], spectra: dict[str, list[float]], scale: dict[str, Any],
                  kind: str | None = None) -> None:
    cfg = ctx.config
    fmt = FORMATS["svd"]
    for node in nodes:
        t = meta.info(node).target
        bias = t.out_features if t.bias else 0
        top = fmt.max_rank(t.out_features, t.in_features)
        step = max(1, top // 64)
        ranks: list[int | None] = list(range(step, top + 1, step))
        params = [fmt.params(t.out_features, t.in_features, r) + bias for r in ranks]
        loss = [spectra[t.name][r] * scale[t.name](r) for r in ranks]
        cost, dense_cost = _costs(gm, ctx, t, ranks, params)
        rows = [0] * len(ranks)
        formats = ["lowrank"] * len(ranks)
        measured_mix = ctx.analysis.get("mixture_measured", {}).get(t.name, {})
        for name, rank, p, rel in ctx.analysis.get("mixture", {}).get(t.name, []):
            # a tensor-network candidate: its measured share when measured, else its error in the
            # low-rank curve's units with that curve's correction at the rank of equal parameters
            equal = rank_for_params(fmt, t.out_features, t.in_features, p - bias)
            ranks, params, rows, formats = ranks + [rank], params + [p], rows + [0], formats + [name]
            cost += _costs(gm, ctx, t, [equal], [p])[0]
            share = measured_mix.get((name, rank))
            loss.append(share if share is not None and share > 0 else rel * scale[t.name](equal))
        quant = [None] * len(ranks)
        measured_quant = ctx.analysis.get("quant_measured", {}).get(t.name, {})
        for choice, nbytes, rel in ctx.analysis.get("quant", {}).get(t.name, []):
            # a precision candidate: its measured share when measured, else its error in the low-rank
            # curve's units with that curve's correction at the top rank (quantization error is spread
            # over every direction, as the top rank's is; quantized factors: at their rank, their error
            # mostly the truncation's)
            ranks, params, rows, formats = ranks + [choice.rank], params + [choice.params(t.out_features, t.in_features) + bias], rows + [0], formats + [choice.format]
            cost.append(float(nbytes))
            quant.append(choice)
            share = measured_quant.get(choice)
            loss.append(share if share is not None and share > 0 else rel * scale[t.name](choice.rank if choice.factored else top))
        for k, tail in ctx.analysis.get("row_tails", {}).get(t.name, {}).items():
            # patch level: k output rows dense (k x in), the other out - k rows at rank r
            extra = list(range(step, min(tail.numel(), top) + 1, step))
            extra_params = [k * t.in_features + fmt.params(t.out_features - k, t.in_features, r) + bias for r in extra]
            extra_cost, _ = _costs(gm, ctx, t, extra, extra_params, rows=k)
            ranks, params, cost, rows = ranks + extra, params + extra_params, cost + extra_cost, rows + [k] * len(extra)
            formats += ["lowrank"] * len(extra)
            loss += [float(tail[r - 1]) * scale[t.name](r) if r <= tail.numel() else 0.0 for r in extra]
        # planning around the guard: a candidate whose predicted relative output error on the
        # calibration data (the square root of its whitened spectral tail) exceeds guard_tolerance is
        # none, so the guard (still the exact check) rarely has to keep a target dense and break the plan
        over = _over_tolerance(ctx, t, spectra[t.name], ranks, rows, formats)
        quant += [None] * (len(ranks) - len(quant))
        # a quantized candidate keeps every weight (as codes): it is kept when it costs less
        keep = [i for i, (p, c) in enumerate(zip(params, cost))
                if (p < t.dense_params or quant[i] is not None) and c < dense_cost and i not in over]
        curve = Curve(t.name, [ranks[i] for i in keep] + [None], [params[i] for i in keep] + [t.dense_params],
                      [loss[i] for i in keep] + [0.0], [cost[i] for i in keep] + [dense_cost], [rows[i] for i in keep] + [0],
                      [formats[i] for i in keep] + ["dense"], [quant[i] for i in keep] + [None])
        ctx.curves[t.name] = curve
        uniform = rank_for_params(fmt, t.out_features, t.in_features, cfg.budget * t.dense_params - bias)
        score = spectra[t.name][uniform] * scale[t.name](uniform)
        meta.update(node, sensitivity=meta.SensitivityInfo(kind or cfg.sensitivity, score, uniform))


def _over_tolerance(ctx: PassContext, t: meta.TargetInfo, spectrum: list[float], ranks: list[int | None], rows: list[int],
                    formats: list[str]) -> set[int]:
    """Indices of the plain low-rank and dense-row candidates whose predicted error exceeds guard_tolerance."""
    tolerance = ctx.config.guard_tolerance
    if tolerance is None:
        return set()
    tails = ctx.analysis.get("row_tails", {}).get(t.name, {})
    over = set()
    for i, (rank, k, name) in enumerate(zip(ranks, rows, formats)):
        if name != "lowrank" or rank is None:
            continue
        if k == 0:
            tail = spectrum[rank] if rank < len(spectrum) else 0.0
        else:
            tail = float(tails[k][rank - 1]) if rank <= tails[k].numel() else 0.0
        if math.sqrt(max(tail, 0.0)) > tolerance:
            over.add(i)
    return over


def _outputs(gm: fx.GraphModule, batches, objective=None) -> tuple[list[torch.Tensor], int]:
    """(each batch's objective values, flattened in float64; how many rows they hold)."""
    outs, rows = [], 0
    with torch.no_grad():
        for args, kwargs in batches:
            result = gm(*args, **kwargs)
            leaves = pytree.tree_leaves(objective(result, args, kwargs) if objective is not None else result)
            leaves = [x for x in leaves if isinstance(x, torch.Tensor) and x.is_floating_point()]
            outs.append(torch.cat([x.detach().reshape(-1).to(torch.float64) for x in leaves]))
            rows += sum(x.numel() // max(x.shape[-1], 1) if x.dim() else 1 for x in leaves)
    return outs, rows


def _probe(gm: fx.GraphModule, ctx: PassContext):
    """error(): the squared relative error of the model's output (ctx.objective) on MEASURE_BATCHES
    calibration batches against what it gives now (call it with the weights as the reference);
    error.energy, error.rows, error.seconds: the reference's squared norm, its rows, the time it took."""
    batches = spread(ctx.calibration, MEASURE_BATCHES)
    start = time.perf_counter()
    reference, rows = _outputs(gm, batches, ctx.objective)
    seconds = time.perf_counter() - start
    energy = max(sum(float((y**2).sum()) for y in reference), 1e-300)

    def error() -> float:
        outs, _ = _outputs(gm, batches, ctx.objective)
        return sum(float(((a - b) ** 2).sum()) for a, b in zip(outs, reference)) / energy

    error.energy, error.rows, error.seconds = energy, rows, seconds  # type: ignore[attr-defined]
    return error


def _measure(gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node], spectra: dict[str, list[float]],
             whitenings: dict[str, Any], operating_ranks: dict[str, int | None] | None = None,
             held: set[str] = frozenset(), error: Any = None) -> dict[str, Any]:
    """Per target, the end-to-end squared relative output error at the GRID ranks divided by its
    spectral tail there; returned as r -> interpolated ratio.

    Errors interact (a layer's error matters more when its inputs are already perturbed), so each
    target is measured at the operating point of the budget: every other target replaced by its
    uniform-rank approximation. The target's own share is the error at rank r minus the error
    with the target dense, everything else unchanged. Vocabulary heads in `held` stay dense (the
    graph runs them reduced) and their ratio is known without measuring (`_head_energy`).
    """
    if not ctx.calibration:
        log.info("sensitivity: no calibration data to measure with; using the spectral curves")
        return {name: (lambda r: 1.0) for name in spectra}
    cfg = ctx.config
    fmt = FORMATS["svd"]
    error = error or _probe(gm, ctx)
    scales = {meta.info(n).target.name: _held_ratio(gm, ctx, meta.info(n).target, error) for n in nodes if meta.info(n).target.name in held}
    nodes = [n for n in nodes if meta.info(n).target.name not in held]
    params, originals = {}, {}
    for node in nodes:
        t = meta.info(node).target
        params[t.name] = target_weight(gm, t)
        originals[t.name] = params[t.name].detach().clone()

    def approx(t: meta.TargetInfo, rank: int) -> torch.Tensor:
        net = fmt.decompose(originals[t.name], rank, *whitenings.get(t.name, (None, None)))
        return net.to_dense().to(originals[t.name].dtype)

    with torch.no_grad():
        try:
            operating = {}
            for node in nodes:
                t = meta.info(node).target
                bias = t.out_features if t.bias else 0
                rank = rank_for_params(fmt, t.out_features, t.in_features, cfg.budget * t.dense_params - bias)
                if operating_ranks is not None:
                    rank = operating_ranks.get(t.name, rank)
                operating[t.name] = originals[t.name] if rank is None else approx(t, rank)
                params[t.name].copy_(operating[t.name])
            for node in progress(nodes, desc="measure", enabled=cfg.progress, unit="layer"):
                t = meta.info(node).target
                params[t.name].copy_(originals[t.name])
                floor = error()
                points = []
                for rank in _grid_ranks(t):
                    params[t.name].copy_(approx(t, rank))
                    share = max(error() - floor, 0.0)
                    tail = spectra[t.name][rank]
                    points.append((rank, share / tail if tail > 1e-12 else 1.0))
                mixture_whitening = {}
                for name, rank, _, _ in ctx.analysis.get("mixture", {}).get(t.name, []):
                    # the mixture formats' candidates, measured the same way
                    if name not in mixture_whitening:
                        mixture_whitening[name] = input_whitening(ctx, t, name, **FORMATS[name].options(cfg))
                    approx_mix = _mixture_approx(ctx, originals[t.name], name, rank, mixture_whitening[name])
                    params[t.name].copy_(approx_mix.to(originals[t.name].dtype))
                    ctx.analysis.setdefault("mixture_measured", {}).setdefault(t.name, {})[(name, rank)] = max(error() - floor, 0.0)
                for choice, _, _ in ctx.analysis.get("quant", {}).get(t.name, []):
                    # the precision candidates, measured the same way (quantized again: cheaper than holding them)
                    tensors = quant_tensors(ctx, t, originals[t.name], choice)
                    params[t.name].copy_(quant_weight(tensors, choice))
                    ctx.analysis.setdefault("quant_measured", {}).setdefault(t.name, {})[choice] = max(error() - floor, 0.0)
                params[t.name].copy_(operating[t.name])
                # a share measured as zero is below the noise of the measurement, not zero: leave it
                # out, so the curve holds the ratio of the nearest lower rank measured (conservative)
                positive = [p for p in points if p[1] > 0]
                scales[t.name] = _interpolator(positive or [(r, 1e-12) for r, _ in points])
                ctx.counters["sensitivity.measured.below_noise"] += len(points) - len(positive)
                ctx.analysis.setdefault("measured_points", {})[t.name] = points
        finally:
            for name, param in params.items():
                param.copy_(originals[name])
    return scales


def _held_ratio(gm: fx.GraphModule, ctx: PassContext, t: meta.TargetInfo, error) -> Any:
    """A held vocabulary head's measured ratio, known without measuring (`_head_energy`, with the
    probe's energy per output row): the same at every rank."""
    w, _, _ = whitened_weight(gm, ctx, t)
    ratio = _head_energy(ctx, t, (w**2).sum().reshape(1), per_row=error.energy / max(error.rows, 1)) or 1.0
    ctx.analysis.setdefault("measured_points", {})[t.name] = [(rank, ratio) for rank in _grid_ranks(t)]
    ctx.counters["sensitivity.measured.head"] += 1
    return lambda rank: ratio


def _candidate_weight(ctx: PassContext, t: meta.TargetInfo, original: torch.Tensor, curve: Curve, i: int) -> torch.Tensor | None:
    """The (out x in) matrix candidate `i` of a target's curve stands for, as measurement swaps it in
    (quantized as factorize would; a decomposition without the refit); None for the dense candidate
    and for dense-row ones (not measured this way)."""
    if curve.quant[i] is not None:
        return quant_weight(quant_tensors(ctx, t, original, curve.quant[i]), curve.quant[i])
    rank, name = curve.ranks[i], curve.formats[i]
    if rank is None or curve.dense_rows[i]:
        return None
    weight = original.detach().to(torch.float64)
    if name == "lowrank":
        white = input_whitening(ctx, t)
        a, b = decompose_lowrank(weight, rank, white, output_whitening(ctx, t.name) if white is not None else None)
        return a @ b
    return _mixture_approx(ctx, weight, name, rank, input_whitening(ctx, t, name, **FORMATS[name].options(ctx.config)))


def _hull_window(curve: Curve, chosen: int, near: int) -> list[int]:
    """The `near` candidates on either side of `chosen` along the lower convex hull of the curve's
    (cost, loss) points (the ones a Lagrangian allocation can pick), `chosen` included; dense and
    dense-row candidates left out."""
    order = sorted(range(len(curve.cost)), key=lambda i: (curve.cost[i], curve.loss[i]))
    hull: list[int] = []
    for i in order:
        if hull and curve.loss[i] >= curve.loss[hull[-1]]:
            continue  # dearer and no better
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b above the segment a-i: not on the lower hull
            if (curve.loss[b] - curve.loss[a]) * (curve.cost[i] - curve.cost[a]) >= (curve.loss[i] - curve.loss[a]) * (curve.cost[b] - curve.cost[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    if chosen not in hull:
        hull = sorted(hull + [chosen], key=lambda i: curve.cost[i])
    at = hull.index(chosen)
    return [i for i in hull[max(0, at - near): at + near + 1] if curve.ranks[i] is not None and not curve.dense_rows[i]]


def _kind(curve: Curve, i: int) -> str:
    """What a candidate's prediction error depends on: quantized codes, quantized factors (mostly
    their truncation), or its format's decomposition."""
    choice = curve.quant[i]
    return curve.formats[i] if choice is None else ("qfactors" if choice.factored else "quant")


def _corrected(curve: Curve, measured: dict[int, float]) -> Curve:
    """The curve with its measured losses in, and every other candidate's prediction scaled by the
    ratio measured / predicted of the nearest (in cost) positively measured candidate of its kind
    (`_kind`; of any kind when its own has none). A share measured as zero is below the noise of the
    measurement and counts as not measured. (On the MiniLM the log ratio varies across targets by a
    factor of about 2 and within a target's quantized candidates by about 5 %: one measurement per
    target and kind corrects most of a prediction.)"""
    ratios = {j: v / curve.loss[j] for j, v in measured.items() if v > 0 and curve.loss[j] > 0}
    loss = list(curve.loss)
    for i in range(len(loss)):
        if i in ratios:
            loss[i] = measured[i]
        elif ratios and curve.ranks[i] is not None:
            same = [j for j in ratios if _kind(curve, j) == _kind(curve, i)] or list(ratios)
            loss[i] *= ratios[min(same, key=lambda j: abs(math.log(max(curve.cost[j], 1e-300) / max(curve.cost[i], 1e-300))))]
    return replace(curve, loss=loss)


def refine(gm: fx.GraphModule, ctx: PassContext, near: int, held: set[str] = frozenset()) -> None:
    """Measure the allocation: each target's `near` candidates on either side of its allocated one
    (along the lower hull of its curve) are swapped in one at a time, and their share of the model's
    output error on calibration batches replaces the prediction (`_corrected`); the allocate pass
    then solves again on the corrected curves. The other targets sit at their allocated candidates,
    or stay dense with precision candidates (Config.bits), as in `_measure`: quantization errors are
    small and add up, and a dense background measures them with less noise (docs/quantization.md,
    "Refining the allocation"). Predicted curves (spectral, fisher, predicted) are cheap but see each
    target alone and to second order; this spends a few forwards per target where the allocation
    actually decides. Vocabulary heads in `held` stay dense and keep their curves (exact already)."""
    if not ctx.calibration:
        log.info("sensitivity: no calibration data to refine with; the allocation stays on the predicted curves")
        return
    chosen = [c for c in zip(*budgeted_choice(gm, ctx)) if meta.info(c[0]).target.name not in held]  # held heads: exact already
    nodes, curves, best = (list(x) for x in zip(*chosen)) if chosen else ([], [], [])
    error = _probe(gm, ctx)  # against the model as given
    params = {meta.info(n).target.name: target_weight(gm, meta.info(n).target) for n in nodes}
    originals = {name: p.detach().clone() for name, p in params.items()}
    measured_total = 0
    with torch.no_grad():
        try:
            operating, background = {}, not ctx.config.bits
            for node, curve, i in zip(nodes, curves, best):
                t = meta.info(node).target
                w = _candidate_weight(ctx, t, originals[t.name], curve, i) if background else None
                operating[t.name] = originals[t.name] if w is None else w.to(originals[t.name].dtype)
                params[t.name].copy_(operating[t.name])
            for node, curve, i in progress(list(zip(nodes, curves, best)), desc="refine", enabled=ctx.config.progress, unit="layer"):
                t = meta.info(node).target
                params[t.name].copy_(originals[t.name])
                floor, measured = error() if background else 0.0, {}  # a dense background is the reference itself
                for j in _hull_window(curve, i, near):
                    params[t.name].copy_(_candidate_weight(ctx, t, originals[t.name], curve, j).to(originals[t.name].dtype))
                    measured[j] = max(error() - floor, 0.0)
                params[t.name].copy_(operating[t.name])
                ctx.curves[t.name] = _corrected(curve, measured)
                ctx.analysis.setdefault("refined", {})[t.name] = {j: (curve.loss[j], v) for j, v in measured.items()}
                measured_total += len(measured)
        finally:
            for name, param in params.items():
                param.copy_(originals[name])
    ctx.counters["sensitivity.refined"] += measured_total
    log.info("sensitivity: refined %d candidates of %d targets end to end around the allocation", measured_total, len(nodes))


def _interpolator(points: list[tuple[int, float]]):
    """Piecewise-linear in rank between the measured points (log of the ratio), flat outside."""
    points = sorted(set(points))
    ranks = [p[0] for p in points]
    logs = [math.log(max(p[1], 1e-12)) for p in points]

    def ratio(rank: int) -> float:
        if rank <= ranks[0]:
            return math.exp(logs[0])
        for (r0, l0), (r1, l1) in zip(zip(ranks, logs), zip(ranks[1:], logs[1:])):
            if rank <= r1:
                return math.exp(l0 + (l1 - l0) * (rank - r0) / max(r1 - r0, 1))
        return math.exp(logs[-1])

    return ratio
