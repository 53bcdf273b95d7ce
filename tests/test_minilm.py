"""End to end on the real bundled all-MiniLM-L6-v2."""
import pytest
import torch

import tngraph
from tngraph.evaluate import agreement, count_params, sentence_embeddings
from tngraph.models import MINILM_INCLUDE, ModelSource, tokenize
from tngraph.modules import LowRankLinear

aten = torch.ops.aten


def _target_ratio(module, names, dense_model):
    return count_params(module, names)[0] / count_params(dense_model, names)[0]


def test_compressed_structure_and_budget(minilm, minilm_compressed):
    model, _ = minilm
    result = minilm_compressed
    names = [t["name"] for t in result.recipe["targets"]]  # the factorized ones; the budgeted default may keep a few dense
    encoder = tuple(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder."))
    assert len(encoder) == 36 and 30 <= len(names) <= 36 and set(names) <= set(encoder)
    assert all(isinstance(result.module.get_submodule(n), LowRankLinear) for n in names)
    assert all(isinstance(result.module.get_submodule(n), torch.nn.Linear) for n in set(encoder) - set(names))
    assert isinstance(result.module.pooler.dense, torch.nn.Linear)
    assert _target_ratio(result.module, encoder, model) <= 0.505
    result.graph.graph.lint()
    # each factorized target is one fused tngraph op; targets kept dense and the pooler stay linears
    linears = [n for n in result.graph.graph.nodes if n.target == aten.linear.default]
    fused = [n for n in result.graph.graph.nodes if n.target == torch.ops.tngraph.lowrank.default]
    assert len(fused) == len(names) and len(linears) == (36 - len(names)) + 1
    assert result.context.counters["lowrank_linear.applied"] == len(names)
    assert result.context.history == ["targets", "calibrate", "fisher", "sensitivity", "allocate", "factorize", "fuse"]


def test_graph_and_module_agree_and_keep_the_output_structure(minilm, minilm_compressed, sentences):
    _, tokenizer = minilm
    enc = tokenize(tokenizer, sentences.evaluation[:16], 128)
    with torch.no_grad():
        from_module = minilm_compressed.module(**enc)
        from_graph = minilm_compressed.graph(**enc)
    assert from_module.last_hidden_state.shape == (16, enc["input_ids"].shape[1], 384)
    assert from_module.pooler_output.shape == (16, 384)
    torch.testing.assert_close(from_graph.last_hidden_state, from_module.last_hidden_state, atol=1e-4, rtol=1e-4)


def test_budgeted_beats_uniform_whitened_and_plain_svd(minilm):
    from tngraph.data import sentence_sets

    model, tokenizer = minilm
    sets = sentence_sets(calibration=512, evaluation=200, seed=0)  # budgeted allocation needs data: 96 sentences are too few
    # every linear low rank: the allocations of the low-rank format compared (pruned blocks: test_mlp_prune, test_cli)
    config = tngraph.Config(budget=0.5, include=MINILM_INCLUDE, heal_steps=0, progress=False, mlp="lowrank")
    plain = tngraph.compress(model, example_inputs=tokenize(tokenizer, ["an example"], 16), config=config.replace(whiten=False, allocation="uniform"))
    uniform = tngraph.compress(model, calibration=sets.calibration, tokenizer=tokenizer, config=config.replace(allocation="uniform", output_whiten=False))
    budgeted = tngraph.compress_with_result(model, calibration=sets.calibration, tokenizer=tokenizer, config=config.replace(sensitivity="fisher"))
    names = tuple(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder."))
    assert _target_ratio(budgeted.module, names, model) <= 0.5
    ref = sentence_embeddings(model, tokenizer, sets.evaluation)
    ours = agreement(ref, sentence_embeddings(budgeted.module, tokenizer, sets.evaluation))
    white = agreement(ref, sentence_embeddings(uniform, tokenizer, sets.evaluation))
    base = agreement(ref, sentence_embeddings(plain, tokenizer, sets.evaluation))
    assert white.mean_cos > base.mean_cos + 0.2 and white.top10_overlap > base.top10_overlap
    # budgeted allocation over fisher-weighted decompositions cuts uniform whitened SVD's error by a
    # third (0.7985 -> 0.8841 here when written; the default "measured" does better, and more data too)
    assert 1 - ours.mean_cos < (1 - white.mean_cos) * 0.67
    assert ours.top10_overlap > white.top10_overlap


def test_save_load_round_trip_rebuilds_from_the_package(minilm, minilm_compressed, sentences, tmp_path):
    model, tokenizer = minilm
    out = tngraph.save(minilm_compressed.module, tmp_path / "art")
    loaded = tngraph.load(out)
    names = tuple(t["name"] for t in loaded.tngraph_recipe["targets"])
    assert _target_ratio(loaded, names, model) <= 0.505
    enc = tokenize(tokenizer, sentences.evaluation[:8], 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc).last_hidden_state, minilm_compressed.module(**enc).last_hidden_state, atol=0, rtol=0)


def test_two_runs_write_byte_identical_factors(minilm, sentences, tmp_path):
    """Same inputs, same bytes: two compressions (whitening, fisher, allocation, SVDs) of one model
    write identical factor files. A small BERT of MiniLM's shape family keeps this under seconds."""
    from tests.conftest import write_tiny_bert
    from transformers import AutoModel

    tokenizer = minilm[1]
    model = AutoModel.from_pretrained(write_tiny_bert(tmp_path / "bert", tokenizer)).eval()
    config = tngraph.Config(budget=0.5, include=MINILM_INCLUDE, sensitivity="fisher", heal_steps=0, progress=False)
    runs = [tngraph.compress(model, calibration=sentences.calibration, tokenizer=tokenizer, config=config) for _ in range(2)]
    a, b = (tngraph.save(run, tmp_path / name) for run, name in zip(runs, "ab"))
    assert (a / "factors.safetensors").read_bytes() == (b / "factors.safetensors").read_bytes()
    assert len(runs[0].tngraph_recipe["targets"]) >= 8  # most of the twelve linears are factorized


def test_text_calibration_needs_a_tokenizer(minilm):
    model, _ = minilm
    with pytest.raises(tngraph.DataError, match="need a tokenizer"):
        tngraph.compress(model, calibration=["some text here"])
    with pytest.raises(tngraph.DataError, match="empty"):
        tngraph.compress(model, calibration=[])


def test_embeddings_batched_by_length_keep_the_callers_order(minilm, sentences):
    model, tokenizer = minilm
    texts = sentences.evaluation[:40]
    texts = [texts[0] * 6] + texts[1:]  # one long text first: sorting must move it and put its row back
    rows = sentence_embeddings(model, tokenizer, texts, batch_size=8)
    with torch.no_grad():
        one_by_one = []
        for t in texts:
            enc = tokenize(tokenizer, [t], 128)
            hidden = model(**enc).last_hidden_state
            one_by_one.append(torch.nn.functional.normalize(hidden.mean(1), dim=-1)[0])
    assert rows.shape == (40, 384)
    torch.testing.assert_close(rows, torch.stack(one_by_one), atol=2e-5, rtol=0)
    with pytest.raises(tngraph.errors.DataError, match="no texts"):
        sentence_embeddings(model, tokenizer, [])
