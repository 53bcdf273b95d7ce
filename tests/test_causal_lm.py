"""Causal LMs end to end: the trained tiny LM, perplexity, the whole-graph pipeline with healing,
`tngraph eval`, and speculative decoding with the compressed model as the draft."""
import copy
import json
import math

import pytest
import torch

import tngraph
from tngraph import lm, speculative, tinylm
from tngraph.cli import main
from tngraph.data import lm_documents
from tngraph.errors import ConfigError, DataError, ModelError


@pytest.fixture(scope="module")
def loaded(tiny_lm):
    model, tokenizer, recipe = lm.load(tiny_lm[0])
    assert recipe is None
    return model, tokenizer


@pytest.fixture(scope="module")
def compressed(tiny_lm, tmp_path_factory):
    """The command line's whole-graph pipeline at budget 0.5, with healing (uniform ranks and few
    samples, to stay fast)."""
    out = tmp_path_factory.mktemp("lm-art") / "art"
    rc = main(["compress", "--model", str(tiny_lm[0]), "--out", str(out), "--budget", "0.5", "--allocation", "uniform",
               "--calibration-samples", "64", "--heal-steps", "40", "--heal-lr", "1e-3", "--quiet"])
    assert rc == 0
    return out


def _prompts(tokenizer, n, length=16):
    docs = [ids for ids in tokenizer(lm_documents().heldout)["input_ids"] if len(ids) >= length]
    return torch.tensor([d[:length] for d in docs[:n]])


def test_tiny_lm_learns_from_the_training_text_and_is_a_hugging_face_folder(tiny_lm, loaded):
    folder, meta = tiny_lm
    model, tokenizer = loaded
    for name in ("config.json", "model.safetensors", "tokenizer.json", tinylm.META):
        assert (folder / name).is_file(), name
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    assert tokenizer.vocab_size == 512 and tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2
    # uniform guessing over 512 tokens is perplexity 512; the trained model is far better on unseen documents
    assert meta["steps_done"] == 200 and not meta["cut_by_minutes"] and meta["heldout_perplexity"] < 120
    assert meta["final_loss"] < math.log(512) - 1.5


def test_training_is_deterministic(tmp_path):
    spec = tinylm.spec_for("test", steps=5, vocab=300)
    tinylm.train(spec, tmp_path / "a", show=False)
    tinylm.train(spec, tmp_path / "b", show=False)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    other = tinylm.train(tinylm.spec_for("test", steps=5, vocab=300, seed=1), tmp_path / "c", show=False)
    assert (tmp_path / "c" / "model.safetensors").read_bytes() != (tmp_path / "a" / "model.safetensors").read_bytes()
    assert other["steps_done"] == 5
    with pytest.raises(tngraph.ArtifactError, match="already exists"):
        tinylm.train(spec, tmp_path / "a", show=False)
    with pytest.raises(ConfigError, match="unknown tiny-LM preset"):
        tinylm.spec_for("huge")


def test_held_out_documents_are_never_training_documents():
    text = lm_documents()
    assert len(text.heldout) >= 50 and len(text.train) > 10 * len(text.heldout)
    assert not set(text.heldout) & set(text.train)
    assert lm_documents() == text  # the same split every time


