import json
import tempfile
from pathlib import Path

import pytest
import torch

import tngraph
from tngraph import meta
from tngraph.config import Config
from tngraph.errors import ConfigError, ModelError, PassError, TngraphError
from tngraph.passes import PIPELINE, PassContext, PassResult, allocate, calibrate, declare, factorize, targets
from tngraph.pipeline import run_passes
from tngraph.tn.formats import FORMATS
from tngraph.tn.refit import refit_core
from tests.helpers_reference import by_hand, layer_error, linear_grams, output_factors, plan_weights, rel, substituted, truncated

aten = torch.ops.aten


def _run(model, data, passes=PIPELINE, example=None, **options):
    gm = tngraph.capture(model, example if example is not None else data[0])
    # fuse off: these tests look at what factorize wrote (tests/test_fuse.py covers the fused graph)
    ctx = PassContext(config=Config(progress=False, **{"allocation": "uniform", "fuse": False, **options}), calibration=data)
    return run_passes(gm, ctx, passes), ctx


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _weights_read_by_linears(gm):
    return sorted(str(n.args[1].target) for n in gm.graph.nodes if n.target == aten.linear.default)


def _inputs(data):
    return torch.cat([args[0] for args, _ in data])


def _network_by_hand(model, data, ctx):
    """Each network-format target decomposed by hand as factorize does: the format's whitened
    decomposition at the planned rank (X^T X gathered by forward hooks), then the least-squares refit
    of one core on X^T X. Returns the model with those weights and the one with the decompositions
    before the refit, after checking every target's error (the guard's, recomputed by hand from the
    plan's factors): the same as the refitted decomposition's, and no larger than before the refit."""
    grams, cfg = linear_grams(model, data), ctx.config
    refitted, before, got = {}, {}, plan_weights(ctx)
    for name, plan in ctx.plan.items():
        fmt, weight, gram = FORMATS[plan.format], model.get_submodule(name).weight, grams[name]
        options = fmt.options(cfg)
        net = fmt.decompose(weight, plan.rank, fmt.whitening(gram, weight.shape[0], weight.shape[1], cfg.damping, **options), **options)
        before[name] = net.to_dense()
        refitted[name] = ((refit_core(net, weight, gram) if cfg.refit else None) or net).to_dense()
        error = layer_error(weight, got[name], gram)
        assert error == pytest.approx(ctx.analysis["guard"][name], rel=1e-4)
        assert error == pytest.approx(layer_error(weight, refitted[name], gram), rel=1e-4, abs=1e-6), name
        assert error <= layer_error(weight, before[name], gram) * (1 + 1e-4) + 1e-6, name
    return substituted(model, refitted), substituted(model, before)


def test_targets_are_found_and_annotated(mlp, mlp_data):
    gm, ctx = _run(mlp, mlp_data, passes=[targets])
    found = meta.targets(gm)
    assert [meta.info(n).target.name for n in found] == ["layers.0", "layers.1", "layers.2"]
    t = meta.info(found[0]).target
    assert (t.in_features, t.out_features, t.weight, t.bias) == (24, 48, "layers.0.weight", "layers.0.bias")
    assert ctx.counters["targets.found"] == 3


def test_factorize_rewrites_every_linear_into_a_chain(mlp, mlp_data):
    gm, ctx = _run(mlp, mlp_data, budget=0.5)
    gm.graph.lint()
    # structure: each target became two linears reading the factors; no dense weight is left
    assert _ops(gm).count(aten.linear.default) == 6
    assert _weights_read_by_linears(gm) == sorted(f"layers.{i}.weight_lowrank_{f}" for i in range(3) for f in "ab")
    assert not any(name.endswith(".weight") for name, _ in gm.named_parameters())
    assert ctx.counters["lowrank_linear.applied"] == 3
    # provenance and torch's own metadata on the created nodes
    created = [n for n in gm.graph.nodes if meta.info(n).provenance is not None]
    # the low-rank layer's reference, traced: two linears (tngraph.layers.lowrank)
    assert {meta.info(n).provenance.role for n in created} == {"factor_a", "factor_b", "layer"}
    assert all(meta.info(n).provenance.created_by == "factorize" for n in created)
    assert all("nn_module_stack" in n.meta and "val" in n.meta for n in created)
    assert all("val" in n.meta for n in gm.graph.nodes if n.op == "call_function")
    down = next(n for n in created if meta.info(n).provenance.role == "layer" and n.target == aten.linear.default)
    assert down.meta["val"].shape[-1] == meta.info(down.users.__iter__().__next__()).plan.rank
    # numbers: random weights are nearly full rank, so half the parameters cannot be exact (full rank
    # is checked exactly below); on the calibration inputs the graph is the two-sided whitened
    # truncated SVD applied by hand at the planned ranks, and at least as close as the input-whitened one
    x = _inputs(mlp_data)
    ranks = {name: plan.rank for name, plan in ctx.plan.items()}
    grams = linear_grams(mlp, mlp_data)
    reached = by_hand(mlp, ranks, grams, ctx.config.damping, output_factors(ctx, mlp))
    with torch.no_grad():
        err = rel(gm(x), mlp(x))
        assert rel(gm(x), reached(x)) < 1e-4
        assert err <= 1.05 * rel(by_hand(mlp, ranks, grams)(x), mlp(x)) + 1e-3  # ~0.45 <= ~0.50; zeros: 1.0


