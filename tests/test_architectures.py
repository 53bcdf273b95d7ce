"""Architectures beyond BERT and Llama, built tiny from their Hugging Face configs: GPT-2's Conv1D
layers are targets (their weight stored in x out), DistilBERT and OPT are captured from their own
forward's inputs (a BERT tokenizer's token_type_ids, which they do not take, left out)."""
import pytest
import torch

import tngraph
from tngraph.layers import LOWRANK
from tests.helpers_reference import plan_weights, substituted

transformers = pytest.importorskip("transformers")


def _gpt2(low_rank: int | None = None):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    if low_rank is not None:  # every Conv1D weight exactly of this rank: a factorization at that rank is exact
        with torch.no_grad():
            for module in model.modules():
                if type(module).__name__ == "Conv1D":
                    i, o = module.weight.shape
                    module.weight.copy_(torch.randn(i, low_rank) @ torch.randn(low_rank, o) / low_rank)
    return model


def _ids(n=4, length=12, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (2, length), generator=g)} for _ in range(n)]


def test_gpt2_conv1d_layers_are_targets_and_factorize_exactly_at_their_rank():
    model = _gpt2(low_rank=4)
    calibration = _ids()
    # the output head (tied to the token table, of full rank) is left out: tests below take it
    result = tngraph.compress_with_result(model, calibration=calibration, budget=0.5, heal_steps=0, progress=False,
                                          allocation="uniform", sensitivity="fisher", exclude=("lm_head",))
    targets = {t.name: t for t in (tngraph.meta.info(n).target for n in result.graph.graph.nodes) if t is not None}
    convs = {n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    planned = {n for n, p in result.context.plan.items() if p.format == "lowrank"}
    assert convs == set(result.context.plan) and planned and len(convs) == 8  # c_attn, c_proj, c_fc, c_proj per block
    assert all(t.transposed for t in targets.values() if t.name in convs)
    c_attn = model.get_submodule("transformer.h.0.attn.c_attn")
    assert (targets["transformer.h.0.attn.c_attn"].out_features, targets["transformer.h.0.attn.c_attn"].in_features) == (96, 32)
    assert c_attn.weight.shape == (32, 96)  # stored in x out
    # the graph holds the low-rank op in the Conv1D's place; the module swaps the Conv1D for its layer
    assert sum(1 for n in result.graph.graph.nodes if n.target == LOWRANK.op) == len(planned)
    swapped = result.module.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(swapped, tngraph.modules.LowRankLinear) and (swapped.out_features, swapped.in_features) == (96, 32)
    x = _ids(1, 9, seed=3)[0]
    with torch.no_grad():
        dense, compressed, graph = model(**x).logits, result.module(**x).logits, result.graph(**x).logits
    # exact weights of rank 4 at ranks of at least 4: the same model up to rounding
    assert min(p.rank for n, p in result.context.plan.items() if n in planned) >= 4
    torch.testing.assert_close(compressed, dense, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(graph, compressed, atol=1e-5, rtol=1e-5)


def test_gpt2_output_head_tied_to_the_token_table_is_compressed_once_and_the_tie_holds(tmp_path):
    """lm_head reads wte's weight: it is the target (named by the module that runs it as a linear),
    the table gathers rows of its factors (A[ids] @ B), in the graph, the module, the artifact (one
    copy of the factors) and ONNX; the output is the model with W' = A B in the tied Parameter."""
    import copy

    from safetensors.torch import load_file

    model = _gpt2()
    result = tngraph.compress_with_result(model, calibration=_ids(), budget=0.5, heal_steps=0, progress=False, allocation="uniform",
                                          include=(r"^lm_head$",))
    head = result.context.plan["lm_head"]
    assert head.tied == ("transformer.wte",) and result.context.counters["factorize.tied_lookups"] == 1
    module = result.module
    assert isinstance(module.transformer.wte, tngraph.modules.LowRankEmbedding) and module.transformer.wte.a is module.lm_head.a
    assert not any(n.target == torch.ops.aten.embedding.default and str(n.args[0].target).endswith("wte.weight")
                   for n in result.graph.graph.nodes)  # the graph gathers from A, and the dense table is gone
    assert sum(p.numel() for p in result.graph.parameters()) == sum(p.numel() for p in module.parameters())
    x = _ids(1, 9, seed=3)[0]
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        by_hand.lm_head.weight.copy_(head.factors["a"] @ head.factors["b"])  # wte reads the same Parameter
        expected = by_hand(**x).logits
        torch.testing.assert_close(module(**x).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result.graph(**x).logits, expected, atol=1e-5, rtol=1e-5)
    tngraph.save(module, tmp_path / "art")
    stored = load_file(tmp_path / "art" / "factors.safetensors")
    assert "lm_head.a" in stored and not any(k.startswith("transformer.wte") for k in stored)
    loaded = tngraph.load(tmp_path / "art", model=_gpt2())
    assert loaded.transformer.wte.a is loaded.lm_head.a
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, module(**x).logits)
    assert tngraph.export_onnx(loaded, x, tmp_path / "g.onnx").max_abs_diff < 1e-4
    # a format whose factors a table cannot gather leaves the tied head dense
    with pytest.raises(tngraph.ConfigError, match="no layer of the model is a target"):
        tngraph.compress(model, calibration=_ids(), budget=0.5, heal_steps=0, progress=False, format="tt", allocation="uniform",
                         include=(r"^lm_head$",))


def test_gpt2_artifact_round_trip(tmp_path):
    model = _gpt2()
    compressed = tngraph.compress(model, calibration=_ids(), budget=0.5, heal_steps=0, progress=False, allocation="uniform",
                                  sensitivity="fisher")
    tngraph.save(compressed, tmp_path / "art")
    loaded = tngraph.load(tmp_path / "art", model=_gpt2())
    x = _ids(1, 7, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, compressed(**x).logits)


@pytest.mark.parametrize("arch", ["distilbert", "opt"])
def test_models_that_take_no_token_type_ids_are_captured_from_a_bert_tokenizer(arch, minilm, sentences):
    tokenizer = minilm[1]
    torch.manual_seed(0)
    if arch == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                               max_position_embeddings=64)
        model = transformers.DistilBertModel(config).eval()
    else:
        config = transformers.OPTConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32)
        model = transformers.OPTModel(config).eval()
    texts = sentences.calibration[:16]
    assert "token_type_ids" in tokenizer(texts[:1])  # what the tokenizer writes and the model does not take
    result = tngraph.compress_with_result(model, calibration=texts, tokenizer=tokenizer, budget=0.5, heal_steps=0, progress=False,
                                          max_length=32, batch_size=8, sensitivity="fisher", allocation="uniform")
    assert result.context.plan and all("token_type_ids" not in kw for _, kw in result.context.calibration)
    enc = tokenizer(texts[:3], padding=True, return_tensors="pt")
    enc.pop("token_type_ids")
    with torch.no_grad():
        assert result.module(**enc).last_hidden_state.shape == model(**enc).last_hidden_state.shape


