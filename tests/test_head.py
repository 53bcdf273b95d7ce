"""The output head reduced to its input's width while the analysis passes run (tngraph.passes.head):
exact squared errors and energies, the graph left as it was, and refused wherever it would not be exact."""
import importlib

import pytest
import torch

from tests.helpers_reference import stats_sum
from tngraph import meta
from tngraph.capture import capture
from tngraph.config import Config
from tngraph.passes import PassContext, calibrate, targets
from tngraph.passes.fisher import gradient_stats
from tngraph.passes.head import reduce_head, reduced_head
from tngraph.passes.sensitivity import _probe
from tngraph.passes.targets import target_weight


class _LM(torch.nn.Module):
    """Two hidden linears and a head 16 -> 300 (wider than its input), optionally scaled, softcapped
    or pooled: the shapes of a language model's end."""

    def __init__(self, bias=True, end=None):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(12, 16)
        self.l2 = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 300, bias=bias)
        self.end = end

    def forward(self, x):
        logits = self.head(self.l2(torch.relu(self.l1(x))))
        if self.end == "scale":
            return (logits * 0.5).float()
        if self.end == "softcap":
            return torch.tanh(logits / 30.0) * 30.0
        if self.end == "loss":
            return logits, logits.logsumexp(-1).mean()
        return logits


def _data(n=4):
    g = torch.Generator().manual_seed(1)
    return [((torch.randn(3, 20, 12, generator=g),), {}) for _ in range(n)]


def _prepared(model, data, **config):
    gm = capture(model, data[0])
    ctx = PassContext(config=Config(progress=False, exclude=("head",), **config), calibration=data)
    targets(gm, ctx)
    calibrate(gm, ctx)
    return gm, ctx


@pytest.mark.parametrize("bias", [True, False])
def test_the_reduced_head_keeps_every_squared_norm_and_difference(bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(500, 24, generator=g, dtype=torch.float64)
    b = torch.randn(500, generator=g, dtype=torch.float64) if bias else None
    r, c = reduce_head(w, b)
    assert r.shape == (25, 24) and c.shape == (25,) and r.dtype == torch.float64
    x, y = torch.randn(2, 64, 24, generator=g, dtype=torch.float64)

    def full(v):
        return v @ w.T + (b if bias else 0)

    def small(v):
        return v @ r.T + c

    assert torch.allclose(small(x).pow(2).sum(-1), full(x).pow(2).sum(-1), rtol=1e-10)
    assert torch.allclose((small(x) - small(y)).pow(2).sum(-1), (full(x) - full(y)).pow(2).sum(-1), rtol=1e-10)


@pytest.mark.parametrize("end", [None, "scale"])
def test_the_measured_output_error_is_the_same_with_the_reduced_head_and_the_graph_comes_back(end):
    model = _LM(end=end).eval()
    data = _data()
    gm, ctx = _prepared(model, data)
    code, attributes = gm.code, {name for name, _ in gm.named_buffers()} | {name for name, _ in gm.named_parameters()}
    [l2] = [n for n in meta.targets(gm) if meta.info(n).target.name == "l2"]
    weight = target_weight(gm, meta.info(l2).target)
    original = weight.detach().clone()
    change = 0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(3))
    errors = []
    for reduce in (False, True):
        with torch.no_grad():
            with reduced_head(gm, ctx) if reduce else _Same() as reduced:
                assert reduced is reduce
                out = gm(*data[0][0])
                assert out.shape[-1] == (17 if reduce else 300)  # d + 1 columns while reduced
                error = _probe(gm, ctx)
                weight.add_(change)
                errors.append(error())
                weight.copy_(original)
    assert errors[0] > 1e-4 and errors[1] == pytest.approx(errors[0], rel=1e-4)
    assert gm.code == code
    assert {name for name, _ in gm.named_buffers()} | {name for name, _ in gm.named_parameters()} == attributes


def test_fisher_statistics_have_the_same_energy_and_gram_with_the_reduced_head():
    model = _LM().eval()
    data = _data()
    gm, ctx = _prepared(model, data)
    nodes = meta.targets(gm)
    full = gradient_stats(gm, nodes, data, probes=64, seed=0)
    with reduced_head(gm, ctx) as reduced:
        assert reduced
        small = gradient_stats(gm, nodes, data, probes=64, seed=0)
    for name in ("l1", "l2"):
        assert small[name].energy == pytest.approx(full[name].energy, rel=1e-5)
        assert small[name].rows == full[name].rows and small[name].samples == full[name].samples
        # other random probes, the same expectation: E[g g^T] = J^T W^T W J either way
        assert (small[name].gram - full[name].gram).norm() / full[name].gram.norm() < 0.15, name


@pytest.mark.parametrize("why", ["softcap", "loss", "target", "pooled"])
def test_the_head_is_kept_whole_where_the_reduction_would_not_be_exact(why):
    model = _LM(end=why if why in ("softcap", "loss") else None).eval()
    data = _data()
    gm = capture(model, data[0])
    exclude = () if why == "target" else ("head",)
    objective = (lambda out, args, kwargs: torch.nn.functional.normalize(out.mean(1), dim=-1)) if why == "pooled" else None
    ctx = PassContext(config=Config(progress=False, exclude=exclude), calibration=data, objective=objective)
    targets(gm, ctx)
    assert ("head" in {meta.info(n).target.name for n in meta.targets(gm)}) == (why == "target")
    code = gm.code
    with torch.no_grad(), reduced_head(gm, ctx) as reduced:
        assert not reduced
        out = gm(*data[0][0])
        assert (out[0] if isinstance(out, tuple) else out).shape[-1] == 300
    assert gm.code == code


