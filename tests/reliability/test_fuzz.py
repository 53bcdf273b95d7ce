"""Fuzzing (hypothesis): any Config values and command-line flags give a valid result or one clean
error; random small MLP / attention models compress to something close to the original, or are
refused cleanly.

The examples are derandomized (the same every run, so CI cannot fail by chance); TNGRAPH_FUZZ=1
draws new ones each run (e.g. TNGRAPH_FUZZ=1 pytest tests/reliability/test_fuzz.py)."""
import dataclasses
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tngraph
from tngraph.cli import main
from tngraph.config import Config, valid_keys
from tngraph.errors import TngraphError
from tngraph.tn.formats import FORMATS
from tngraph.tn.refit import refit_core
from tests.conftest import write_tiny_bert
from tests.helpers_reference import layer_error, linear_grams, output_factors, plan_weights, rel, substituted, truncated

FIXED = not os.environ.get("TNGRAPH_FUZZ")
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 1 << 20), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "svd", "tt", "tucker", "budgeted", "uniform", "bytes", "linear", "embedding", "16x16", "x", "nan"]),
    st.lists(st.sampled_from(["linear", "embedding", "tucker", "tt", "bogus", "^encoder\\."]), max_size=3).map(tuple),
)
KEYS = st.sampled_from([k for k in valid_keys() if k not in ("dump_dir",)] + ["budjet", "rank", "heal_step"])


@settings(max_examples=400, deadline=None, derandomize=FIXED)
@given(st.dictionaries(KEYS, VALUES, max_size=4))
def test_any_config_is_valid_or_one_config_error(options):
    try:
        config = Config(**options)
    except TngraphError as exc:
        assert exc.problem and "\n" not in str(exc)
        return
    # what was accepted is usable: sane ranges, and it survives replace() with itself
    assert 0 < config.budget <= 1 and config.format in tngraph.config.FORMATS
    assert config.replace(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)}) == config


FLAGS = st.lists(st.one_of(
    st.tuples(st.just("--budget"), st.sampled_from(["0.5", "0.3", "0", "1.5", "abc", "-1", "nan", "1"])),
    st.tuples(st.just("--format"), st.sampled_from(["svd", "tt", "tr", "tucker", "kron", "monarch", "cp", "bogus"])),
    st.tuples(st.just("--allocation"), st.sampled_from(["auto", "uniform", "budgeted", "x"])),
    st.tuples(st.just("--sensitivity"), st.sampled_from(["spectral", "fisher", "y"])),
    st.tuples(st.just("--budget-kind"), st.sampled_from(["params", "bytes", "latency", "z"])),
    st.tuples(st.just("--tt-cores"), st.sampled_from(["2", "3", "0", "99", "q"])),
    st.tuples(st.just("--guard-tolerance"), st.sampled_from(["1.0", "0.01", "0", "-3", "inf"])),
    st.tuples(st.just("--calibration-samples"), st.sampled_from(["8", "0", "-4", "1e9"])),
    st.tuples(st.just("--include"), st.sampled_from(["encoder", "nothing-matches", "("])),
    st.tuples(st.just("--targets"), st.sampled_from(["linear", "linear,embedding", "conv"])),
    st.tuples(st.just("--threads"), st.sampled_from(["1", "0"])),
    st.tuples(st.just("--strict"),), st.tuples(st.just("--no-whiten"),), st.tuples(st.just("--no-refit"),),
    st.tuples(st.just("--bogus-flag"),),
), max_size=4)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm):
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert-fuzz"), minilm[1], layers=1, positions=64)


