"""MLP blocks found in captured graphs (tngraph.passes.mlp) across Hugging Face architectures built tiny
from their configs, and the pruned block computing what the original computes with the dropped
neurons' down columns zeroed."""
import copy
import importlib.util
import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers")

import tngraph  # noqa: E402
from tngraph.capture import capture  # noqa: E402
from tngraph.lm import no_kv_cache  # noqa: E402
from tngraph.passes import PassContext, targets  # noqa: E402
from tngraph.passes.mlp import mlp_pairs, prune_pair_modules  # noqa: E402
from tngraph.pipeline import run_passes  # noqa: E402

_spec = importlib.util.spec_from_file_location("tngraph_zoo", pathlib.Path(__file__).parents[1] / "tools" / "zoo.py")
zoo = sys.modules.setdefault("tngraph_zoo", importlib.util.module_from_spec(_spec))
if not hasattr(zoo, "ARCHS"):
    _spec.loader.exec_module(zoo)


def _pairs(name):
    arch = zoo.ARCHS[name]
    model = arch.build()
    with no_kv_cache(model):
        gm = capture(model, zoo.batch(arch, 0))
    gm = run_passes(gm, PassContext(config=tngraph.Config(progress=False)), [targets], instruments=[])
    return arch, model, *mlp_pairs(gm)


# architecture: (ups of the first block, its elementwise ops); every one has one block per layer
BLOCKS = {
    "bert": (("encoder.layer.0.intermediate.dense",), ("gelu",)),
    "distilbert": (("transformer.layer.0.ffn.lin1",), ("gelu",)),
    "opt": (("model.decoder.layers.0.fc1",), ("relu",)),
    "llama": (("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"), ("silu", "mul")),
    "gemma": (("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"), ("gelu", "mul")),
    "t5_encoder": (("encoder.block.0.layer.1.DenseReluDense.wi",), ("relu", "dropout")),
    "clip_text": (("encoder.layers.0.mlp.fc1",), ("mul", "sigmoid", "mul")),
    "bloom": (("transformer.h.0.mlp.dense_h_to_4h",), ("mul", "mul", "mul", "mul", "add", "mul", "tanh", "add", "mul")),
    "vit": (("layers.0.mlp.fc1",), ("gelu",)),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_blocks_are_found_and_pruning_one_equals_zeroing_its_dropped_columns(name):
    arch, model, pairs, refused = _pairs(name)
    ups, ops = BLOCKS[name]
    assert len(pairs) == 2 and not refused
    assert pairs[0].ups == ups and pairs[0].ops == ops and pairs[0].gated == (len(ups) > 1)
    inputs = zoo.batch(arch, 1)
    g = torch.Generator().manual_seed(0)
    pruned, reference = copy.deepcopy(model), copy.deepcopy(model)
    for pair in pairs:
        keep = torch.randperm(pair.hidden, generator=g)[: pair.hidden // 2].sort().values
        prune_pair_modules(pruned, pair, keep)
        dropped = torch.ones(pair.hidden, dtype=torch.bool)
        dropped[keep] = False
        with torch.no_grad():
            reference.get_submodule(pair.down).weight[:, dropped] = 0
        assert pruned.get_submodule(pair.down).in_features == pair.hidden // 2
        assert all(pruned.get_submodule(u).out_features == pair.hidden // 2 for u in pair.ups)
    with torch.no_grad(), no_kv_cache(pruned, reference):
        got, want = zoo.first_output(pruned(**inputs)), zoo.first_output(reference(**inputs))
        changed = zoo.first_output(model(**inputs))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, changed, atol=1e-4)  # the pruning did change the model


def test_blocks_that_cannot_be_pruned_say_why():
    assert _pairs("gpt2")[2:] == ([], {"reshape": 2})  # Conv1D flattens rows around addmm
    assert _pairs("albert")[2:] == ([], {"shared_weight": 1})  # one layer's weights at every depth
    assert _pairs("resnet")[2:] == ([], {})  # no MLP block


def test_bad_neuron_sets_and_weights_are_refused():
    _, model, pairs, _ = _pairs("bert")
    pair = pairs[0]
    with pytest.raises(ValueError, match=r"distinct indices in \[0, 64\)"):
        prune_pair_modules(model, pair, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match=r"distinct indices in \[0, 64\)"):
        prune_pair_modules(model, pair, torch.tensor([64]))
    with pytest.raises(ValueError, match="down weight must be 32x2"):
        prune_pair_modules(model, pair, torch.tensor([0, 1]), torch.zeros(32, 3))
