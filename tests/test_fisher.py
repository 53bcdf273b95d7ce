"""Output-gradient (fisher) statistics, output whitening, the fisher estimator and budget kinds."""
import pytest
import torch

import tngraph
from tests.helpers_reference import stats_sum
from tngraph import meta
from tngraph.capture import capture
from tngraph.config import Config
from tngraph.errors import ConfigError
from tngraph.passes import PassContext, calibrate, targets
from tngraph.passes.fisher import gradient_stats
from tngraph.tn.lowrank import decompose_lowrank
from tngraph.tn.whitening import whitening_from_gram

from .test_allocation import _Uneven, _data


class _Chain(torch.nn.Module):
    """y = scale * (W2 (W1 x)): linear, so the output gradients are known in closed form."""

    def __init__(self, scale=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1 = torch.nn.Linear(12, 10, bias=False)
        self.l2 = torch.nn.Linear(10, 8, bias=False)
        with torch.no_grad():
            self.l1.weight.copy_(torch.randn(10, 12, generator=g) / 3)
            self.l2.weight.copy_(torch.randn(8, 10, generator=g) / 3)
        self.register_buffer("scale", torch.ones(8) if scale is None else scale)

    def forward(self, x):
        return self.l2(self.l1(x)) * self.scale


def _prepared(model, data):
    gm = capture(model, data[0])
    ctx = PassContext(config=Config(progress=False), calibration=data)
    targets(gm, ctx)
    calibrate(gm, ctx)
    return gm, ctx


def test_gradient_grams_match_the_jacobians_and_leave_the_graph_as_it_was():
    model = _Chain().eval()
    data = [((torch.randn(50, 12, generator=torch.Generator().manual_seed(k)),), {}) for k in range(4)]
    gm, ctx = _prepared(model, data)
    code = gm.code
    stats = gradient_stats(gm, meta.targets(gm), data, probes=64, seed=0)
    assert gm.code == code and not any(n.op == "call_module" and n.target.startswith("tngraph_tap_") for n in gm.graph.nodes)
    assert not any(name.startswith("tngraph_tap_") for name, _ in gm.named_children())
    rows = 4 * 50
    assert stats["l2"].rows == rows and stats["l1"].rows == rows
    # objective = y: de/dy2 = I, de/dy1 = W2, so E[g g^T] = I and W2^T W2 per row
    w2 = model.l2.weight.detach().double()
    for name, expected in (("l2", torch.eye(8, dtype=torch.float64)), ("l1", w2.T @ w2)):
        got = stats[name].gram / rows
        assert (got - expected).norm() / expected.norm() < 0.1, name
    with torch.no_grad():
        energy = sum(float((model(*a) ** 2).sum()) for a, _ in data)
    assert stats["l2"].energy == pytest.approx(energy, rel=1e-5)


def test_output_whitened_svd_minimises_the_weighted_error():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 16, generator=g, dtype=torch.float64)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 16, dtype=torch.float64)
    grads = torch.randn(200, 24, generator=g, dtype=torch.float64) * torch.linspace(0.05, 4, 24, dtype=torch.float64)
    white, out_white = whitening_from_gram(x.T @ x, 0.0), whitening_from_gram(grads.T @ grads, 0.0)

    def weighted(a, b):
        return (grads.T @ grads @ (w - a @ b) @ (x.T @ x) @ (w - a @ b).T).trace().item()

    both = weighted(*decompose_lowrank(w, 5, white, out_white))
    inputs_only = weighted(*decompose_lowrank(w, 5, white))
    assert both < 0.9 * inputs_only
    # exact at full rank: the output side is undone
    a, b = decompose_lowrank(w, 16, white, out_white)
    torch.testing.assert_close(a @ b, w)


def test_output_whitening_lowers_the_models_error_when_output_channels_matter_unequally():
    scale = torch.logspace(-2, 1, 8)
    model = _Chain(scale).eval()
    data = [((torch.randn(40, 12, generator=torch.Generator().manual_seed(k)),), {}) for k in range(6)]
    held_out = torch.randn(100, 12, generator=torch.Generator().manual_seed(99))
    errors = {}
    for output_whiten in (False, True):
        config = Config(budget=0.5, output_whiten=output_whiten, progress=False)
        result = tngraph.compress_with_result(model, calibration=data, config=config)
        assert result.context.counters["factorize.lowrank.output_whitened"] == (2 if output_whiten else 0)
        assert ("fisher" in result.context.history) and bool(result.context.grad_stats) == output_whiten
        errors[output_whiten] = ((result.module(held_out) - model(held_out)).norm() / model(held_out).norm()).item()
    assert errors[True] < 0.7 * errors[False]


