"""The torch.compile backend: torch.compile(model, backend="tngraph", options=...)."""
import subprocess
import sys

import pytest
import torch

import tngraph
from tngraph import backend
from tngraph.errors import ConfigError, DataError
from tests.conftest import MLP, backend_spy
from tests.helpers_reference import by_hand, graph_ranks, linear_grams, truncated

aten = torch.ops.aten


@pytest.fixture(autouse=True)
def fresh():
    torch._dynamo.reset()
    backend.clear_cache()
    yield
    torch._dynamo.reset()


def _data(n=4, rows=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 24, generator=g) for _ in range(n)]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _reached(model, gm, data, x):
    """The relative output error on x of the truncated, input-whitened SVD applied by hand at the
    ranks of the rewritten graph `gm` (whose parameter paths are the model's): what the backend's
    decomposition (whitened on both sides, the best for the model's output) must at least reach."""
    reference = by_hand(model, graph_ranks(gm), linear_grams(model, data) if data else None)
    with torch.no_grad():
        return _rel(reference(x), model(x))


def _compiled(model, fallback="eager", **options):
    return torch.compile(model, backend="tngraph", options={"budget": 0.6, "fallback": fallback, **options})


def test_the_backend_is_found_by_name_without_importing_tngraph():
    code = ("import sys, torch\n"
            "m = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16))\n"
            "assert 'tngraph' not in sys.modules\n"
            "c = torch.compile(m, backend='tngraph', options={'budget': 0.6, 'fallback': 'eager'})\n"
            "y = c(torch.randn(5, 24))\n"
            "assert 'tngraph' in sys.modules and y.shape == (5, 16)\n"
            "from torch._dynamo import list_backends\n"
            "assert 'tngraph' in list_backends()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_options_are_config_keys_and_unknown_ones_list_the_valid_ones():
    opts = backend.parse_options({"budget": 0.4, "format": "tt", "fallback": "eager"})
    assert opts.config.budget == 0.4 and opts.config.format == "tt" and opts.fallback == "eager"
    assert opts.config.heal_steps == 0 and not opts.config.progress
    with pytest.raises(ConfigError, match="unknown tngraph backend option 'budgett'") as info:
        backend.parse_options({"budgett": 0.5})
    assert "budget" in str(info.value) and "calibration" in str(info.value) and "fallback" in str(info.value)
    with pytest.raises(ConfigError, match="budget"):
        backend.parse_options({"budget": 7})
    with pytest.raises(ConfigError, match="fallback"):
        backend.parse_options({"fallback": "tensorrt"})
    with pytest.raises(ConfigError, match="does not heal"):
        backend.parse_options({"heal_steps": 100})
    for option, value in (("heal_lr", 1e-4), ("heal_scope", "blocks"), ("heal_device", "cpu")):  # nothing to set: refused by name
        with pytest.raises(ConfigError, match=f"does not heal.*'{option}'"):
            backend.parse_options({option: value})
    assert backend.parse_options({"heal_steps": 0}).config.heal_steps == 0
    with pytest.raises(DataError, match="list of samples"):
        backend.parse_options({"calibration": "some text"})


def test_a_bad_option_fails_the_compile_with_the_message():
    compiled = torch.compile(MLP().eval(), backend="tngraph", options={"rank": 3})
    with pytest.raises(Exception, match="unknown tngraph backend option 'rank'"):
        compiled(torch.randn(2, 24))


@pytest.mark.parametrize("fallback", ["eager", "inductor"])
def test_compiled_mlp_is_factorized_and_agrees_like_compress(fallback):
    model, data = MLP().eval(), _data()
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(9))
    spy = backend_spy()
    compiled = torch.compile(model, backend=spy, options={"budget": 0.6, "fallback": fallback, "calibration": data})
    with torch.no_grad():
        ref, got = model(x), compiled(x)
    compressed = tngraph.compress(model, calibration=data, config=tngraph.Config(budget=0.6, heal_steps=0, progress=False))
    with torch.no_grad():
        theirs = compressed(x)
    assert backend.stats["graphs"] == 1 and backend.stats["data_free"] == 0
    assert _rel(got, ref) <= _rel(theirs, ref) * 1.01 + 1e-6
    # compressed, not broken: as close as the same decomposition applied by hand at the ranks it chose
    # (~0.30 <= ~0.38; a model that outputs zeros is at 1.0)
    (gm,) = spy.graphs
    assert graph_ranks(gm) and _rel(got, ref) <= 1.05 * _reached(model, gm, data, x) + 1e-3


