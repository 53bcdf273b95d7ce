"""Config.mlp = "prune": the pipeline prunes every MLP block it finds by whole neurons (tngraph.passes.mlp,
tngraph.tn.prune) and allocates the other targets as usual; the result saves, loads, exports and
heals like any other (the torch.compile backend refuses the option by name)."""
import importlib.util
import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers")

import tngraph  # noqa: E402
from tngraph.errors import ConfigError  # noqa: E402
from tngraph.heal import trainable  # noqa: E402
from tngraph.modules import PrunedLinear  # noqa: E402

_spec = importlib.util.spec_from_file_location("tngraph_zoo", pathlib.Path(__file__).parents[1] / "tools" / "zoo.py")
zoo = sys.modules.setdefault("tngraph_zoo", importlib.util.module_from_spec(_spec))
if not hasattr(zoo, "ARCHS"):
    _spec.loader.exec_module(zoo)


def _compress(name, **options):
    arch = zoo.ARCHS[name]
    model = arch.build()
    calibration = [zoo.batch(arch, seed, rows=4) for seed in range(6)]
    return arch, model, tngraph.compress_with_result(model, calibration=calibration, heal_steps=0, progress=False, **options)


@pytest.mark.parametrize("name, ups, allocation", [("bert", 1, "uniform"), ("llama", 2, "budgeted")])
def test_blocks_are_pruned_within_the_budget_and_the_graph_runs_them(name, ups, allocation):
    arch, model, result = _compress(name, budget=0.5, mlp="prune", allocation=allocation)
    pruned = {n: m for n, m in result.module.named_modules() if isinstance(m, PrunedLinear)}
    assert len(pruned) == 2 * (ups + 1)  # two layers, each block's ups and down
    plans = result.context.plan
    for n, m in pruned.items():
        plan = plans[n]
        assert plan.format == "prune" and (m.out_features if m.side == "rows" else m.in_features) == plan.rank < 64
    blocks = result.context.analysis["mlp_pairs"]
    for down, pair in blocks.items():
        members = [plans[n] for n in (*pair.ups, down)]
        assert len({p.rank for p in members}) == 1
        if allocation == "uniform":  # each block keeps the budget; budgeted: the blocks and the rest share it
            assert sum(p.params_after for p in members) <= 0.5 * sum(p.params_before for p in members)
        assert torch.equal(pruned[down].index, pruned[pair.ups[0]].index)
    # the whole budget holds over every target, the pruned blocks and the low-rank rest (a target kept dense counts whole)
    def size(n):
        layer = model.get_submodule(n)
        return layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)

    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    dense = sum(size(n) for n in targets)
    kept = sum(p.params_after for p in plans.values()) + sum(size(n) for n in targets if n not in plans)
    assert kept <= 0.5 * dense * 1.001
    # the rewritten graph computes what the module does, and holds the pruned weights as plain linears
    result.graph.graph.lint()
    shapes = [tuple(node.args[1].meta["val"].shape) for node in result.graph.graph.nodes if node.target == torch.ops.aten.linear.default]
    assert sum(s[0] == plans[next(iter(blocks))].rank for s in shapes) >= ups
    if allocation == "budgeted":  # the curves' sweeps chose the neurons; factorize read them back without sweeping again
        assert result.context.counters["sensitivity.pruned_blocks"] == 2 and result.context.counters["factorize.prune.from_sweep"] == 2
    else:
        assert result.context.counters["factorize.prune.from_sweep"] == 0
    probe = zoo.batch(arch, 7)
    with torch.no_grad():
        out, graph_out = zoo.first_output(result.module(**probe)), zoo.first_output(result.graph(**probe))
    torch.testing.assert_close(graph_out, out, rtol=1e-4, atol=1e-5)
    # healing trains the pruned weights and biases like factors
    names = set(trainable(result.module))
    assert all(f"{n}.weight" in names for n in pruned)


def test_pruning_loses_less_than_dropping_neurons_unfitted():
    arch, model, result = _compress("bert", budget=0.5, mlp="prune", include=(r"\.(intermediate|output)\.dense$",))
    probe = zoo.batch(arch, 9, rows=8)
    with torch.no_grad():
        dense = zoo.first_output(model(**probe))
        ours = zoo.first_output(result.module(**probe))
        plain = model.__class__(model.config).eval()
        plain.load_state_dict(model.state_dict())
        for pair in result.context.analysis["mlp_pairs"].values():
            keep = result.module.get_submodule(pair.down).index
            dropped = torch.ones(pair.hidden, dtype=torch.bool)
            dropped[keep] = False
            plain.get_submodule(pair.down).weight[:, dropped] = 0
        unfitted = zoo.first_output(plain(**probe))
    err = float((ours - dense).norm() / dense.norm())
    assert err < float((unfitted - dense).norm() / dense.norm())


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_pruned_models_save_load_and_export(name, tmp_path):
    row = zoo.check(name, tmp_path, steps=("compress", "load", "onnx"), options={"mlp": "prune"})
    assert row.steps == {"compress": "ok", "load": "ok", "onnx": "ok"}, row.steps