def test_fisher_sensitivity_is_in_units_of_the_models_error():
    model = _Uneven().eval()
    config = Config(budget=0.5, allocation="budgeted", sensitivity="fisher", progress=False)
    result = tngraph.compress_with_result(model, calibration=_data(), config=config)
    for node in meta.targets(result.graph):
        sens = meta.info(node).sensitivity
        assert sens.kind == "fisher" and 0 < sens.score < 10
    # with layer a nearly low-rank, it gives up more than the full-rank b
    plans = {meta.info(n).target.name: meta.info(n).plan for n in meta.targets(result.graph)}
    assert plans["a"].rank < (plans["b"].rank or 32)


class _Wide(torch.nn.Module):
    """Two 384-wide layers (low-rank chains beat dense ones in time at a few thousand rows)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = torch.nn.Linear(384, 384), torch.nn.Linear(384, 384)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(384, 16, generator=g) @ torch.randn(16, 384, generator=g) / 64 + 0.01 * torch.randn(384, 384, generator=g))
            self.b.weight.copy_(torch.randn(384, 384, generator=g) / 20)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("kind", ["params", "bytes", "latency"])
def test_budget_kinds_keep_their_budget(kind, monkeypatch):
    if kind == "latency":
        # the clock replaced by multiply-adds plus a fixed overhead per GEMM: what is checked is the budget's
        # accounting, not this machine's timings (which a busy CI worker can push past the budget)
        from tngraph import latency

        monkeypatch.setattr(latency, "dense_seconds", lambda out, inp, bias, rows, dtype=None: 1e-9 * out * inp * rows + 1e-5)
        monkeypatch.setattr(latency, "lowrank_seconds", lambda out, inp, rank, bias, rows, dtype=None: 1e-9 * rank * (out + inp) * rows + 2e-5)
    config = Config(budget=0.5, allocation="budgeted", sensitivity="fisher", budget_kind=kind, latency_rows=4096, progress=False)
    data = [((torch.randn(64, 384, generator=torch.Generator().manual_seed(k)),), {}) for k in range(4)]
    result = tngraph.compress_with_result(_Wide().eval(), calibration=data, config=config)
    curves = result.context.curves
    chosen = {meta.info(n).target.name: meta.info(n).plan for n in meta.targets(result.graph)}
    spent = sum(c.cost[c.ranks.index(chosen[name].rank)] for name, c in curves.items())
    assert spent <= 0.5 * sum(c.cost[-1] for c in curves.values()) * (1 + 1e-9)
    for c in curves.values():
        assert all(x <= y for x, y in zip(c.cost, c.cost[1:-1])) and c.ranks[-1] is None
        if kind == "bytes":
            assert c.cost == [4.0 * p for p in c.params]  # float32 weights
        if kind == "latency":
            assert all(x < c.cost[-1] for x in c.cost[:-1])  # candidates slower than dense are dropped


def test_a_latency_budget_that_no_factorization_meets_is_refused(monkeypatch):
    # no low-rank chain faster than its dense layer (as for 32-wide layers at 64 rows, where timing it
    # on a busy machine could still find one faster by chance): the clock is replaced by that fact
    from tngraph import latency

    monkeypatch.setattr(latency, "dense_seconds", lambda *a, **k: 1.0)
    monkeypatch.setattr(latency, "lowrank_seconds", lambda *a, **k: 1.5)
    config = Config(budget=0.5, allocation="budgeted", sensitivity="fisher", budget_kind="latency", latency_rows=64, progress=False)
    with pytest.raises(ConfigError, match="latency budget 0.5 cannot be met"):
        tngraph.compress(_Uneven().eval(), calibration=_data(), config=config)


def test_bad_budget_kinds_are_refused():
    with pytest.raises(ConfigError, match="unknown budget_kind"):
        Config(budget_kind="flops")
    with pytest.raises(ConfigError, match="needs allocation='budgeted'"):
        Config(budget_kind="latency", allocation="uniform")
    with pytest.raises(ConfigError, match="needs allocation='budgeted'"):
        Config(budget_kind="latency", format="tt")  # auto allocation is uniform for the network formats
    with pytest.raises(ConfigError, match="fisher_batches"):
        Config(fisher_batches=0)


class _Outlier(torch.nn.Module):
    """One output channel of `a` matters 100x more than the others downstream."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Linear(64, 64)
        self.b = torch.nn.Linear(64, 64)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(64, 64, generator=g) / 8)
            self.b.weight.copy_(torch.randn(64, 8, generator=g) @ torch.randn(8, 64, generator=g) / 16)
        scale = torch.ones(64)
        scale[5] = 100.0
        self.register_buffer("scale", scale)

    def forward(self, x):
        return torch.cat([self.a(x) * self.scale, self.b(x)], -1)