def test_graph_and_module_materializations_agree(mlp, mlp_data):
    result = tngraph.compress_with_result(mlp, calibration=mlp_data, config=Config(budget=0.4, progress=False))
    x = torch.randn(5, 24)
    torch.testing.assert_close(result.graph(x), result.module(x), atol=1e-5, rtol=1e-5)
    assert isinstance(result.module.layers[1], tngraph.modules.LowRankLinear)
    assert isinstance(mlp.layers[1], torch.nn.Linear), "the user's model must not be modified"


@declare(kind="analysis", requires=("targets",), produces=("plan",))
def _full_rank_allocate(gm, ctx):
    for node in meta.targets(gm):
        t = meta.info(node).target
        r = min(t.in_features, t.out_features)
        meta.update(node, plan=meta.PlanInfo("lowrank", r, t.dense_params, r * (t.in_features + t.out_features)))
    return PassResult(gm, modified=True)


_full_rank_allocate.__name__ = "allocate"


def test_full_rank_reproduces_the_original(mlp, mlp_data):
    gm, _ = _run(mlp, mlp_data, passes=[targets, calibrate, _full_rank_allocate, factorize])
    x = torch.randn(7, 24)
    torch.testing.assert_close(gm(x), mlp(x), atol=1e-4, rtol=0)


def test_error_falls_as_rank_grows(mlp, mlp_data):
    x = torch.cat([d[0][0] for d in mlp_data])
    errors = []
    for budget in (0.15, 0.3, 0.5, 0.7, 0.9):
        gm, _ = _run(mlp, mlp_data, budget=budget)
        errors.append(((gm(x) - mlp(x)).norm() / mlp(x).norm()).item())
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.5 * errors[0]


def test_whitening_beats_plain_svd_on_calibration_like_data(mlp, mlp_data):
    x = torch.cat([d[0][0] for d in mlp_data])
    white, _ = _run(mlp, mlp_data, budget=0.4)
    plain, _ = _run(mlp, mlp_data, budget=0.4, whiten=False)
    assert (white(x) - mlp(x)).norm() < (plain(x) - mlp(x)).norm()


def test_never_factorizes_into_more_parameters(mlp_data):
    # even rank 1 of a 1 x 24 or 24 x 1 weight is not smaller than the weight itself
    model = torch.nn.Sequential(torch.nn.Linear(24, 1), torch.nn.Linear(1, 24), torch.nn.Linear(24, 24)).eval()
    gm, ctx = _run(model, mlp_data, budget=1.0)
    assert ctx.counters["allocate.dense.not_smaller"] == 3
    assert ctx.counters["lowrank_linear.applied"] == 0
    assert _weights_read_by_linears(gm) == ["0.weight", "1.weight", "2.weight"]
    gm, ctx = _run(model, mlp_data, budget=0.5)
    assert ctx.counters["allocate.dense.not_smaller"] == 2 and ctx.counters["lowrank_linear.applied"] == 1


def test_include_exclude_filters(mlp, mlp_data):
    gm, ctx = _run(mlp, mlp_data, include=(r"layers\.[01]$",), exclude=(r"\.0$",))
    assert [meta.info(n).target.name for n in meta.targets(gm)] == ["layers.1"]
    assert ctx.counters["targets.skipped.filtered"] == 2


