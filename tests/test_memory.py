"""The analysis passes' memory plan (tngraph.memory, --max-memory): diagonal output-gradient
statistics where full ones do not fit, and refusals that name the numbers before the long work."""
import pytest
import torch

import tngraph
from tngraph import memory, meta
from tngraph.calibration import GradStats
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
    room = GradStats.bytes(10) + GradStats.bytes(40, True) + 100  # the narrow one full, the wide one diagonal
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


def test_a_run_whose_statistics_would_not_fit_is_refused_before_the_forwards(tmp_path, monkeypatch, capsys):
    model, data = _Wide().eval(), _data()
    with pytest.raises(ConfigError, match=r"the calibration statistics \(X\^T X of 2 distinct target inputs\) need .* over the memory limit"):
        tngraph.compress(model, calibration=data, max_memory=1e-6, heal_steps=0, progress=False)
    with pytest.raises(ConfigError, match="max_memory"):
        Config(max_memory=-1)
    # the command line: one line, nothing written
    out = tmp_path / "art"
    rc = main(["compress", "--model", "minilm", "--out", str(out), "--max-memory", "0.01", "--heal-steps", "0", "--no-eval", "--quiet"])
    assert rc != 0 and not out.exists()
    err = capsys.readouterr().err
    assert "over the memory limit of 10.2 MB (--max-memory)" in err and "Traceback" not in err


def test_fisher_cuts_its_batches_into_micro_batches_that_fit(monkeypatch, caplog):
    monkeypatch.setattr(memory, "resident_bytes", lambda: 0)
    gm, nodes, data = _graph()
    whole = gradient_stats(gm, nodes, data, seed=0, probes=64, max_memory=0)
    # full statistics (13,600 bytes) and 24 bytes per output value and row (50 outputs): room for 10 of 30 rows
    limit = GradStats.bytes(10) + GradStats.bytes(40) + 2 * 24 * 50 * 10
    with caplog.at_level("INFO", logger="tngraph.passes.fisher"):
        parts = gradient_stats(gm, nodes, data, seed=0, probes=64, max_memory=limit / memory.GB)
    assert "micro-batches of 10 rows" in caplog.text
    for name in ("narrow", "wide"):
        assert not parts[name].diagonal and parts[name].rows == whole[name].rows == 90
        assert parts[name].energy == pytest.approx(whole[name].energy, rel=1e-6)
        # other random probes, the same expectation
        assert (parts[name].gram - whole[name].gram).norm() / whole[name].gram.norm() < 0.2, name