def test_patch_level_keeps_the_sensitive_rows_dense(tmp_path):
    model = _Outlier().eval()
    data = [((torch.randn(64, 64, generator=torch.Generator().manual_seed(k)),), {}) for k in range(4)]
    held_out = torch.randn(200, 64, generator=torch.Generator().manual_seed(50))
    errors = {}
    for dense_rows in (False, True):
        config = Config(budget=0.5, allocation="budgeted", sensitivity="fisher", dense_rows=dense_rows, output_whiten=False, progress=False)
        result = tngraph.compress_with_result(model, calibration=data, config=config)
        errors[dense_rows] = ((result.module(held_out) - model(held_out)).norm() / model(held_out).norm()).item()
        kept = sum(p.params_after for p in result.context.plan.values()) + sum(
            64 * 65 for name in ("a", "b") if name not in result.context.plan)
        assert kept <= 0.5 * 2 * 64 * 65
        if dense_rows:
            plan = {meta.info(n).target.name: meta.info(n).plan for n in meta.targets(result.graph)}["a"]
            assert plan.format == "lowrank" and plan.dense_rows >= 1
            assert int(result.context.analysis["row_order"]["a"][0]) == 5  # the outlier channel comes first
            ops = [n.target for n in result.graph.graph.nodes if n.op == "call_function"]
            assert torch.ops.aten.index_select.default in ops and torch.ops.aten.cat.default in ops
            layer = result.module.a
            assert layer.dense is not None and layer.dense.shape == (plan.dense_rows, 64)
            assert result.context.plan["a"].params_after == plan.params_after
            # the rewritten graph and the swapped module agree, and so does the saved artifact
            torch.testing.assert_close(result.graph(held_out), result.module(held_out), rtol=1e-4, atol=1e-4)
            tngraph.save(result.module, tmp_path / "art")
            loaded = tngraph.load(tmp_path / "art", model)
            torch.testing.assert_close(loaded(held_out), result.module(held_out))
    assert errors[True] < 0.5 * errors[False]


def test_predicted_sensitivity_runs_the_shipped_predictor():
    config = Config(budget=0.5, allocation="budgeted", sensitivity="predicted", progress=False)
    data = [((torch.randn(64, 384, generator=torch.Generator().manual_seed(k)),), {}) for k in range(4)]
    result = tngraph.compress_with_result(_Wide().eval(), calibration=data, config=config)
    patches = result.context.analysis["patch_sensitivity"]
    assert set(patches) == {"a", "b"} and all(p.shape == (8, 8) and torch.isfinite(p).all() for p in patches.values())
    sens = {meta.info(n).target.name: meta.info(n).sensitivity for n in meta.targets(result.graph)}
    assert all(s.kind == "predicted" and s.score > 0 for s in sens.values())
    assert sum(p.params_after for p in result.context.plan.values()) <= 0.5 * 2 * (384 * 384 + 384)
    # the predicted curve is the fisher curve times a ratio the network clamps to its training range
    from tngraph import predictor

    net = predictor.load()
    fisher = tngraph.compress_with_result(_Wide().eval(), calibration=data, config=config.replace(sensitivity="fisher"))
    for name, curve in result.context.curves.items():
        for rank in (12, 48, 96):
            ratio = curve.at_rank(rank) / fisher.context.curves[name].at_rank(rank)
            assert float(net.label_min.min().exp()) * 0.99 <= ratio <= float(net.label_max.max().exp()) * 1.01


