"""A low-rank target narrower out than in (an MLP's down projection) is calibrated through the Gram
matrix of its outputs, C = W XᵀX Wᵀ: out² work and memory per row instead of in². Its whitened
spectrum, factors and guard error are those of the XᵀX path (Config(output_gram=False)) to rounding."""
import pytest
import torch

import tngraph
from tests.helpers_reference import layer_error, linear_grams, output_factors, plan_weights, truncated
from tngraph.calibration import GramStats, OutputGramStats
from tngraph.config import Config
from tngraph.passes import PassContext, calibrate, targets
from tngraph.pipeline import run_passes
from tngraph.tn.lowrank import decompose_lowrank, lowrank_from_outputs
from tngraph.tn.whitening import diagonal_whitening, output_gram_whitening, whitening_from_gram


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
    runs = {flag: _run(_Block().eval(), data, output_gram=flag) for flag in (True, False)}
    (gm, ctx), (gm0, ctx0) = runs[True], runs[False]
    # which side each target was calibrated on: only the narrowing layer through its outputs
    assert isinstance(ctx.stats["down"], OutputGramStats)
    assert isinstance(ctx.stats["up"], GramStats) and isinstance(ctx.stats["head"], GramStats)
    assert all(isinstance(s, GramStats) for s in ctx0.stats.values())
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
    weights, weights0 = plan_weights(ctx), plan_weights(ctx0)
    for name in weights:
        assert torch.allclose(weights[name].double(), weights0[name].double(), rtol=1e-4, atol=1e-5), name
    assert ctx.analysis["guard"]["down"] == pytest.approx(ctx0.analysis["guard"]["down"], rel=1e-5)
    # and the guard's error is the layer's relative output error on the calibration inputs
    assert ctx.analysis["guard"]["down"] == pytest.approx(layer_error(down.weight, weights["down"], x_gram), rel=1e-4)
    # which is that of the best whitened rank-r approximation (K-FAC: with the output whitening applied)
    best = truncated(down.weight, ctx.plan["down"].rank, x_gram, out_factor=output_factors(ctx).get("down"))
    assert torch.allclose(weights["down"].double(), best.double(), rtol=1e-4, atol=1e-5)
    x = data[0][0][0]
    assert torch.allclose(gm(x), gm0(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [{"format": "tucker", "allocation": "uniform"}, {"mixture": ("tt",)}, {"dense_rows": True},
                                     {"sensitivity": "predicted"}, {"output_gram": False}, {"whiten": False}])
def test_candidates_that_read_the_input_gram_keep_it(options):
    model, data = _Block().eval(), _data(2)
    gm = tngraph.capture(model, data[0])
    ctx = PassContext(config=Config(progress=False, **options), calibration=data)
    run_passes(gm, ctx, [targets, calibrate])
    assert not any(isinstance(s, OutputGramStats) for s in ctx.stats.values())
