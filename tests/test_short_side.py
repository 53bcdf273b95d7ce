"""Each whitened low-rank target is calibrated on its short side (Config.short_side). One narrower
out than in (an MLP's down projection) through the Gram matrix of its outputs, C = W XᵀX Wᵀ; one
wider out than in (gate, up) keeps its output-gradient statistics projected onto its inputs,
H = Wᵀ G W. Its whitened spectrum, factors and guard error are those of the XᵀX and G path
(Config(short_side=False)) to rounding."""
import pytest
import torch

import tngraph
from tests.helpers_reference import layer_error, linear_grams, output_factors, plan_weights, truncated
from tngraph.calibration import GradStats, GramStats, OutputGramStats, ProjectedGradStats
from tngraph.config import Config
from tngraph.passes import PassContext, calibrate, fisher, targets
from tngraph.pipeline import run_passes
from tngraph.tn.lowrank import decompose_lowrank, lowrank_from_gradients, lowrank_from_outputs
from tngraph.tn.whitening import diagonal_whitening, output_gram_whitening, projected_gradient_whitening, whitening_from_gram


class _Block(torch.nn.Module):
    """An MLP block: up (20 -> 48) widens, down (48 -> 12) narrows, both with a bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(20, 48)
        self.down = torch.nn.Linear(48, 12)
        self.head = torch.nn.Linear(12, 12, bias=False)

    def forward(self, x):
        return self.head(self.down(torch.nn.functional.gelu(self.up(x))))


def _data(batches=6):
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(20, 20, generator=g)
    return [((torch.randn(16, 20, generator=g) @ mix,), {}) for _ in range(batches)]


def _run(model, data, **options):
    gm = tngraph.capture(model, data[0])
    config = Config(progress=False, fuse=False, heal_steps=0, **{"allocation": "budgeted", "sensitivity": "measured", **options})
    ctx = PassContext(config=config, calibration=data, objective=lambda result, args, kwargs: result)
    return run_passes(gm, ctx), ctx


def test_whitened_factors_spectrum_and_error_from_the_outputs_equal_those_from_the_inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 40, generator=g, dtype=torch.float64)
    x = torch.randn(300, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 40, generator=g, dtype=torch.float64)
    gram = x.T @ x
    grads = torch.randn(200, 16, generator=g, dtype=torch.float64)
    white = whitening_from_gram(gram, 1e-4)
    through = output_gram_whitening(w @ gram @ w.T, float(torch.diagonal(gram).mean()), 1e-4)
    for out_white in (None, whitening_from_gram(grads.T @ grads, 0.1), diagonal_whitening((grads**2).sum(0), 0.1)):
        a, b = decompose_lowrank(w, 6, white, out_white)
        a2, b2, left = lowrank_from_outputs(w, 6, through, out_white)
        assert torch.allclose(a @ b, a2 @ b2, atol=1e-10)  # the same best rank-6 approximation
        assert torch.allclose(left @ w, a2 @ b2, atol=1e-10)  # A B = Q W
        t = white.apply(w) if out_white is None else out_white.apply_left(white.apply(w))
        assert torch.allclose(through.spectrum(w, out_white), torch.linalg.svdvals(t) ** 2, rtol=1e-9, atol=1e-9 * float(t.norm()) ** 2)
        # the decomposition routed through decompose_lowrank (what measured sensitivity calls) is the same
        a3, b3 = decompose_lowrank(w, 6, through, out_white)
        assert torch.allclose(a3 @ b3, a2 @ b2, atol=1e-12)


def test_whitened_factors_and_spectrum_from_projected_gradients_equal_those_from_the_output_gram():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 16, generator=g, dtype=torch.float64)  # widening: 16 in, 40 out
    x = torch.randn(300, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    grads = torch.randn(200, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 40, generator=g, dtype=torch.float64)
    gram, g_out = x.T @ x, grads.T @ grads
    damping = 0.1
    left = whitening_from_gram(g_out, damping)
    projected = projected_gradient_whitening(w.T @ g_out @ w, float(torch.diagonal(g_out).mean()), damping)
    for white in (whitening_from_gram(gram, 1e-4), None):
        a, b = decompose_lowrank(w, 5, white, left)
        a2, b2 = lowrank_from_gradients(w, 5, white, projected)
        assert torch.allclose(a @ b, a2 @ b2, atol=1e-9 * float(w.abs().max()))  # the same best rank-5 approximation
        t = left.apply_left(white.apply(w) if white is not None else w)
        assert torch.allclose(projected.spectrum(w, white), torch.linalg.svdvals(t) ** 2, rtol=1e-9, atol=1e-9 * float(t.norm()) ** 2)
        a3, b3 = decompose_lowrank(w, 5, white, projected)  # what measured sensitivity and factorize call
        assert torch.allclose(a3 @ b3, a2 @ b2, atol=1e-12)
    # a weight of rank 3 asked for rank 8: exact, with zero (not NaN) factors beyond its rank
    low = torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 16, generator=g, dtype=torch.float64)
    deficient = projected_gradient_whitening(low.T @ g_out @ low, float(torch.diagonal(g_out).mean()), damping)
    a, b = lowrank_from_gradients(low, 8, whitening_from_gram(gram, 1e-4), deficient)
    assert torch.isfinite(a).all() and torch.isfinite(b).all() and torch.allclose(a @ b, low, atol=1e-9)


def test_projected_gradient_statistics_are_w_transposed_g_w():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 8, generator=g)
    full, projected = GradStats(24), ProjectedGradStats(24, in_features=8)
    for _ in range(3):
        grads = torch.randn(2, 5, 24, generator=g)
        full.update(grads, 0.5)
        projected.update(grads, 0.5, weight=w)
    assert projected.gram.shape == (8, 8)
    wd = w.double()
    assert torch.allclose(projected.gram, wd.T @ full.gram @ wd, rtol=1e-5, atol=1e-5 * float(projected.gram.abs().max()))
    assert projected.scale == pytest.approx(float(torch.diagonal(full.gram).mean()), rel=1e-6)
    assert ProjectedGradStats.bytes(8) == GradStats.bytes(8) < GradStats.bytes(24)
    with pytest.raises(TypeError, match="diag"):
        projected.diag()
    with pytest.raises(TypeError, match="weight"):
        projected.update(grads)


def test_a_weight_of_lower_rank_than_asked_gets_zero_factors_not_nans():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(10, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 30, generator=g, dtype=torch.float64)  # rank 3
    x = torch.randn(100, 30, generator=g, dtype=torch.float64)
    through = output_gram_whitening(w @ x.T @ x @ w.T, float((x**2).sum() / 30), 1e-4)
    a, b, left = lowrank_from_outputs(w, 8, through)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert torch.allclose(a @ b, w, atol=1e-9)  # rank 3 is exact
    assert torch.allclose(left @ w, w, atol=1e-9)


def test_the_down_projection_is_calibrated_through_its_outputs_and_compresses_as_through_its_inputs():
    data = _data()
    runs = {flag: _run(_Block().eval(), data, short_side=flag) for flag in (True, False)}
    (gm, ctx), (gm0, ctx0) = runs[True], runs[False]
    # which side each target was calibrated on: only the narrowing layer through its outputs
    assert isinstance(ctx.stats["down"], OutputGramStats)
    assert isinstance(ctx.stats["up"], GramStats) and isinstance(ctx.stats["head"], GramStats)
    assert all(isinstance(s, GramStats) for s in ctx0.stats.values())
    # ... and only the widening layer keeps its output gradients projected onto its inputs: 20 x 20, not 48 x 48
    assert isinstance(ctx.grad_stats["up"], ProjectedGradStats) and ctx.grad_stats["up"].gram.shape == (20, 20)
    assert type(ctx.grad_stats["down"]) is GradStats and type(ctx.grad_stats["head"]) is GradStats
    assert not any(isinstance(s, ProjectedGradStats) for s in ctx0.grad_stats.values())
    up = _Block().eval().up.weight.detach().double()
    h, g_full = ctx.grad_stats["up"].gram, ctx0.grad_stats["up"].gram  # the same batches and probes
    assert torch.allclose(h, up.T @ g_full @ up, rtol=1e-4, atol=1e-6 * float(h.abs().max()))
    assert ctx.grad_stats["up"].scale == pytest.approx(float(torch.diagonal(g_full).mean()), rel=1e-5)
    # C = W XᵀX Wᵀ over the rows that reached it, the bias left out: 12 x 12, not 48 x 48
    down = _Block().eval().down
    x_gram = linear_grams(_Block().eval(), [d for d in data])["down"]
    c = ctx.stats["down"].output_gram
    assert c.shape == (12, 12)
    w = down.weight.detach().double()
    assert torch.allclose(c, w @ x_gram @ w.T, rtol=1e-5, atol=1e-6 * float(c.abs().max()))
    assert ctx.stats["down"].rows == ctx0.stats["down"].rows == 96
    assert ctx.stats["down"].scale == pytest.approx(float(torch.diagonal(x_gram).mean()), rel=1e-6)
    # the same allocation, factors, guard errors and model, to rounding
    assert {n: (p.format, p.rank) for n, p in ctx.plan.items()} == {n: (p.format, p.rank) for n, p in ctx0.plan.items()}
    assert ctx.plan["down"].format == "lowrank" and ctx.counters["factorize.lowrank.through_outputs"] == 1
    assert ctx.plan["up"].format == "lowrank" and ctx.counters["factorize.lowrank.through_inputs"] == 1
    weights, weights0 = plan_weights(ctx), plan_weights(ctx0)
    for name in weights:
        assert torch.allclose(weights[name].double(), weights0[name].double(), rtol=1e-4, atol=1e-5), name
    assert ctx.analysis["guard"]["up"] == pytest.approx(ctx0.analysis["guard"]["up"], rel=1e-5)
    assert ctx.analysis["guard"]["down"] == pytest.approx(ctx0.analysis["guard"]["down"], rel=1e-5)
    # and the guard's error is the layer's relative output error on the calibration inputs
    assert ctx.analysis["guard"]["down"] == pytest.approx(layer_error(down.weight, weights["down"], x_gram), rel=1e-4)
    # which is that of the best whitened rank-r approximation (K-FAC: with the output whitening applied)
    best = truncated(down.weight, ctx.plan["down"].rank, x_gram, out_factor=output_factors(ctx, _Block().eval()).get("down"))
    assert torch.allclose(weights["down"].double(), best.double(), rtol=1e-4, atol=1e-5)
    x = data[0][0][0]
    assert torch.allclose(gm(x), gm0(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [{"format": "tucker", "allocation": "uniform"}, {"mixture": ("tt",)}, {"dense_rows": True},
                                     {"sensitivity": "predicted"}, {"short_side": False}, {"whiten": False}])
def test_candidates_that_read_the_input_or_gradient_gram_keep_it(options):
    model, data = _Block().eval(), _data(2)
    gm = tngraph.capture(model, data[0])
    ctx = PassContext(config=Config(progress=False, **options), calibration=data)
    run_passes(gm, ctx, [targets, calibrate, fisher])
    assert not any(isinstance(s, OutputGramStats) for s in ctx.stats.values())
    assert not any(isinstance(s, ProjectedGradStats) for s in ctx.grad_stats.values())