def test_the_rewritten_graph_holds_factor_chains_instead_of_the_dense_weights():
    # without output whitening the decompositions are the input-whitened truncated SVDs, which the
    # test applies by hand below
    model = MLP().eval()
    compiled = _compiled(model, calibration=_data(), output_whiten=False)
    spy = backend_spy()
    graphs = spy.graphs

    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(4))  # 4 rows: the calibration's 128 fill whole batches
    with torch.no_grad():
        spied = torch.compile(model, backend=spy, options={"budget": 0.6, "fallback": "eager", "calibration": _data(),
                                                           "output_whiten": False})(x)
    (gm,) = graphs
    gm.graph.lint()
    attrs = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    linears = [n for n in gm.graph.nodes if n.target == aten.linear.default]
    fused = [n for n in gm.graph.nodes if n.target == torch.ops.tngraph.lowrank.default]
    # parameters lifted to attributes named by module path; factors beside them, dense weights gone
    assert {"layers.0.bias", "layers.1.bias", "layers.2.bias"} <= attrs
    factorized = {i for i in range(3) if f"layers.{i}.weight_lowrank_a" in attrs}
    assert factorized and all((f"layers.{i}.weight" in attrs) == (i not in factorized) for i in range(3))
    assert len(fused) == len(factorized) and len(linears) == 3 - len(factorized)  # eager keeps the fused ops
    assert all(n.op != "placeholder" or n.name == "x" for n in gm.graph.nodes)
    # what the user compiled runs this graph (a new compile of the model: its decompositions from the
    # cache), and the graph computes the whitened truncated SVD applied by hand at its ranks, so its
    # error is what that decomposition reaches (~0.38; a model that outputs zeros: 1.0)
    torch._dynamo.reset()
    with torch.no_grad():
        got, (graph_out,) = compiled(x), gm(x)  # a dynamo graph returns a tuple
    assert backend.stats["cache_hits"] == 1
    torch.testing.assert_close(got, spied, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, graph_out, atol=1e-6, rtol=1e-6)
    reference = by_hand(model, graph_ranks(gm), linear_grams(model, _data()))
    x = torch.randn(256, 24, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert graph_ranks(gm) and _rel(gm(x)[0], reference(x)) < 1e-4


def test_decompositions_are_cached_across_recompiles_and_compiles():
    model, data = MLP().eval(), _data()
    compiled = _compiled(model, calibration=data)
    with torch.no_grad():
        first = compiled(torch.randn(8, 24))
    assert backend.stats["cache_misses"] == 1
    torch._dynamo.reset()  # a new compile of the same model: every weight is known
    again = _compiled(model, calibration=data)
    with torch.no_grad():
        x = torch.randn(8, 24)
        assert torch.equal(again(x), compiled(x))
    assert backend.stats["cache_hits"] >= 1 and backend.stats["cache_misses"] == 1
    assert first.shape == (8, 16)
    with torch.no_grad():
        model.layers[0].weight.add_(1.0)  # new content: decomposed again
    torch._dynamo.reset()
    with torch.no_grad():
        _compiled(model, calibration=data)(torch.randn(8, 24))
    assert backend.stats["cache_misses"] == 2


def test_dynamic_shapes_and_few_recompiles():
    model = MLP().eval()
    compiled = _compiled(model, calibration=_data())
    with torch.no_grad():
        for rows in (8, 5, 17, 1, 33, 2):
            x = torch.randn(rows, 24)
            torch.testing.assert_close(compiled(x), compiled(x))
            assert compiled(x).shape == (rows, 16)
    assert backend.stats["graphs"] <= 3  # static, then dynamic, then the size-1 specialisation
    assert backend.stats["cache_misses"] == 1


class Broken(torch.nn.Module):
    """Two linear stages with a graph break between them."""

    def __init__(self):
        super().__init__()
        self.first, self.second = MLP(), MLP(dims=(16, 32, 24), seed=1)

    def forward(self, x):
        y = self.first(x)
        torch._dynamo.graph_break()
        return self.second(y)


def test_graph_breaks_each_graph_is_compressed_and_the_second_is_data_free(caplog):
    model = Broken().eval()
    spy = backend_spy()
    compiled = torch.compile(model, backend=spy, options={"budget": 0.6, "fallback": "eager", "calibration": _data()})
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), caplog.at_level("WARNING", logger="tngraph.backend"):
        got, ref = compiled(x), model(x)
    assert backend.stats["graphs"] == 2 and backend.stats["data_free"] == 1
    assert "graph break" in caplog.text
    # the first graph whitened on the calibration data, the second plain truncated SVDs: as close as
    # those applied by hand at the same ranks (~0.36 <= ~0.38; a model that outputs zeros is at 1.0)
    first, second = spy.graphs
    assert graph_ranks(first) and graph_ranks(second)
    reference = Broken().eval()
    reference.first = by_hand(model.first, {k.removeprefix("first."): r for k, r in graph_ranks(first).items()},
                              linear_grams(model.first, _data()))
    reference.second = by_hand(model.second, {k.removeprefix("second."): r for k, r in graph_ranks(second).items()})
    with torch.no_grad():
        reached = _rel(reference(x), ref)
    assert got.shape == ref.shape and _rel(got, ref) <= 1.05 * reached + 1e-3
    # data-free, the second graph's factors are exactly the plain truncated SVDs
    for name, rank in graph_ranks(second).items():
        a, b = (second.get_parameter(f"{name}.weight_lowrank_{f}") for f in "ab")
        torch.testing.assert_close(a @ b, truncated(model.get_submodule(name).weight, rank), atol=1e-5, rtol=1e-4)