class _Shared(torch.nn.Module):
    """One linear layer run twice (ALBERT runs its one layer at every depth), and another layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared, self.other = torch.nn.Linear(24, 24), torch.nn.Linear(24, 24)

    def forward(self, x):
        return self.other(self.shared(torch.relu(self.shared(x))))


def test_a_weight_run_twice_is_one_target_whose_factors_both_uses_read(mlp_data):
    model = _Shared().eval()
    gm, ctx = _run(model, mlp_data, budget=0.5, output_whiten=False)
    assert ctx.counters["targets.shared_uses"] == 2 and sorted(ctx.plan) == ["other", "shared"]
    # its Gram sums the inputs of both uses (forward hooks see every call), the decomposition is the
    # whitened SVD on that sum, and both uses read the same factor attributes: the tie holds
    grams = linear_grams(model, mlp_data)
    assert ctx.stats["shared"].rows == 2 * ctx.stats["other"].rows
    assert rel(ctx.stats["shared"].gram, grams["shared"]) < 1e-6
    got = plan_weights(ctx)
    rank = ctx.plan["shared"].rank
    assert rel(got["shared"], truncated(model.shared.weight, rank, grams["shared"])) < 1e-5
    factor_reads = [str(n.args[1].target) for n in gm.graph.nodes if n.target == aten.linear.default and "shared" in str(n.args[1].target)]
    assert len(factor_reads) == 4 and len(set(factor_reads)) == 2  # (B, A) twice, two attributes
    assert sum(p.numel() for p in gm.parameters()) == sum(ctx.plan[n].params_after for n in ctx.plan)
    x = _inputs(mlp_data)
    with torch.no_grad():
        assert rel(gm(x), substituted(model, got)(x)) < 1e-5
    # and compress() swaps the one module: the compressed model runs its factors at both depths
    result = tngraph.compress_with_result(model, calibration=mlp_data, budget=0.5, allocation="uniform", output_whiten=False, progress=False)
    with torch.no_grad():
        assert rel(result.module(x), substituted(model, got)(x)) < 1e-5


def test_a_weight_read_otherwise_too_is_left_alone(mlp_data):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(24, 24))

        def forward(self, x):  # a linear use and an elementwise one: factorizing would untie them
            return torch.nn.functional.linear(x, self.w) + x @ self.w.exp()

    gm, ctx = _run(Tied().eval(), mlp_data)
    assert ctx.counters["targets.skipped.shared_weight"] == 1 and not meta.targets(gm)


def test_a_parameter_tied_into_two_modules_is_no_module_target(mlp_data):
    """compress() swaps modules: swapping the owner would leave the other module reading the dense
    weight, so the tie is left alone there (torch.compile's graphs rewrite both uses)."""
    model = torch.nn.Sequential(torch.nn.Linear(24, 24, bias=False), torch.nn.Linear(24, 24, bias=False), torch.nn.Linear(24, 24)).eval()
    model[1].weight = model[0].weight
    result = tngraph.compress_with_result(model, calibration=mlp_data, budget=0.5, allocation="uniform", progress=False)
    assert result.context.counters["targets.skipped.tied_across_modules"] == 2 and sorted(result.context.plan) == ["2"]
    assert model[1].weight is model[0].weight and isinstance(result.module[0], torch.nn.Linear)


def test_addmm_with_a_constant_weight_is_a_target(mlp_data):
    class AddMM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(40, 24))
            self.b = torch.nn.Parameter(torch.randn(40))

        def forward(self, x):
            return torch.addmm(self.b, x, self.w.t())

    torch.manual_seed(0)
    model = AddMM().eval()
    gm, ctx = _run(model, mlp_data, budget=0.6)
    assert ctx.counters["lowrank_linear.applied"] == 1
    assert aten.addmm.default not in _ops(gm) and aten.t.default not in _ops(gm)
    gm.graph.lint()
    # the graph computes the (two-sided) whitened truncated SVD of w applied by hand, whose error on
    # the calibration inputs is within a few percent of the input-whitened optimum (~0.40 and ~0.39)
    x = _inputs(mlp_data)
    gram = x.double().T @ x.double()
    (plan,) = ctx.plan.values()
    left = output_factors(ctx, model).get("w")
    with torch.no_grad():
        ref, got = model(x), gm(x)
        reached = torch.addmm(model.b, x, truncated(model.w, plan.rank, gram, ctx.config.damping, left).t())
        best = torch.addmm(model.b, x, truncated(model.w, plan.rank, gram).t())
    assert rel(got, reached) < 1e-4
    assert rel(got, ref) <= 1.1 * rel(best, ref) + 1e-3


def test_nan_weights_are_refused(mlp, mlp_data):
    with torch.no_grad():
        mlp.layers[1].weight[3, 4] = float("nan")
    with pytest.raises(ModelError, match=r"layers\.1\.weight.*NaN.*pass 'targets'"):
        _run(mlp, mlp_data)


