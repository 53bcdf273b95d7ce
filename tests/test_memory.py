"""The analysis passes' memory plan (tngraph.memory, --max-memory): diagonal output-gradient
statistics where full ones do not fit, and refusals that name the numbers before the long work."""
import pytest
import torch

import tngraph
from tests.helpers_reference import stats_sum
from tngraph import memory, meta
from tngraph.calibration import GradStats, ProjectedGradStats
from tngraph.capture import capture
from tngraph.cli import main
from tngraph.config import Config
from tngraph.errors import ConfigError
from tngraph.passes import PassContext, targets
from tngraph.passes.fisher import gradient_stats


class _Wide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.narrow = torch.nn.Linear(12, 10)
        self.wide = torch.nn.Linear(10, 40)

    def forward(self, x):
        return self.wide(torch.relu(self.narrow(x)))


def _data():
    g = torch.Generator().manual_seed(1)
    return [((torch.randn(30, 12, generator=g),), {}) for _ in range(3)]


def _graph():
    model, data = _Wide().eval(), _data()
    gm = capture(model, data[0])
    targets(gm, PassContext(config=Config(progress=False), calibration=data))
    return gm, meta.targets(gm), data


def test_diagonal_gradient_statistics_are_the_diagonal_of_the_full_ones():
    g = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    full, diagonal = GradStats(7), GradStats(7, diagonal=True)
    full.update(g, 0.5)
    diagonal.update(g, 0.5)
    assert diagonal.sums.shape == (7,) and diagonal.gram.shape == (7, 7)
    assert torch.allclose(diagonal.gram, torch.diag(torch.diagonal(full.gram)), rtol=1e-5)
    assert GradStats.bytes(7) == 8 * 49 and GradStats.bytes(7, True) == 8 * 7


def test_the_widest_output_statistics_go_diagonal_when_the_full_ones_do_not_fit(monkeypatch, caplog):
    monkeypatch.setattr(memory, "resident_bytes", lambda: 0)
    gm, nodes, data = _graph()
    full = gradient_stats(gm, nodes, data, seed=0, probes=64, max_memory=0)  # the physical memory: all full, one pass per batch
    assert not any(s.diagonal for s in full.values())
    # half of it: the narrow one full (with room for its whitening's copies after the passes), the wide one diagonal
    room = 2 * (memory.WHITENING_COPIES * GradStats.bytes(10) + GradStats.bytes(40, True) + 100)
    with caplog.at_level("INFO", logger="tngraph.memory"), caplog.at_level("INFO", logger="tngraph.passes.fisher"):
        planned = gradient_stats(gm, nodes, data, seed=0, probes=64, max_memory=room / memory.GB)
    assert "1 of 2 targets keep diagonal output-gradient statistics (the widest: wide, 40 outputs)" in caplog.text
    assert "micro-batches of 1 rows" in caplog.text  # what room is left: a row at a time
    assert planned["wide"].diagonal and not planned["narrow"].diagonal
    # other random probes (a row at a time), the same expectation
    assert (planned["narrow"].gram - full["narrow"].gram).norm() / full["narrow"].gram.norm() < 0.2
    expected = torch.diag(torch.diagonal(full["wide"].gram))
    assert (planned["wide"].gram - expected).norm() / expected.norm() < 0.2
    with pytest.raises(ConfigError, match="even kept diagonal.*--max-memory"):
        gradient_stats(gm, nodes, data, seed=0, max_memory=100 / memory.GB)


def test_a_gram_whose_whitening_would_not_fit_is_kept_diagonal_even_when_its_sums_fit(monkeypatch):
    """A tied LM head's vocabulary x vocabulary Gram fits as sums, then whitening makes two more
    copies of it: the plan keeps it diagonal (the rest as before)."""
    monkeypatch.setattr(memory, "resident_bytes", lambda: 0)
    head, narrow = GradStats.bytes(100), GradStats.bytes(10)
    # the head's sums and the narrow one's fit in half the limit; two more copies of the head's do not fit the other half
    limit = int(2 * (head + narrow + 10))
    assert memory.diagonal_plan({"head": 100, "narrow": 10}, limit) == {"head"}
    # room for the copies too: nothing is diagonal
    assert memory.diagonal_plan({"head": 100, "narrow": 10}, int(2 * (memory.WHITENING_COPIES * head + narrow))) == set()