def test_gpt2_compiles_with_the_tngraph_backend():
    from tests.conftest import backend_spy

    model = _gpt2(low_rank=4)
    spy = backend_spy()
    compiled = torch.compile(model, backend=spy, options={"budget": 0.5, "calibration": _ids(), "sensitivity": "fisher",
                                                          "allocation": "uniform", "fallback": "eager"})
    x = _ids(1, 10, seed=7)[0]["input_ids"]
    with torch.no_grad():
        out, ref = compiled(input_ids=x).logits, model(input_ids=x).logits
    fused = [n for g in spy.graphs for n in g.graph.nodes if n.target == LOWRANK.op]
    assert len(fused) == 8  # every Conv1D (dynamo's torch.addmm) became the low-rank op
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_vit_compresses_from_pixel_tensors_and_the_command_line_names_the_route(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                                    patch_size=8)
    model = transformers.ViTModel(config).eval()
    g = torch.Generator().manual_seed(0)
    calibration = [{"pixel_values": torch.randn(4, 3, 32, 32, generator=g)} for _ in range(4)]
    result = tngraph.compress_with_result(model, calibration=calibration, budget=0.5, heal_steps=0, progress=False,
                                          sensitivity="fisher")
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}  # q, k, v, o, fc1, fc2, the pooler
    targets = {t.name for t in (tngraph.meta.info(n).target for n in result.graph.graph.nodes) if t is not None}
    assert targets == linears | {"embeddings.patch_embeddings.projection"} and len(linears) == 7  # and the patch conv
    assert result.context.plan
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        dense, compressed = model(pixel_values=x).last_hidden_state, result.module(pixel_values=x).last_hidden_state
    assert dense.shape == compressed.shape and float((dense - compressed).norm() / dense.norm()) < 0.5
    model.save_pretrained(tmp_path / "vit")
    from tngraph import workflow

    with pytest.raises(tngraph.TngraphError, match="has no tokenizer") as info:
        workflow.compress(str(tmp_path / "vit"), tmp_path / "out", heal_steps=0, evaluate=False)
    assert "--calibration" in info.value.fix and ".safetensors" in info.value.fix and not (tmp_path / "out").exists()