@settings(max_examples=12, deadline=None, derandomize=FIXED, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(FLAGS)
def test_command_line_flags_give_a_valid_artifact_or_one_clean_error(tiny_bert, tmp_path_factory, capsys, flags):
    out = tmp_path_factory.mktemp("fuzz") / "art"
    argv = ["compress", "--model", str(tiny_bert), "--out", str(out), "--no-eval", "--heal-steps", "0", "--quiet",
            "--calibration-samples", "16", "--sensitivity", "fisher"] + [part for flag in flags for part in flag]
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if rc == 0:
        module = tngraph.load(out)  # verified: hashes and source model
        assert module.tngraph_recipe["targets"] is not None
    else:
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("tngraph: error:"), err
        assert not out.exists()  # nothing half-written


class Block(torch.nn.Module):
    """A random small model: an optional self-attention block, then an MLP."""

    def __init__(self, width, hidden, depth, attention, act):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(width, 2, batch_first=True) if attention else None
        dims = [width] + [hidden] * depth + [width]
        self.mlp = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh}[act]

    def forward(self, x):
        if self.attn is not None:
            x = x + self.attn(x, x, x, need_weights=False)[0]
        for i, layer in enumerate(self.mlp):
            x = layer(x)
            if i < len(self.mlp) - 1:
                x = self.act(x)
        return x


@settings(max_examples=25, deadline=None, derandomize=FIXED)
@given(width=st.sampled_from([8, 12, 16]), hidden=st.integers(4, 40), depth=st.integers(0, 3), attention=st.booleans(),
       act=st.sampled_from(["relu", "gelu", "tanh"]), budget=st.sampled_from([0.05, 0.5, 0.8, 1.0]),
       fmt=st.sampled_from(["svd", "tt", "tucker"]), seed=st.integers(0, 3))
def test_random_models_compress_close_to_the_original_or_are_refused_cleanly(width, hidden, depth, attention, act, budget, fmt, seed):
    torch.manual_seed(seed)
    model = Block(width, hidden, depth, attention, act).eval()
    g = torch.Generator().manual_seed(seed + 10)
    data = [((torch.randn(4, 6, width, generator=g),), {}) for _ in range(4)]
    config = tngraph.Config(budget=budget, format=fmt, heal_steps=0, progress=False, sensitivity="fisher")
    try:
        result = tngraph.compress_with_result(model, calibration=data, config=config)
    except TngraphError as exc:
        assert exc.problem and exc.fix, exc
        return
    x = torch.randn(3, 5, width, generator=g)
    ctx = result.context
    weights = plan_weights(ctx)
    with torch.no_grad():
        ref, out, layerwise = model(x), result.module(x), substituted(model, weights)(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    # the module is the model with each target's weight replaced by its factors (a model that outputs
    # zeros, or a factor put in the wrong place, is not) ...
    torch.testing.assert_close(out, layerwise, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    if budget == 1.0 and fmt == "svd":
        assert rel(out, ref) < 1e-3  # keeping everything is near-exact
    # ... and each of those is as close as the method reaches: its error on the calibration inputs
    # (X^T X by forward hooks), which the guard recorded and kept <= 1, is the least error of its
    # rank (low-rank: the truncated SVD whitened on both sides, by hand) or that of the format's
    # whitened decomposition and refit applied by hand (at most the decomposition's before the refit)
    grams, guard, left = linear_grams(model, data), ctx.analysis.get("guard", {}), output_factors(ctx, model)
    assert all(e <= 1.0 for e in guard.values()) and set(ctx.plan) <= set(guard)
    for name, plan in ctx.plan.items():
        weight, gram = model.get_submodule(name).weight, grams[name]
        assert layer_error(weight, weights[name], gram) == pytest.approx(guard[name], rel=1e-4, abs=1e-6), name
        if plan.format == "lowrank":
            best = truncated(weight, plan.rank, gram, config.damping, left.get(name))
            achieved, reached = layer_error(weight, weights[name], gram, left.get(name)), layer_error(weight, best, gram, left.get(name))
        else:
            options = FORMATS[plan.format].options(config)
            white = FORMATS[plan.format].whitening(gram, weight.shape[0], weight.shape[1], config.damping, **options)
            net = FORMATS[plan.format].decompose(weight, plan.rank, white, **options)
            achieved, reached = guard[name], layer_error(weight, net.to_dense(), gram)
            refitted = layer_error(weight, (refit_core(net, weight, gram) or net).to_dense(), gram)
            assert achieved == pytest.approx(refitted, rel=1e-4, abs=1e-6), (name, plan.format, achieved, refitted)
        assert achieved <= reached * (1 + 1e-4) + 1e-6, (name, plan.format, achieved, reached)