def test_projected_gradient_statistics_count_as_held_and_are_never_made_diagonal(monkeypatch, caplog):
    monkeypatch.setattr(memory, "resident_bytes", lambda: 0)
    gm, nodes, data = _graph()
    # the wide target (10 -> 40) projected: 8 * 10^2 bytes beside the narrow one's 8 * 10^2, both full
    room = 2 * (GradStats.bytes(10) + ProjectedGradStats.bytes(10) + 100)
    with caplog.at_level("INFO", logger="tngraph.memory"):
        planned = gradient_stats(gm, nodes, data, seed=0, probes=4, max_memory=room / memory.GB, projected={"wide"})
    assert "diagonal" not in caplog.text
    assert isinstance(planned["wide"], ProjectedGradStats) and planned["wide"].gram.shape == (10, 10)
    assert not planned["narrow"].diagonal
    # with less room the narrow one goes diagonal, the projected one stays whole (its sums are the small side)
    room = 2 * (GradStats.bytes(10, True) + ProjectedGradStats.bytes(10) + 50)
    with caplog.at_level("INFO", logger="tngraph.memory"):
        planned = gradient_stats(gm, nodes, data, seed=0, probes=4, max_memory=room / memory.GB, projected={"wide"})
    assert planned["narrow"].diagonal and isinstance(planned["wide"], ProjectedGradStats)
    with pytest.raises(ConfigError, match="even kept diagonal"):  # the projected sums alone do not fit
        gradient_stats(gm, nodes, data, seed=0, max_memory=ProjectedGradStats.bytes(10) / memory.GB, projected={"wide"})


def test_a_run_whose_statistics_would_not_fit_is_refused_before_the_forwards(tmp_path, monkeypatch, capsys):
    model, data = _Wide().eval(), _data()
    with pytest.raises(ConfigError, match=r"the calibration statistics \(2 Gram matrices of target inputs or outputs, float32\) need .* over the memory limit"):
        tngraph.compress(model, calibration=data, max_memory=1e-6, heal_steps=0, progress=False)
    with pytest.raises(ConfigError, match="max_memory"):
        Config(max_memory=-1)
    # the command line: one line, nothing written
    out = tmp_path / "art"
    rc = main(["compress", "--model", "minilm", "--out", str(out), "--max-memory", "0.01", "--heal-steps", "0", "--no-eval", "--quiet"])
    assert rc != 0 and not out.exists()
    err = capsys.readouterr().err
    assert "over the memory limit of 10.2 MB (--max-memory)" in err and "Traceback" not in err


def test_the_widest_calibration_grams_are_summed_in_float32_when_float64_ones_do_not_fit(monkeypatch, caplog):
    from tngraph.passes import calibrate

    monkeypatch.setattr(memory, "resident_bytes", lambda: 0)
    runs = {}
    # float64 Grams: 8 (12^2 + 10^2) = 1,952 bytes; within half of 2,800 only with the 12-wide one in float32
    for limit in (0.0, 2800 / memory.GB):
        model, data = _Wide().eval(), _data()
        gm = capture(model, data[0])
        ctx = PassContext(config=Config(progress=False, max_memory=limit, short_side=False), calibration=data)
        targets(gm, ctx)
        with caplog.at_level("INFO", logger="tngraph.passes.calibrate"):
            calibrate(gm, ctx)
        runs[limit] = ctx.stats
    full, planned = runs[0.0], runs[2800 / memory.GB]
    assert "1 of 2 calibration Grams summed in float32 (the widest: 12 wide)" in caplog.text
    assert planned["narrow"].dtype == torch.float32 and planned["wide"].dtype == torch.float64
    for name in ("narrow", "wide"):
        assert full[name].dtype == torch.float64 and planned[name].gram.dtype == torch.float64  # read in float64 either way
        assert torch.allclose(planned[name].gram, full[name].gram, rtol=1e-6, atol=1e-6 * float(full[name].gram.abs().max()))
    # the refusal counts float32 Grams: 4 (144 + 100) = 976 bytes do not fit in 900
    with pytest.raises(ConfigError, match="float32"):
        model, data = _Wide().eval(), _data()
        tngraph.compress(model, calibration=data, max_memory=900 / memory.GB, heal_steps=0, progress=False, short_side=False)