def test_perplexity_scores_every_token_once_and_matches_the_loss(loaded):
    model, tokenizer = loaded
    text = lm_documents().heldout[0] * 3
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    strided = lm.perplexity(model, tokenizer, text, window=32, stride=8)
    sparse = lm.perplexity(model, tokenizer, text, window=32, stride=31)
    assert strided.tokens == sparse.tokens == n - 1  # each token after the first, exactly once
    assert strided.perplexity < sparse.perplexity  # more context per scored token
    # one window over the whole text: exp of the model's own mean next-token loss
    head = tokenizer.decode(ids[0, 1:40])
    one = lm.perplexity(model, tokenizer, head, window=len(tokenizer(head)["input_ids"]))
    piece = tokenizer(head, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = float(model(input_ids=piece, labels=piece).loss)
    assert one.windows == 1 and one.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
    with pytest.raises(DataError, match="fewer than one window"):
        lm.perplexity(model, tokenizer, "too short", window=32)
    with pytest.raises(DataError, match="stride in"):
        lm.perplexity(model, tokenizer, text, window=32, stride=32)


def test_folders_that_are_not_causal_lms_are_refused(tmp_path, capsys):
    from tngraph.models import minilm_path

    with pytest.raises(ModelError, match="not a causal LM"):
        lm.load(minilm_path())
    with pytest.raises(ModelError, match="sentence encoder"):
        lm.load("minilm")
    with pytest.raises(ModelError, match="neither a Hugging Face model folder nor a tngraph artifact"):
        lm.load(tmp_path)
    assert main(["eval", "--model", minilm_path(), "--quiet"]) == 2
    assert "is not a causal LM" in capsys.readouterr().err


def test_whole_graph_pipeline_heals_and_reports_perplexity(tiny_lm, compressed):
    report = json.loads((compressed / "report.json").read_text())
    recipe = json.loads((compressed / "recipe.json").read_text())
    assert recipe.get("layout") != "causal-lm-blockwise" and recipe["heal"]["metric"] == "KL"
    names = [t["name"] for t in recipe["targets"]]
    assert len(names) == 14 and all(n.startswith("model.layers.") for n in names)  # head and embeddings stay dense
    assert abs(report["params"]["targets_kept"] - 0.5) < 0.02
    ppl = report["perplexity"]
    dense, healed, unhealed = (ppl[k]["perplexity"] for k in ("dense", "compressed", "unhealed"))
    assert ppl["dense"]["tokens"] == ppl["compressed"]["tokens"] > 20_000
    assert healed <= unhealed and healed < 1.5 * dense
    assert ppl["plain_svd"]["perplexity"] > healed  # whitening and healing beat plain SVD
    model = tngraph.load(compressed)
    assert model.config.use_cache  # generation gets its KV cache back


def test_eval_command_scores_dense_models_and_artifacts(tiny_lm, compressed, tmp_path, capsys, monkeypatch):
    import transformers

    loads = []
    from_pretrained = transformers.AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a[0]) or from_pretrained(cls, *a, **k)))
    assert main(["eval", "--model", str(compressed), "--json", "--quiet"]) == 0
    assert len(loads) == 1  # the source is read once: scored dense, then compressed in place and scored again
    out = json.loads(capsys.readouterr().out)
    report = json.loads((compressed / "report.json").read_text())["perplexity"]
    assert out["perplexity"] == pytest.approx(report["compressed"]["perplexity"], rel=1e-4)
    assert out["source"]["perplexity"] == pytest.approx(report["dense"]["perplexity"], rel=1e-4)
    # the out-of-domain documents beside them, the same numbers as the compress report's
    outside = json.loads((compressed / "report.json").read_text())["perplexity_outside"]
    assert out["outside"]["perplexity"] == pytest.approx(outside["compressed"]["perplexity"], rel=1e-4)
    assert out["outside"]["source"]["perplexity"] == pytest.approx(outside["dense"]["perplexity"], rel=1e-4)
    text = tmp_path / "held.txt"
    text.write_text("\n\n".join(lm_documents().heldout[:5]))
    assert main(["eval", "--model", str(tiny_lm[0]), "--text", str(text), "--window", "32", "--quiet"]) == 0
    assert "perplexity" in capsys.readouterr().out
    short = tmp_path / "short.txt"
    short.write_text("A few words.")
    assert main(["eval", "--model", str(tiny_lm[0]), "--text", str(short), "--quiet"]) == 2
    assert "fewer than one window" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_lm[0]), "--text", str(tmp_path / "missing.txt"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_of_a_blockwise_artifact_scores_it_next_to_its_source(tiny_lm, tmp_path, capsys):
    art = tmp_path / "blockwise"
    assert main(["compress", "--model", str(tiny_lm[0]), "--blockwise", "--budget", "0.6", "--out", str(art), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(art), "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    dense = out["source"]
    assert out["tokens"] == dense["tokens"] > 20_000 and out["window"] == dense["window"]
    assert dense["perplexity"] < out["perplexity"] < 3 * dense["perplexity"]
    assert out["source"]["ratio"] == pytest.approx(out["perplexity"] / dense["perplexity"])


def test_compressed_model_drafts_for_the_dense_model_in_transformers_generate(loaded, compressed):
    dense, tokenizer = loaded
    draft = tngraph.load(compressed)
    ids = _prompts(tokenizer, 1)
    greedy = dict(do_sample=False, max_new_tokens=24, eos_token_id=None, pad_token_id=0)
    ref = dense.generate(ids, attention_mask=torch.ones_like(ids), **greedy)
    assisted = dense.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=draft, **greedy)
    assert torch.equal(assisted, ref)


def _noisy(model, scale):
    other = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            if p.dim() == 2:
                p.add_(scale * torch.randn_like(p))
    return other


@pytest.mark.parametrize("scale", [0.0, 0.02, 0.3])
def test_batched_speculative_decoding_reproduces_dense_greedy_output(loaded, scale):
    dense, tokenizer = loaded
    draft = _noisy(dense, scale)  # 0: every draft accepted; 0.3: almost none
    ids = _prompts(tokenizer, 6)
    greedy = dict(do_sample=False, max_new_tokens=30, pad_token_id=0)
    ref = dense.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=None, **greedy)
    out, stats = speculative.generate(dense, draft, ids, max_new_tokens=30, draft_tokens=4)
    assert torch.equal(out, ref)
    assert stats.new_tokens == 30 and stats.target_calls <= 30
    if scale == 0.0:
        assert stats.acceptance_rate == 1.0 and stats.target_calls < 10
    # left-padded prompts of different lengths
    enc = tokenizer([d[: 20 * (i + 1)] for i, d in enumerate(lm_documents().heldout[:4])], return_tensors="pt", padding=True,
                    padding_side="left")
    assert len(set(enc["attention_mask"].sum(1).tolist())) > 1
    ref = dense.generate(**enc, eos_token_id=None, **greedy)
    out, _ = speculative.generate(dense, draft, enc["input_ids"], enc["attention_mask"], max_new_tokens=30, draft_tokens=3)
    assert torch.equal(out, ref)
    # an end-of-sequence token that some rows produce: they end, padded after it, as generate() does
    plain = dense.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=None, **greedy)
    eos = int(plain[0, ids.shape[1] + 5])
    ref = dense.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=eos, **greedy)
    out, _ = speculative.generate(dense, draft, ids, max_new_tokens=30, draft_tokens=4, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)
    one = ids[:1]
    ref = dense.generate(one, attention_mask=torch.ones_like(one), eos_token_id=eos, **greedy)
    out, _ = speculative.generate(dense, draft, one, max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref) and out.shape[1] < one.shape[1] + 30  # every row ended: shorter output


