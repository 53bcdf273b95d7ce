"""Sensitivity curves and the budgeted allocation: within budget, and better than uniform ranks."""
import pytest
import torch

import tngraph
from tngraph import meta
from tngraph.config import Config
from tngraph.errors import ConfigError
from tngraph.passes.sensitivity import GRID


class _Uneven(torch.nn.Module):
    """Two layers of equal size: the first nearly low-rank (cheap to compress), the second full rank."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Linear(32, 32)
        self.b = torch.nn.Linear(32, 32)
        with torch.no_grad():
            u, v = torch.randn(32, 4, generator=g), torch.randn(4, 32, generator=g)
            self.a.weight.copy_((u @ v) / 4 + 0.01 * torch.randn(32, 32, generator=g))
            self.b.weight.copy_(torch.randn(32, 32, generator=g) / 32**0.5)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _data(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(16, 32, generator=g),), {}) for _ in range(n)]


@pytest.mark.parametrize("sensitivity", ["spectral", "measured"])
def test_budgeted_allocation_stays_in_budget_and_beats_uniform(sensitivity):
    model = _Uneven().eval()
    data = _data()
    held_out = torch.cat([args[0] for args, _ in _data(4, seed=9)])
    errors = {}
    for allocation in ("uniform", "budgeted"):
        config = Config(budget=0.5, allocation=allocation, sensitivity=sensitivity, progress=False)
        result = tngraph.compress_with_result(model, calibration=data, config=config)
        dense = 2 * (32 * 32 + 32)
        kept = sum(p.params_after for p in result.context.plan.values()) + sum(
            dense // 2 for name in ("a", "b") if name not in result.context.plan)
        assert kept <= 0.5 * dense
        errors[allocation] = ((result.module(held_out) - model(held_out)).norm() / model(held_out).norm()).item()
        if allocation == "budgeted":
            plans = {n: meta.info(node).plan for node in meta.targets(result.graph) for n in [meta.info(node).target.name]}
            sens = [meta.info(node).sensitivity for node in meta.targets(result.graph)]
            assert all(s is not None and s.kind == sensitivity and s.score >= 0 for s in sens)
            # the nearly low-rank layer gives up more of its parameters than the full-rank one
            rank_b = plans["b"].rank if plans["b"].format != "dense" else 32
            assert plans["a"].format == "lowrank" and plans["a"].rank < rank_b
            assert result.context.counters[f"sensitivity.{sensitivity}"] == 2
    assert errors["budgeted"] < errors["uniform"]


def test_uniform_allocation_skips_the_sensitivity_pass():
    config = Config(budget=0.5, allocation="uniform", progress=False)
    result = tngraph.compress_with_result(_Uneven().eval(), calibration=_data(), config=config)
    assert not result.context.curves and all(meta.info(n).sensitivity is None for n in meta.targets(result.graph))


def test_auto_allocation_is_budgeted_for_low_rank_and_uniform_for_networks():
    assert Config().allocation_kind == "budgeted" and Config(format="tt").allocation_kind == "uniform"
    result = tngraph.compress_with_result(_Uneven().eval(), calibration=_data(), config=Config(budget=0.5, progress=False))
    assert "sensitivity" in result.context.history and result.context.curves


def test_budgeted_allocation_needs_the_low_rank_format_for_now():
    with pytest.raises(ConfigError, match="budgeted allocation chooses low-rank ranks"):
        tngraph.compress(_Uneven().eval(), calibration=_data(), config=Config(budget=0.5, allocation="budgeted", format="tt", progress=False))


@pytest.mark.parametrize("options, word", [({"allocation": "greedy"}, "allocation"), ({"sensitivity": "fisherman"}, "sensitivity")])
def test_unknown_allocation_options_are_refused(options, word):
    with pytest.raises(ConfigError, match=f"unknown {word}"):
        Config(**options)


def test_sensitivity_rounds_are_checked_and_rerun_the_measurement():
    with pytest.raises(ConfigError, match="sensitivity_rounds must be an integer"):
        Config(sensitivity_rounds=0)
    config = Config(budget=0.5, allocation="budgeted", sensitivity="measured", sensitivity_rounds=3, progress=False)
    result = tngraph.compress_with_result(_Uneven().eval(), calibration=_data(), config=config)
    assert sum(p.params_after for p in result.context.plan.values()) <= 0.5 * 2 * (32 * 32 + 32)


def test_refine_corrects_low_rank_curves_at_the_allocation():
    """Without precision candidates refine measures at the allocation (the others at their ranks): the
    measured ranks' losses are the measured shares, and the plan stays within the budget."""
    config = Config(budget=0.5, allocation="budgeted", sensitivity="spectral", refine=1, progress=False)
    result = tngraph.compress_with_result(_Uneven().eval(), calibration=_data(), config=config)
    refined = result.context.analysis["refined"]
    assert set(refined) == {"a", "b"} and result.context.counters["sensitivity.refined"] == sum(map(len, refined.values())) > 0
    for name, shares in refined.items():
        curve = result.context.curves[name]
        assert all(curve.formats[j] == "lowrank" and (share == 0 or curve.loss[j] == share) for j, (_, share) in shares.items())
    assert sum(p.params_after for p in result.context.plan.values()) <= 0.5 * 2 * (32 * 32 + 32)


def test_a_measured_sensitivity_over_its_time_budget_falls_back_to_fisher_and_says_so(caplog):
    """The measured search is timed and counted before it starts: over --time-budget it is not run,
    and the allocation is the fisher one; no limit (0) measures."""
    model = _Uneven().eval()
    data = _data()
    fisher = tngraph.compress_with_result(model, calibration=data, budget=0.5, sensitivity="fisher", heal_steps=0, progress=False)
    with caplog.at_level("WARNING", logger="tngraph.passes.sensitivity"):
        short = tngraph.compress_with_result(model, calibration=data, budget=0.5, time_budget=1e-9, heal_steps=0, progress=False)
    assert "over the time budget of 0 s (--time-budget); using the fisher sensitivity instead" in caplog.text
    fallback = short.context.analysis["sensitivity_fallback"]
    assert fallback["used"] == "fisher" and fallback["forwards"] == 2 * (1 + len(GRID)) and fallback["predicted_seconds"] > 0
    assert "measured_points" not in short.context.analysis and short.context.counters["sensitivity.time_budget_fallback"] == 1
    assert {n: p.rank for n, p in short.context.plan.items()} == {n: p.rank for n, p in fisher.context.plan.items()}
    assert {meta.info(n).sensitivity.kind for n in meta.targets(short.graph)} == {"fisher"}
    unlimited = tngraph.compress_with_result(model, calibration=data, budget=0.5, time_budget=0, heal_steps=0, progress=False)
    assert set(unlimited.context.analysis["measured_points"]) == {"a", "b"} and "sensitivity_fallback" not in unlimited.context.analysis
    with pytest.raises(ConfigError, match="time_budget"):
        Config(time_budget=-1)