def test_failing_pass_is_named_with_its_predecessors_and_dumped(mlp, mlp_data, tmp_path):
    def explode(gm, ctx):
        raise RuntimeError("boom")

    with pytest.raises(PassError) as info:
        _run(mlp, mlp_data, passes=[targets, allocate, explode], dump_dir=str(tmp_path))
    text = str(info.value)
    assert "pass 'explode' (after: targets, allocate) failed: RuntimeError: boom" in text
    failed = tmp_path / "03_explode.failed"
    assert (failed / "graph.txt").is_file() and "boom" in (failed / "pass.json").read_text()


def test_dump_after_each_changing_pass(mlp, tmp_path):
    gm, _ = _run(mlp, [((torch.randn(4, 24),), {})], dump_dir=str(tmp_path))
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert (tmp_path / "index.html").is_file()
    # the sensitivity pass (03) changes nothing under uniform allocation, so it leaves no dump
    assert folders == ["00_captured", "01_targets", "02_calibrate", "03_fisher", "05_allocate", "06_factorize"]
    table = (tmp_path / "06_factorize" / "graph.txt").read_text()
    assert "plan=lowrank@" in table and "from=factorize" in table and "aten.linear.default" in table
    info = json.loads((tmp_path / "06_factorize" / "pass.json").read_text())
    assert info["counters"]["lowrank_linear.applied"] == 3