def test_data_free_without_calibration_says_so_once(caplog):
    backend._say_once.cache_clear()
    model = MLP().eval()
    with torch.no_grad(), caplog.at_level("WARNING", logger="tngraph.backend"):
        torch.compile(model, backend="tngraph", options={"budget": 0.6, "fallback": "eager"})(torch.randn(4, 24))
        torch.compile(MLP(seed=3).eval(), backend="tngraph", options={"budget": 0.6, "fallback": "eager"})(torch.randn(4, 24))
    assert caplog.text.count("decomposing data-free") == 1


def test_calibration_of_another_structure_is_refused():
    model = MLP().eval()
    compiled = _compiled(model, calibration=[(torch.randn(4, 24), torch.randn(3))])
    with pytest.raises(Exception, match=r"calibration samples do not fit the compiled function forward\(\)"):
        with torch.no_grad():
            compiled(torch.randn(4, 24))


def test_minilm_with_texts(minilm):
    """Texts are tokenized with the model's own tokenizer and bound to the graph's inputs; the
    embeddings agree with the original as well as tngraph.compress's; with dynamic=True, varying
    batch sizes and lengths recompile once (for batch size 1), from the cache."""
    from tngraph.data import sentence_sets
    from tngraph.evaluate import agreement, sentence_embeddings

    model, tokenizer = minilm
    sets = sentence_sets(calibration=32, evaluation=40)
    options = {"budget": 0.7, "allocation": "uniform", "include": (r"encoder\.",)}
    compiled = torch.compile(model, backend="tngraph", dynamic=True, options={**options, "calibration": sets.calibration, "fallback": "eager"})
    with torch.no_grad():
        ref = sentence_embeddings(model, tokenizer, sets.evaluation, batch_size=16)
        got = sentence_embeddings(compiled, tokenizer, sets.evaluation, batch_size=16)
        for rows, words in ((3, 5), (1, 9), (7, 30)):  # other batch sizes and lengths: at most two recompiles
            enc = tokenizer(["word " * words] * rows, return_tensors="pt")
            assert compiled(**enc).last_hidden_state.shape == (rows, enc["input_ids"].shape[1], 384)
    compressed = tngraph.compress(model, calibration=sets.calibration, tokenizer=tokenizer, heal_steps=0, progress=False, **options)
    with torch.no_grad():
        theirs = sentence_embeddings(compressed, tokenizer, sets.evaluation, batch_size=16)
    assert backend.stats["data_free"] == 0 and backend.stats["graphs"] <= 2 and backend.stats["cache_misses"] == 1
    assert agreement(ref, got).mean_cos >= agreement(ref, theirs).mean_cos - 0.01


def test_a_parameter_tied_into_two_modules_is_rewritten_at_both_uses_on_one_set_of_factors():
    """compress() leaves such a tie alone (it swaps modules); the backend's graph rewrites both uses,
    and both read the same factor attributes: the compiled model is the original with W' = A B in
    both places."""
    import copy

    from tngraph.layers import LOWRANK

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 24, bias=False), torch.nn.ReLU(), torch.nn.Linear(24, 24, bias=False),
                                torch.nn.Linear(24, 24)).eval()
    model[2].weight = model[0].weight
    spy = backend_spy()
    data = [(torch.randn(16, 24),) for _ in range(4)]
    compiled = torch.compile(model, backend=spy, options={"budget": 0.5, "calibration": data, "allocation": "uniform", "fallback": "eager"})
    x = torch.randn(16, 24)
    with torch.no_grad():
        out = compiled(x)
    (graph,) = spy.graphs
    reads = [tuple(str(f.target) for f in n.args[1]) for n in graph.graph.nodes if n.target == LOWRANK.op]
    assert len(reads) == 3 and reads[0] == reads[1] != reads[2]
    a, b = (graph.get_parameter(name) for name in reads[0])
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        by_hand[0].weight.copy_(a @ b)  # the tie holds in the copy: [2] reads it too
        c, d = (graph.get_parameter(name) for name in reads[2])
        by_hand[3].weight.copy_(c @ d)
        assert by_hand[2].weight is by_hand[0].weight
        torch.testing.assert_close(out, by_hand(x), atol=1e-5, rtol=1e-5)


def test_the_text_objective_pools_hidden_states_and_keeps_logits_whole():
    """With calibration texts the backend compares a target's effect on the pooled sentence
    embedding of a (batch, tokens, width) first output, but a language model's logits (as wide as the
    tokenizer's vocabulary) count whole, as tngraph.compress counts a causal LM's."""
    import types

    from tngraph.evaluate import pooled

    lifted = types.SimpleNamespace(names=["input_ids", "attention_mask"])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    hidden, logits = torch.randn(2, 3, 8), torch.randn(2, 3, 50)
    objective = backend._objective(lifted, True, 50)
    torch.testing.assert_close(objective((hidden,), (), {"attention_mask": mask}), pooled(hidden, mask))
    assert objective((logits,), (), {"attention_mask": mask})[0] is logits
    assert backend._objective(lifted, False, 50) is None
    assert backend._vocabulary(types.SimpleNamespace(vocab_size=7)) == 7 and backend._vocabulary(None) is None
