"""The numerical guard: every substitution is checked on the calibration data; a failing target is
kept dense (reported), or an error with strict=True."""
import math

import pytest
import torch

import tngraph
from tests.conftest import MLP
from tngraph.passes.guard import relative_error


def _data(n=4, rows=64, width=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(rows, width, generator=g),), {}) for _ in range(n)]


def _compress(model, **options):
    config = tngraph.Config(budget=0.4, allocation="uniform", heal_steps=0, progress=False, **options)
    return tngraph.compress_with_result(model, calibration=_data(), config=config)


def test_relative_error_is_the_output_error_on_the_calibration_rows():
    torch.manual_seed(0)
    w, x = torch.randn(8, 6), torch.randn(100, 6) @ torch.randn(6, 6)
    approx = w + 0.1 * torch.randn(8, 6)
    xd, wd, ad = x.double(), w.double(), approx.double()
    direct = float((xd @ (ad - wd).T).norm() / (xd @ wd.T).norm())
    assert relative_error(w, approx, x.T.double() @ x.double()) == pytest.approx(direct, rel=1e-9)
    assert relative_error(w, approx) == pytest.approx(float((approx - w).norm() / w.norm()), rel=1e-9)
    assert relative_error(torch.zeros(3, 3), torch.zeros(3, 3)) == 0.0  # an all-zero layer is exact
    assert relative_error(torch.zeros(3, 3), torch.ones(3, 3)) == math.inf
    assert relative_error(w, torch.full_like(w, float("nan"))) == math.inf


def test_default_guard_keeps_every_sound_substitution_and_records_its_error():
    result = _compress(MLP().eval())
    errors = result.context.analysis["guard"]
    assert set(errors) == {"layers.0", "layers.1", "layers.2"} and all(0 < e < 1 for e in errors.values())
    assert result.context.counters["guard.reverted"] == 0 and len(result.recipe["targets"]) == 3


def _one_hard_layer():
    """An MLP whose first and last layers are exactly rank 1 (no error at any rank) and whose small
    middle layer is a full-rank random matrix (a large error at any rank that saves parameters)."""
    model = MLP(dims=(24, 64, 8, 64)).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in (model.layers[0], model.layers[2]):
            out_f, in_f = layer.weight.shape
            layer.weight.copy_(torch.randn(out_f, 1, generator=g) @ torch.randn(1, in_f, generator=g))
    return model


def _kept(result, names):
    targets = {t["name"]: t for t in result.recipe["targets"]}
    dense = {n: m.weight.numel() + m.bias.numel() for n, m in result.module.named_modules() if n in names and isinstance(m, torch.nn.Linear)}
    total = sum(dense.values()) + sum(sum(f.numel() for f in m.parameters()) for n, m in result.module.named_modules() if n in targets)
    return targets, total


def test_a_target_over_the_tolerance_stays_dense_and_the_others_make_up_for_it():
    model = _one_hard_layer()
    names = ("layers.0", "layers.1", "layers.2")
    before = sum(m.weight.numel() + m.bias.numel() for m in model.layers)
    loose = _compress(model)
    errors = loose.context.analysis["guard"]
    assert max(errors, key=errors.get) == "layers.1" and errors["layers.0"] < 1e-3 and errors["layers.2"] < 1e-3
    result = _compress(model, guard_tolerance=errors["layers.1"] / 2)
    assert list(result.context.analysis["guard_reverted"]) == ["layers.1"]
    assert result.context.counters["factorize.reallocated"] == 2
    targets, kept = _kept(result, names)
    assert set(targets) == {"layers.0", "layers.2"}
    assert kept <= 0.4 * before  # the budget holds: the other two took lower ranks
    loose_ranks = {t["name"]: t["rank"] for t in loose.recipe["targets"]}
    assert all(targets[n]["rank"] < loose_ranks[n] for n in targets)
    assert all(e <= errors["layers.1"] / 2 for n, e in result.context.analysis["guard"].items() if n in targets)
    assert type(dict(result.module.named_modules())["layers.1"]) is torch.nn.Linear  # untouched in the user's module
    x = _data(1, seed=9)[0][0][0]
    torch.testing.assert_close(result.graph(x), result.module(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.module(x), model(x), atol=1e-3, rtol=1e-3)  # the rank-1 layers are exact


def test_a_budget_the_others_cannot_make_up_is_refused_naming_the_guard():
    model = MLP().eval()
    errors = _compress(model).context.analysis["guard"]
    tolerance = sorted(errors.values())[-2] * 1.0001  # the worst fails; the others, at lower ranks, then fail too
    with pytest.raises(tngraph.ConfigError, match="numerical guard kept .*layers.* dense"):
        _compress(model, guard_tolerance=tolerance)


def test_strict_turns_a_guard_failure_into_an_error_naming_the_layer():
    with pytest.raises(tngraph.PassError, match=r"layers\.\d: relative output error .* exceeds guard_tolerance") as err:
        _compress(MLP().eval(), guard_tolerance=1e-6, strict=True)
    assert "raise the budget" in str(err.value)


def test_a_decomposition_that_breaks_is_reverted_not_used(monkeypatch):
    import importlib

    factorize = importlib.import_module("tngraph.passes.factorize")  # the module (tngraph.passes.factorize is also the pass)
    real = factorize.decompose_lowrank

    def broken(weight, rank, *args, **kwargs):
        a, b = real(weight, rank, *args, **kwargs)
        return a * float("nan") if weight.shape[0] == 8 else a, b  # layers.1 is 64 -> 8

    monkeypatch.setattr(factorize, "decompose_lowrank", broken)
    real_outputs = factorize.lowrank_from_outputs  # layers.1, narrowing, is calibrated through its outputs

    def broken_outputs(weight, rank, *args, **kwargs):
        a, b, left = real_outputs(weight, rank, *args, **kwargs)
        return (a * float("nan"), b, left * float("nan")) if weight.shape[0] == 8 else (a, b, left)

    monkeypatch.setattr(factorize, "lowrank_from_outputs", broken_outputs)
    model = _one_hard_layer()
    result = _compress(model)
    assert list(result.context.analysis["guard_reverted"]) == ["layers.1"]
    x = _data(1, seed=3)[0][0][0]
    assert torch.isfinite(result.module(x)).all()
    with pytest.raises(tngraph.PassError, match="layers.1"):
        _compress(model, strict=True)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1", True])
def test_guard_options_are_validated(bad):
    with pytest.raises(tngraph.ConfigError, match="guard_tolerance"):
        tngraph.Config(guard_tolerance=bad)
    with pytest.raises(tngraph.ConfigError, match="strict"):
        tngraph.Config(strict="yes")
    assert tngraph.Config(guard_tolerance=None).guard_tolerance is None