def _qwen2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = transformers.Qwen2ForCausalLM(config).eval()  # untied: lm_head is a target unless excluded
    g = torch.Generator().manual_seed(2)
    data = [((), {"input_ids": torch.randint(0, 400, (4, 16), generator=g), "attention_mask": torch.ones(4, 16, dtype=torch.long)})
            for _ in range(4)]
    return model, data


def _full_head(monkeypatch):
    for module in ("calibrate", "fisher", "sensitivity"):  # the full head, for comparison
        monkeypatch.setattr(importlib.import_module(f"tngraph.passes.{module}"), "reduced_head", lambda gm, ctx, **kw: _Same())


def test_a_causal_lm_measures_alike_with_its_head_reduced(caplog, monkeypatch):
    """A Qwen2 built from its config, its head no target: the analysis passes run the head reduced
    (logged), and the measured sensitivity is the one the full head gives."""
    import tngraph

    model, data = _qwen2()
    options = dict(budget=0.5, sensitivity="measured", output_whiten=False, heal_steps=0, progress=False, exclude=("lm_head",))
    with caplog.at_level("INFO", logger="tngraph.passes.head"):
        reduced = tngraph.compress_with_result(model, calibration=data, **options)
    assert "at its input's width (33 outputs instead of 400)" in caplog.text
    _full_head(monkeypatch)
    whole = tngraph.compress_with_result(model, calibration=data, **options)
    assert {n: p.rank for n, p in reduced.context.plan.items()} == {n: p.rank for n, p in whole.context.plan.items()}
    points = reduced.context.analysis["measured_points"]
    for name, expected in whole.context.analysis["measured_points"].items():
        assert [p[0] for p in points[name]] == [p[0] for p in expected]
        assert [p[1] for p in points[name]] == pytest.approx([p[1] for p in expected], rel=1e-3, abs=1e-9), name


@pytest.mark.parametrize("sensitivity", ["measured", "fisher"])
def test_a_head_that_is_a_target_is_never_run_wide_and_its_share_is_exact(sensitivity, monkeypatch):
    """lm_head a target: no V x V gradient Gram, its sensitivity from its input Gram (the objective is
    its output), and that agrees with measuring it end to end through the full head."""
    import tngraph

    model, data = _qwen2()
    options = dict(budget=0.5, sensitivity=sensitivity, heal_steps=0, progress=False)
    reduced = tngraph.compress_with_result(model, calibration=data, **options)
    ctx = reduced.context
    assert "lm_head" in ctx.plan and "lm_head" not in ctx.grad_stats and "lm_head" in ctx.analysis["head_targets"]
    assert ctx.stats["lm_head"].rows == 4 * 4 * 16
    if sensitivity == "fisher":
        return
    assert ctx.counters["sensitivity.measured.head"] == 1
    held = ctx.analysis["measured_points"]["lm_head"]
    _full_head(monkeypatch)
    # the full head measured end to end (input whitening only, as the held head's spectrum), the
    # others at their uniform ranks: the same ratio up to their interaction (1.0001 vs 0.945-0.960)
    whole = tngraph.compress_with_result(model, calibration=data, **options, output_whiten=False)
    measured = [p[1] for p in whole.context.analysis["measured_points"]["lm_head"]]
    assert [p[1] for p in held] == pytest.approx(measured, rel=0.1)


class _Same:
    def __enter__(self):
        return False

    def __exit__(self, *exc):
        return False


def test_calibration_statistics_leave_out_the_head_checks_forward_when_fisher_rides_on_calibrate():
    """With the fisher pass's backward passes on calibrate's forwards, the reduced head's check of
    the objective (one forward of its own) adds no rows: the statistics are those of the passes apart."""
    from tngraph.pipeline import run_passes

    fisher = importlib.import_module("tngraph.passes.fisher")
    model, data = _qwen2()
    model.config.use_cache = False
    for k, (_, kwargs) in enumerate(data):  # padded rows: the statistics count real tokens only
        kwargs["attention_mask"][k % 4, 10 - k:] = 0
    runs = {}
    for together in (True, False):
        gm = capture(model, data[0])
        ctx = PassContext(config=Config(progress=False, exclude=("lm_head",)), calibration=data, objective=lambda result, args, kwargs: result)
        if together:
            run_passes(gm, ctx, [targets, calibrate, fisher.fisher], instruments=[])
        else:
            run_passes(gm, ctx, [targets, calibrate], instruments=[])
            run_passes(gm, ctx, [fisher.fisher], instruments=[])
        assert ctx.analysis["head"].get(("whole", id(ctx.objective))) is True  # the check ran
        runs[together] = ctx
    real = sum(int(kwargs["attention_mask"].sum()) for _, kwargs in data)
    for name, stats in runs[True].stats.items():
        assert stats.rows == runs[False].stats[name].rows == real, name
        assert torch.allclose(stats_sum(stats), stats_sum(runs[False].stats[name]), rtol=1e-5, atol=1e-6)
        assert torch.allclose(runs[True].grad_stats[name].gram, runs[False].grad_stats[name].gram, rtol=1e-5, atol=1e-9)