def test_a_missing_or_corrupt_predictor_file_is_a_clear_error(tmp_path):
    from tngraph import predictor
    from tngraph.errors import ModelError

    with pytest.raises(ModelError, match="weights are missing"):
        predictor.load(str(tmp_path / "none.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="cannot be read"):
        predictor.load(str(bad))


def test_calibration_streams_output_channel_norms():
    model = _Chain().eval()
    data = [((torch.randn(30, 12, generator=torch.Generator().manual_seed(k)),), {}) for k in range(3)]
    gm, ctx = _prepared(model, data)
    with torch.no_grad():
        y = torch.cat([model.l1(a[0]) for a, _ in data])
    torch.testing.assert_close(ctx.output_stats["l1"].rms, y.double().pow(2).mean(0).sqrt(), rtol=1e-5, atol=1e-6)
    assert ctx.output_stats["l1"].rows == 90
    node = next(n for n in meta.targets(gm) if meta.info(n).target.name == "l1")
    assert meta.info(node).calibration.output_rms == pytest.approx(float(y.pow(2).mean().sqrt()), rel=1e-4)
    # the observers are gone again: no call_module node, no observer submodule
    assert not any(n.op == "call_module" and n.target.startswith("tngraph_observer_") for n in gm.graph.nodes)
    assert not any(name.startswith("tngraph_observer_") for name, _ in gm.named_children())


class _KronAndDense(torch.nn.Module):
    """`k` is exactly a Kronecker product (full SVD rank, Kronecker rank 1); `d` is generic."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.k, self.d = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
        with torch.no_grad():
            self.k.weight.copy_(torch.kron(torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)) / 8)
            self.d.weight.copy_(torch.randn(64, 64, generator=g) / 8)

    def forward(self, x):
        return self.d(torch.tanh(self.k(x)))


@pytest.mark.parametrize("sensitivity", ["fisher", "measured"])
def test_mixture_lets_a_target_take_the_format_that_fits_it(sensitivity):
    model = _KronAndDense().eval()
    data = [((torch.randn(64, 64, generator=torch.Generator().manual_seed(k)),), {}) for k in range(4)]
    held_out = torch.randn(100, 64, generator=torch.Generator().manual_seed(7))
    errors = {}
    for mixture in ((), ("kron", "tt")):
        config = Config(budget=0.5, allocation="budgeted", sensitivity=sensitivity, mixture=mixture, progress=False)
        result = tngraph.compress_with_result(model, calibration=data, config=config)
        plans = {meta.info(n).target.name: meta.info(n).plan for n in meta.targets(result.graph)}
        kept = sum(p.params_after for p in plans.values())
        assert kept <= 0.5 * 2 * (64 * 64 + 64)
        errors[mixture] = ((result.module(held_out) - model(held_out)).norm() / model(held_out).norm()).item()
        if mixture:
            assert plans["k"].format in ("kron", "tt") and plans["d"].format in ("lowrank", "dense")
            assert type(result.module.k).__name__ == "NetworkLinear"
            if sensitivity == "measured":  # the mixture's candidates were measured end to end too
                assert set(result.context.analysis["mixture_measured"]) == {"k", "d"}
            torch.testing.assert_close(result.graph(held_out), result.module(held_out), rtol=1e-4, atol=1e-4)
    assert errors[("kron", "tt")] < 0.5 * errors[()]


def test_bad_mixtures_are_refused():
    with pytest.raises(ConfigError, match="unknown mixture format 'svd2'"):
        Config(mixture=("tucker", "svd2"))
    with pytest.raises(ConfigError, match="chosen by the budgeted allocation"):
        Config(mixture="tt", allocation="uniform")
    assert Config(mixture="tucker, tt").mixture == ("tucker", "tt")


def test_latency_curve_times_a_few_ranks_and_interpolates(monkeypatch):
    from tngraph import latency

    assert latency.dense_seconds(32, 32, True, 64) > 0 and latency.lowrank_seconds(32, 32, 4, True, 64) > 0  # the real clock runs
    timed = []

    def fake(out, inp, rank, bias, rows, dtype=None):
        timed.append(rank)
        return float(rank)

    monkeypatch.setattr(latency, "lowrank_seconds", fake)
    ranks = list(range(1, 101))
    seconds = latency.lowrank_curve(64, 64, ranks, False, 128, points=5)
    assert sorted(set(timed)) == [1, 25, 50, 75, 100]  # timed at five ranks spread over them
    assert seconds == [float(r) for r in ranks]  # linear in between, exact for a linear cost


@pytest.mark.parametrize("mask", [False, True])
def test_calibrate_runs_the_fisher_backward_passes_on_its_own_forwards(monkeypatch, mask):
    """When the fisher pass reads every calibration batch, calibrate's forwards take its backward
    passes too: one forward per batch, and the same statistics as the two passes apart."""
    import importlib

    from tngraph.pipeline import run_passes

    calibrate_module, fisher = (importlib.import_module(f"tngraph.passes.{m}") for m in ("calibrate", "fisher"))

    g = torch.Generator().manual_seed(3)
    data = []
    for k in range(4):
        x = torch.randn(6, 5, 12, generator=g)
        m = (torch.arange(5) < 3 + k % 2).expand(6, 5).long() if mask else None  # padded positions left out
        data.append(((x,), {"attention_mask": m} if mask else {}))

    class _Masked(_Chain):
        def forward(self, x, attention_mask=None):
            return super().forward(x)

    runs, calls = {}, []
    monkeypatch.setattr(calibrate_module, "_run", lambda *a, _run=calibrate_module._run: (calls.append(1), _run(*a)))
    for fused in (True, False):
        calls.clear()
        model = _Masked().eval()
        gm = capture(model, data[0])
        ctx = PassContext(config=Config(progress=False), calibration=data)
        if fused:
            run_passes(gm, ctx, [targets, calibrate, fisher.fisher], instruments=[])
            assert not calls  # no forward of calibrate's own
        else:
            run_passes(gm, ctx, [targets, calibrate], instruments=[])
            assert len(calls) == len(data)
            run_passes(gm, ctx, [fisher.fisher], instruments=[])
        assert ctx.grad_stats and fisher.needed(ctx)
        runs[fused] = ctx
    together, apart = runs[True], runs[False]
    for name in ("l1", "l2"):
        assert together.stats[name].rows == apart.stats[name].rows == (sum(int(d[1]["attention_mask"].sum()) for d in data) if mask else 120)
        assert torch.allclose(stats_sum(together.stats[name]), stats_sum(apart.stats[name]), rtol=1e-6)
        assert torch.allclose(together.output_stats[name].sq_sum, apart.output_stats[name].sq_sum, rtol=1e-6)
        assert together.grad_stats[name].rows == apart.grad_stats[name].rows
        assert torch.allclose(together.grad_stats[name].gram, apart.grad_stats[name].gram, rtol=1e-6)
        assert together.grad_stats[name].energy == pytest.approx(apart.grad_stats[name].energy, rel=1e-9)
    assert together.counters["fisher.batches"] == apart.counters["fisher.batches"] == len(data)
    assert "fisher_in_calibrate" not in together.analysis  # the fisher pass took its summary


def test_calibrate_keeps_its_own_forwards_when_the_fisher_pass_reads_a_part_of_the_batches(monkeypatch):
    import importlib

    from tngraph.pipeline import run_passes

    calibrate_module, fisher = (importlib.import_module(f"tngraph.passes.{m}") for m in ("calibrate", "fisher"))

    calls = []
    monkeypatch.setattr(calibrate_module, "_run", lambda *a, _run=calibrate_module._run: (calls.append(1), _run(*a)))
    data = [((torch.randn(20, 12, generator=torch.Generator().manual_seed(k)),), {}) for k in range(4)]
    gm = capture(_Chain().eval(), data[0])
    ctx = PassContext(config=Config(progress=False, fisher_batches=2), calibration=data)
    run_passes(gm, ctx, [targets, calibrate, fisher.fisher], instruments=[])
    assert len(calls) == 4 and ctx.counters["fisher.batches"] == 2 and ctx.grad_stats["l1"].rows == 40