def test_albert_shared_layer_is_compressed_once_and_the_tie_survives(tmp_path):
    """ALBERT runs one layer at every depth: its linears are targets once (the Gram of every depth's
    inputs), every depth runs the same factors, in the graph, the module and the loaded artifact."""
    def build():
        torch.manual_seed(0)
        config = transformers.AlbertConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, embedding_size=16, max_position_embeddings=64)
        return transformers.AlbertModel(config).eval()

    model, calibration = build(), _ids(4, 10)
    result = tngraph.compress_with_result(model, calibration=calibration, budget=0.5, heal_steps=0, progress=False, allocation="uniform")
    layer = "encoder.albert_layer_groups.0.albert_layers.0"
    assert result.context.counters["targets.shared_uses"] == 3 * 6
    assert {f"{layer}.attention.query", f"{layer}.ffn", f"{layer}.ffn_output"} <= set(result.context.plan)
    # the graph runs a low-rank op at each of the 3 depths for each of the 6 shared linears, on one set of factors
    ops = [n for n in result.graph.graph.nodes if n.target == LOWRANK.op]
    assert sum(1 for n in ops if str(n.args[1][0].target).startswith(layer)) == 3 * 6
    assert sum(p.numel() for p in result.graph.parameters()) == sum(p.numel() for p in result.module.parameters())
    assert sum(p.numel() for p in result.module.parameters()) < 0.75 * sum(p.numel() for p in model.parameters())
    assert isinstance(result.module.get_submodule(f"{layer}.ffn"), tngraph.modules.LowRankLinear)
    x = _ids(1, 9, seed=3)[0]
    tngraph.save(result.module, tmp_path / "albert")
    loaded = tngraph.load(tmp_path / "albert", model=build())
    with torch.no_grad():
        dense, compressed = model(**x).last_hidden_state, result.module(**x).last_hidden_state
        assert torch.allclose(result.graph(**x).last_hidden_state, compressed, atol=1e-5)
        assert torch.equal(loaded(**x).last_hidden_state, compressed)
        # every depth runs the plan's one approximation W' = A B of each shared weight (random weights
        # are full rank, so W' itself is far from W: that is the budget's, not the tie's)
        by_hand = substituted(model, plan_weights(result.context))(**x).last_hidden_state
    assert float((compressed - by_hand).norm() / by_hand.norm()) < 1e-5
    assert float((compressed - dense).norm() / dense.norm()) < 1.0
