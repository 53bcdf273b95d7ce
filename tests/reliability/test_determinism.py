"""The same inputs and seed give byte-identical artifacts (README: "Determinism")."""
import pytest
import torch

import tngraph
from tests.conftest import MLP, write_tiny_bert
from tngraph.artifact import FACTORS, RECIPE
from tngraph.cli import main


def _save(tmp_path, name, seed=0):
    g = torch.Generator().manual_seed(1)
    data = [((torch.randn(16, 24, generator=g),), {}) for _ in range(6)]
    module = tngraph.compress(MLP().eval(), calibration=data, config=tngraph.Config(budget=0.5, seed=seed, heal_steps=0, progress=False))
    return tngraph.save(module, tmp_path / name)


def test_python_api_artifacts_are_byte_identical(tmp_path):
    a, b = _save(tmp_path, "a"), _save(tmp_path, "b")
    for name in (FACTORS, RECIPE):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm):
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert-det"), minilm[1])


def test_command_line_artifacts_with_healing_are_byte_identical(tiny_bert, tmp_path):
    args = ["compress", "--model", str(tiny_bert), "--budget", "0.5", "--calibration-samples", "32", "--heal-steps", "12",
            "--sensitivity", "fisher", "--no-eval", "--quiet", "--seed", "3"]
    for name in ("a", "b"):
        assert main([*args, "--out", str(tmp_path / name)]) == 0
    for name in (FACTORS, RECIPE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert main([*args[:-1], "4", "--out", str(tmp_path / "c")]) == 0  # another seed: other healing batches
    assert (tmp_path / "c" / FACTORS).read_bytes() != (tmp_path / "a" / FACTORS).read_bytes()