def test_unchanged_pass_writes_no_dump(mlp, tmp_path):
    _run(mlp, [], passes=[targets, calibrate], example=torch.randn(2, 24), dump_dir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["00_captured", "01_targets"]


def test_tt_format_rewrites_into_einsum_chains(mlp, mlp_data):
    gm, ctx = _run(mlp, mlp_data, budget=0.5, format="tt")
    gm.graph.lint()
    ops = _ops(gm)
    assert ops.count(aten.einsum.default) == 3 and aten.linear.default not in ops
    assert ctx.counters["network_linear.applied"] == 3 and ctx.counters["lowrank_linear.refused.other_format"] == 3
    assert not any(name.endswith(".weight") for name, _ in gm.named_parameters())
    for name, plan in ctx.plan.items():
        assert plan.params_after <= 0.5 * plan.params_before
    assert all("val" in n.meta for n in gm.graph.nodes if n.op == "call_function")
    einsum = next(n for n in gm.graph.nodes if n.target == aten.einsum.default)
    assert meta.info(einsum).provenance.role == "layer" and "val" in einsum.meta
    # on the calibration inputs: the graph is the whitened TT-SVD and refit applied by hand, which
    # is at least as close as the TT-SVD alone (~0.55 and ~0.76; a model that outputs zeros: 1.0)
    x = _inputs(mlp_data)
    reached, unrefitted = _network_by_hand(mlp, mlp_data, ctx)
    with torch.no_grad():
        got, ref = gm(x), mlp(x)
        assert rel(got, reached(x)) < 1e-4
        assert rel(got, ref) <= 1.05 * rel(unrefitted(x), ref) + 1e-3


def test_tt_graph_module_and_artifact_agree(mlp, mlp_data, tmp_path):
    result = tngraph.compress_with_result(mlp, calibration=mlp_data, config=Config(budget=0.4, format="tt", progress=False))
    x = torch.randn(5, 24)
    torch.testing.assert_close(result.graph(x), result.module(x), atol=1e-5, rtol=1e-5)
    assert isinstance(result.module.layers[0], tngraph.modules.NetworkLinear)
    out = tngraph.save(result.module, tmp_path / "tt")
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["targets"][0]["network"]["core_labels"] and recipe["targets"][0]["format"] == "tt"
    loaded = tngraph.load(out, model=type(mlp)())
    torch.testing.assert_close(loaded(x), result.module(x), atol=0, rtol=0)


def test_svd_is_an_alias_of_lowrank():
    assert Config(format="svd").format == "lowrank"


@pytest.mark.parametrize("fmt", ["tucker", "tt", "tr", "cp", "kron", "monarch"])
def test_every_network_format_through_the_pipeline(mlp, mlp_data, tmp_path, fmt):
    result = tngraph.compress_with_result(mlp, calibration=mlp_data, config=Config(budget=0.5, format=fmt, progress=False))
    gm, ctx = result.graph, result.context
    gm.graph.lint()
    ops = _ops(gm)
    # each layer is one fused tngraph::network op (tests/test_fuse.py checks it against the einsum)
    assert ops.count(torch.ops.tngraph.network.default) == 3 and aten.linear.default not in ops and aten.einsum.default not in ops
    assert ctx.counters["network_linear.applied"] == 3 and ctx.counters[f"factorize.{fmt}.whitened"] == 3
    # the budget holds for every target, whatever the format
    assert all(p.params_after <= 0.5 * p.params_before for p in ctx.plan.values())
    assert all(p.format == fmt and p.network["format"] == fmt for p in ctx.plan.values())
    x = torch.randn(6, 24)
    torch.testing.assert_close(gm(x), result.module(x), atol=1e-5, rtol=1e-5)
    # on the calibration inputs: the module is the format's whitened decomposition and refit applied
    # by hand, at least as close as the decomposition alone (a model that outputs zeros: 1.0)
    x = _inputs(mlp_data)
    reached, unrefitted = _network_by_hand(mlp, mlp_data, ctx)
    with torch.no_grad():
        got, ref = result.module(x), mlp(x)
        assert rel(got, reached(x)) < 1e-4
        assert rel(got, ref) <= 1.05 * rel(unrefitted(x), ref) + 1e-3
    out = tngraph.save(result.module, tmp_path / fmt)
    torch.testing.assert_close(tngraph.load(out, model=type(mlp)())(x), result.module(x), atol=0, rtol=0)


def test_refit_lowers_the_calibration_error_of_network_formats(mlp, mlp_data):
    x = torch.cat([args[0] for args, _ in mlp_data])
    errors = {}
    for refit in (False, True):
        result = tngraph.compress_with_result(mlp, calibration=mlp_data, config=Config(budget=0.4, format="tt", refit=refit, progress=False))
        first = result.module.layers[0]
        errors[refit] = (first(x) - mlp.layers[0](x)).norm().item()
    assert errors[True] <= errors[False] * (1 + 1e-6)


def test_budget_below_the_smallest_factorization_is_refused(mlp, mlp_data):
    with pytest.raises(ConfigError, match="too small for layers.0.*raise the budget"):
        tngraph.compress(mlp, calibration=mlp_data, config=Config(budget=0.01, format="tr", progress=False))


def test_cp_that_does_not_converge_names_the_layer(mlp, mlp_data):
    with pytest.raises(TngraphError, match="layers.0: CP-ALS .* did not converge") as info:
        tngraph.compress(mlp, calibration=mlp_data, config=Config(budget=0.5, format="cp", cp_max_iter=1, cp_tol=0.0, progress=False))
    assert "cp_max_iter" in info.value.fix


class _Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(64, 20)
        self.head = torch.nn.Linear(20, 6)

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_embedding_tables_become_a_low_rank_gather():
    model = _Tagger().eval()
    g = torch.Generator().manual_seed(3)
    # a skewed token distribution: ids below 8 make up most of the data
    data = [((torch.where(torch.rand(4, 10, generator=g) < 0.8, torch.randint(0, 8, (4, 10), generator=g), torch.randint(0, 64, (4, 10), generator=g)),), {}) for _ in range(6)]
    config = Config(budget=0.5, targets="linear,embedding", progress=False)
    assert config.targets == ("linear", "embedding")
    result = tngraph.compress_with_result(model, calibration=data, config=config)
    gm, ctx = result.graph, result.context
    gm.graph.lint()
    emb = [n for n in gm.graph.nodes if n.target == aten.embedding.default]
    assert len(emb) == 1 and emb[0].args[0].op == "get_attr" and "lowrank_a" in str(emb[0].args[0].target)
    assert aten.matmul.default in _ops(gm) and ctx.counters["lowrank_embedding.applied"] == 1
    assert ctx.counters["factorize.embedding.frequency_weighted"] == 1
    plan = ctx.plan["embed"]
    assert plan.kind == "embedding" and plan.params_after <= 0.5 * plan.params_before
    assert isinstance(result.module.embed, tngraph.modules.LowRankEmbedding)
    ids = data[0][0][0]
    torch.testing.assert_close(gm(ids), result.module(ids), atol=1e-5, rtol=1e-5)
    # frequency weighting keeps the frequent rows closer than a plain SVD of the table does
    plain = tngraph.compress(model, calibration=data, config=config.replace(whiten=False)).embed
    frequent = torch.arange(8)
    err = lambda m: (m(frequent) - model.embed(frequent)).norm()  # noqa: E731
    assert err(result.module.embed) < err(plain)
    loaded = tngraph.load(tngraph.save(result.module, Path(tempfile.mkdtemp()) / "emb"), model=_Tagger())
    torch.testing.assert_close(loaded(ids), result.module(ids), atol=0, rtol=0)


def test_embeddings_are_not_targets_by_default():
    model = _Tagger().eval()
    result = tngraph.compress_with_result(model, (torch.randint(0, 64, (2, 5)),), config=Config(budget=0.5, progress=False))
    assert list(result.context.plan) == ["head"]