def test_speculative_decoding_refuses_bad_arguments(loaded):
    dense, tokenizer = loaded
    ids = _prompts(tokenizer, 1)
    with pytest.raises(ConfigError, match="at least 1"):
        speculative.generate(dense, dense, ids, max_new_tokens=0)
    with pytest.raises(ConfigError, match="batch, length"):
        speculative.generate(dense, dense, ids[0])
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ConfigError, match="vocabulary"):
        speculative.generate(dense, other, ids)


def test_generation_benchmark_runs_and_checks_outputs(tiny_lm, compressed, tmp_path, capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "tools" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--model", str(tiny_lm[0]), "--draft", str(compressed), "--batch", "1,2", "--new-tokens", "8",
                       "--prompt-tokens", "8", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["batch"], r["method"]) for r in rows} >= {(1, "dense"), (1, "tngraph"), (1, "hf-assisted"), (2, "tngraph")}
    assert all(r["identical_to_dense"] for r in rows if r["method"] in ("tngraph", "hf-assisted"))


def test_heal_command_heals_a_causal_lm_artifact_and_reports_perplexity(compressed, tmp_path, capsys):
    out = tmp_path / "healed"
    assert main(["heal", str(compressed), "--out", str(out), "--steps", "10", "--lr", "1e-3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity on" in printed and "dense" in printed and "tokens of other domain: package docs" in printed
    report = json.loads((out / "heal.json").read_text())
    assert report["heal"]["metric"] == "KL" and report["perplexity"]["after"]["perplexity"] > 0
    inside, outside = report["perplexity"], report["perplexity_outside"]
    assert outside["dense"]["perplexity"] > inside["dense"]["perplexity"]  # text the tiny LM was not trained on
    assert abs(outside["after"]["tokens"] - inside["after"]["tokens"]) < 0.5 * inside["after"]["tokens"]
    assert tngraph.load(out).tngraph_recipe["heal"]["steps"] >= json.loads((compressed / "recipe.json").read_text())["heal"]["steps"]
    assert report["heal"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    # a device the machine lacks, or none at all: refused by name, nothing written
    for device, says in [("tpu", "unknown heal_device 'tpu'")] + [("cuda", "heal device 'cuda' is not on this machine")] * (not torch.cuda.is_available()):
        assert main(["heal", str(compressed), "--out", str(tmp_path / device), "--steps", "2", "--device", device, "--quiet"]) == 2
        assert says in capsys.readouterr().err and not (tmp_path / device).exists()


def test_blockwise_is_chosen_by_flag_for_a_small_model(tiny_lm, tmp_path, capsys):
    out = tmp_path / "bw"
    assert main(["compress", "--model", str(tiny_lm[0]), "--out", str(out), "--blockwise", "--calibration-samples", "4", "--quiet"]) == 0
    assert "block by block" in capsys.readouterr().out
    assert json.loads((out / "recipe.json").read_text())["layout"] == "causal-lm-blockwise"
    assert main(["heal", str(out), "--steps", "5", "--quiet"]) == 2
    assert "cannot be healed afterwards" in capsys.readouterr().err  # compress with --heal-steps instead
    assert main(["compress", "--model", "minilm", "--out", str(tmp_path / "m"), "--blockwise", "--quiet"]) == 2
    assert "not one" in capsys.readouterr().err


def test_a_measured_search_over_its_time_budget_says_what_replaced_it(tiny_lm, tmp_path, capsys):
    """The command line on a causal LM: the head runs reduced, the measured search is predicted to
    take longer than --time-budget and the fisher sensitivity replaces it, in the printed report and
    in report.json."""
    out = tmp_path / "art"
    rc = main(["compress", "--model", str(tiny_lm[0]), "--out", str(out), "--budget", "0.5", "--calibration-samples", "32",
               "--heal-steps", "0", "--no-eval", "--time-budget", "0.001"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "sensitivity fisher (measured would take about" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["sensitivity"].startswith("fisher (measured would take about")
    assert report["counters"]["sensitivity.time_budget_fallback"] == 1 and report["counters"]["sensitivity.fisher"] > 0