def test_fisher_cuts_its_batches_into_micro_batches_that_fit(monkeypatch, caplog):
    monkeypatch.setattr(memory, "resident_bytes", lambda: 0)
    gm, nodes, data = _graph()
    whole = gradient_stats(gm, nodes, data, seed=0, probes=64, max_memory=0)
    # full statistics (13,600 bytes) and 24 bytes per output value and row (50 outputs): room for 20 of 30 rows
    # (and half the limit holds two copies of the wide Gram, for its whitening after the passes)
    limit = GradStats.bytes(10) + GradStats.bytes(40) + 2 * 24 * 50 * 20
    assert limit / 2 >= memory.WHITENING_COPIES * GradStats.bytes(40)
    with caplog.at_level("INFO", logger="tngraph.passes.fisher"):
        parts = gradient_stats(gm, nodes, data, seed=0, probes=64, max_memory=limit / memory.GB)
    assert "micro-batches of 20 rows" in caplog.text
    for name in ("narrow", "wide"):
        assert not parts[name].diagonal and parts[name].rows == whole[name].rows == 90
        assert parts[name].energy == pytest.approx(whole[name].energy, rel=1e-6)
        # other random probes, the same expectation
        assert (parts[name].gram - whole[name].gram).norm() / whole[name].gram.norm() < 0.2, name


class _Tied(torch.nn.Module):
    """Four layers, two pairs of them sharing one weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c, self.d = (torch.nn.Linear(8, 8) for _ in range(4))
        self.c.weight = self.b.weight
        self.d.weight = self.b.weight

    def forward(self, x):
        return self.d(self.c(self.b(self.a(x))))


def test_the_result_is_built_without_copying_the_weights_it_replaces():
    from types import SimpleNamespace

    from tngraph.api import copy_around, unshare

    model = _Tied()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plans = [SimpleNamespace(name="a", tied=()), SimpleNamespace(name="b", tied=())]
    copy = copy_around(model, plans)
    assert copy.a.weight is model.a.weight and copy.b.weight is model.b.weight  # not copied: about to be replaced
    assert copy.c.bias is not model.c.bias  # the kept layers' own tensors are copies
    for name in ("a", "b"):  # what apply_plan does
        setattr(copy, name, torch.nn.Linear(8, 8))
    unshare(copy, model)
    originals = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert not originals & {t.data_ptr() for t in [*copy.parameters(), *copy.buffers()]}
    assert copy.c.weight is copy.d.weight  # the kept layers' tie holds: one clone for both
    assert torch.equal(copy.c.weight, model.b.weight)
    with torch.no_grad():
        copy.c.weight.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compress_leaves_the_users_model_untouched_shares_nothing_with_it_and_releases_the_grams():
    model = _Wide().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _data()
    run = tngraph.compress_with_result(model, data[0], [d[0] for d in data], budget=0.5, progress=False)
    result = run.module
    assert type(result.wide).__name__ != "Linear"  # replaced
    originals = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert not originals & {t.data_ptr() for t in [*result.parameters(), *result.buffers()]}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the input Grams are released once the passes have run (rows and mean |x| stay)
    assert run.context.stats and all(stats_sum(s) is None and s.rows == 90 for s in run.context.stats.values())


def test_diagonal_statistics_whiten_by_scaling_as_the_dense_diagonal_matrix_would():
    from tngraph.tn.whitening import diagonal_whitening, whitening_from_gram

    g = torch.Generator().manual_seed(0)
    diag = torch.rand(9, generator=g, dtype=torch.float64) + 0.1
    w = torch.randn(9, 5, generator=g, dtype=torch.float64)
    fast, dense = diagonal_whitening(diag, 0.1), whitening_from_gram(torch.diag(diag), 0.1)
    assert torch.allclose(fast.apply_left(w), dense.apply_left(w))
    assert torch.allclose(fast.unapply_left(fast.apply_left(w)), w)
    assert torch.allclose(fast.apply(w.T), dense.apply(w.T)) and torch.allclose(fast.unapply(fast.apply(w.T)), w.T)
    assert torch.allclose(fast.s, dense.s)


def test_the_plans_count_an_mmapped_checkpoints_weights_before_the_forwards_touch_them(tmp_path):
    """A safetensors checkpoint is mmapped: its pages are resident only once touched, so the plans
    bring the weights in first (memory.load_weights) and count them."""
    path = tmp_path / "weights.bin"
    n = 16 * 1024 * 1024  # 64 MB of float32
    path.write_bytes(b"\0" * (4 * n))
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.from_file(str(path), shared=True, size=n, dtype=torch.float32), requires_grad=False)
    before = memory.resident_bytes()
    memory.load_weights(module)
    assert memory.resident_bytes() - before > 0.9 * 4 * n