def test_the_compile_backend_refuses_pruning_by_name():
    from tngraph.backend import parse_options

    with pytest.raises(ConfigError, match="mlp='prune' is not available through torch.compile yet"):
        parse_options({"mlp": "prune", "budget": 0.5})


def test_budget_one_prunes_nothing_and_gpt2_blocks_stay_low_rank():
    arch, model, result = _compress("bert", budget=1.0, mlp="prune")
    assert not any(isinstance(m, PrunedLinear) for m in result.module.modules())
    _, _, result = _compress("gpt2", budget=0.5, mlp="prune")
    assert result.context.counters["mlp.refused.reshape"] == 2 and not any(isinstance(m, PrunedLinear) for m in result.module.modules())


def test_what_pruning_cannot_take_is_refused_by_name():
    with pytest.raises(ConfigError, match="mlp='prune' does not combine with bits"):
        tngraph.Config(mlp="prune", bits=(8,))
    with pytest.raises(ConfigError, match="unknown mlp mode 'neurons'"):
        tngraph.Config(mlp="neurons")
    arch = zoo.ARCHS["bert"]
    with pytest.raises(ConfigError, match="mlp='prune' chooses neurons on calibration data"):
        tngraph.compress(arch.build(), zoo.batch(arch, 0), mlp="prune", heal_steps=0, progress=False)
    with pytest.raises(ConfigError, match="too small for the MLP block"):
        _compress("bert", budget=0.01, mlp="prune", allocation="uniform")
    with pytest.raises(ConfigError, match="below the cheapest factorization"):
        _compress("bert", budget=0.01, mlp="prune")
    with pytest.raises(ConfigError, match="mlp='prune' does not combine with refine"):
        tngraph.Config(mlp="prune", refine=2)


def test_a_byte_budget_counts_the_pruned_blocks_in_bytes():
    arch, model, result = _compress("bert", budget=0.5, mlp="prune", budget_kind="bytes")
    plans = result.context.plan
    assert result.context.counters["allocate.pruned_blocks"] == 2

    def size(n):
        layer = model.get_submodule(n)
        return 4 * (layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0))

    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    kept = sum(p.bytes_after() for p in plans.values()) + sum(size(n) for n in targets if n not in plans)
    assert kept <= 0.5 * sum(size(n) for n in targets) * 1.001


def test_auto_prunes_a_text_encoder_and_keeps_the_rest_low_rank(minilm, tmp_path):
    """mlp="auto" (the default) is made concrete before the passes and written to the recipe: a text
    encoder calibrated on texts prunes its blocks; tensor inputs, a causal LM, another format and
    the options pruning cannot take keep every linear low rank; the compile backend takes "auto"."""
    from tngraph.backend import parse_options
    from tngraph.blockwise import blockwise_config
    from tests.conftest import write_tiny_bert

    _, tokenizer = minilm
    assert tngraph.Config().mlp == "auto"
    texts = ["a short sentence about lists and tuples", "the dictionary maps keys to values", "open the file and read it"] * 8
    from transformers import BertModel

    encoder = BertModel.from_pretrained(write_tiny_bert(tmp_path, tokenizer)).eval()
    result = tngraph.compress_with_result(encoder, calibration=texts, tokenizer=tokenizer, budget=0.5, heal_steps=0, progress=False)
    assert result.recipe["config"]["mlp"] == "prune" and result.context.counters["allocate.pruned_blocks"] == 2
    assert sum(isinstance(m, PrunedLinear) for m in result.module.modules()) == 4
    for name, options in (("bert", {}), ("llama", {}), ("bert", {"format": "tt"})):  # tensor inputs; a causal LM; another format
        _, _, result = _compress(name, budget=0.5, **options)
        assert result.recipe["config"]["mlp"] == "lowrank" and not any(isinstance(m, PrunedLinear) for m in result.module.modules())
    config = tngraph.Config()
    assert config.resolve_mlp(True).mlp == "prune" and config.resolve_mlp(False).mlp == "lowrank"
    for options in ({"bits": (8,)}, {"whiten": False}, {"refine": 2}, {"mixture": ("tt",)}, {"mlp": "lowrank"}):
        assert tngraph.Config(**options).resolve_mlp(True).mlp == "lowrank", options
    assert tngraph.Config(mlp="prune").resolve_mlp(False).mlp == "prune"  # chosen by hand, kept
    assert parse_options({"budget": 0.5}).config.mlp == "lowrank" and blockwise_config().mlp == "lowrank"
