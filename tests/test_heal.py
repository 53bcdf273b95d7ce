"""Healing by distillation: trains only what it should, never returns a worse model, resumes
bit-identically, persists what it trained, distils causal LMs by KL, refuses bad data."""
import contextlib
import json

import pytest
import torch

import tngraph
from tngraph.errors import ArtifactError, ConfigError, DataError, ModelError
from tngraph.heal import CHECKPOINT, HealConfig, heal, schedule

FAST = dict(batch_size=8, max_length=32, held_out=16)


@pytest.fixture(scope="module")
def texts():
    from tngraph.data import sentence_sets

    return sentence_sets(calibration=256, evaluation=16, seed=1).calibration


@pytest.fixture(scope="module")
def tiny_pair(minilm, texts):
    from transformers import BertConfig, BertModel

    _, tokenizer = minilm
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    teacher = BertModel(config).eval()
    student = tngraph.compress(teacher, calibration=texts[:64], tokenizer=tokenizer,
                               config=tngraph.Config(budget=0.15, allocation="uniform", whiten=False, include=(r"^encoder\.",),
                                                     heal_steps=0, progress=False))
    return teacher, student, tokenizer


@contextlib.contextmanager
def _ctrl_c_at_step(monkeypatch, step):
    """Ctrl-C during optimizer step `step` (raised from its gradient clipping, after the backward
    pass and before the update); the block must be interrupted, and clipping is restored after."""
    clip = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def clip_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_then_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)


def _copy(module):
    import copy

    return copy.deepcopy(module)


def test_heal_lowers_the_held_out_loss_and_trains_only_factors_and_norms(tiny_pair, texts):
    teacher, student, tokenizer = tiny_pair
    student = _copy(student)
    embeddings = student.embeddings.word_embeddings.weight.detach().clone()
    dense_weight = student.pooler.dense.weight.detach().clone()
    factor = student.encoder.layer[0].attention.self.query.a.detach().clone()
    norm = student.encoder.layer[0].output.LayerNorm.weight.detach().clone()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = heal(student, teacher, texts, tokenizer, HealConfig(steps=40, lr=1e-3, eval_every=10, patience=10, **FAST), show=False)
    assert result.best_loss < result.start_loss * 0.9 and result.history[0] == (0, result.start_loss)
    assert result.metric == "1 - cos" and result.best_step > 0
    assert torch.equal(student.embeddings.word_embeddings.weight, embeddings)  # frozen
    assert torch.equal(student.pooler.dense.weight, dense_weight)  # a dense weight: frozen
    assert not torch.equal(student.encoder.layer[0].attention.self.query.a, factor)  # trained
    assert not torch.equal(student.encoder.layer[0].output.LayerNorm.weight, norm)  # norms train by default
    assert "encoder.layer.0.output.LayerNorm.weight" in result.trained and "embeddings.word_embeddings.weight" not in result.trained
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())  # the teacher is untouched
    assert not any(p.requires_grad for p in student.parameters())


def test_factors_only(tiny_pair, texts):
    teacher, student, tokenizer = tiny_pair
    student = _copy(student)
    norm = student.encoder.layer[0].output.LayerNorm.weight.detach().clone()
    result = heal(student, teacher, texts, tokenizer, HealConfig(steps=5, train_norms=False, **FAST), show=False)
    assert torch.equal(student.encoder.layer[0].output.LayerNorm.weight, norm)
    assert all(name.rsplit(".", 1)[-1] in ("a", "b") for name in result.trained)


def test_heal_never_returns_a_worse_model(tiny_pair, texts):
    teacher, student, tokenizer = tiny_pair
    student = _copy(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    # a learning rate this large only makes things worse: the start is kept
    cfg = HealConfig(steps=10, lr=1.0, eval_every=5, patience=1, clip=1e6, **FAST)
    result = heal(student, teacher, texts, tokenizer, cfg, show=False)
    assert result.best_step == 0 and result.best_loss == result.start_loss
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_early_stopping_waits_for_the_second_half_of_the_steps(tiny_pair, texts, monkeypatch):
    """At the rate's peak a long run's held-out score wanders (6,000 MiniLM steps stopped at 1,800):
    patience runs out only in the decay, the second half of the steps."""
    from tngraph import heal as heal_module

    teacher, student, tokenizer = tiny_pair
    scores = iter([0.5] + [0.6] * 100)  # the start, then never better
    monkeypatch.setattr(heal_module._Distillation, "score", lambda self: next(scores))
    result = heal(_copy(student), teacher, texts, tokenizer, HealConfig(steps=40, eval_every=5, patience=2, **FAST), show=False)
    assert result.steps == 20 and result.best_step == 0  # not at step 10, where two scores had not improved
    scores = iter([0.5] + [0.6] * 100)
    result = heal(_copy(student), teacher, texts, tokenizer, HealConfig(steps=40, eval_every=5, patience=6, **FAST), show=False)
    assert result.steps == 30  # the sixth score without improvement, past the midpoint


def test_a_long_run_waits_a_tenth_of_its_steps_before_stopping(tiny_pair, texts, monkeypatch):
    """10,000 MiniLM steps stopped at 5,450 with patience 4: a long run's patience is a tenth of its steps."""
    from tngraph import heal as heal_module
    from tngraph.heal import patience_scores

    assert patience_scores(HealConfig(steps=700)) == 4 and patience_scores(HealConfig(steps=10_000)) == 20
    assert patience_scores(HealConfig(steps=6_000, patience=30)) == 30
    teacher, student, tokenizer = tiny_pair
    scores = iter([0.5] + [0.6] * 100)  # the start, then never better
    monkeypatch.setattr(heal_module._Distillation, "score", lambda self: next(scores))
    result = heal(_copy(student), teacher, texts, tokenizer, HealConfig(steps=200, eval_every=2, patience=2, **FAST), show=False)
    assert result.steps == 100 and result.best_step == 0  # ten scores (20 steps), but not before the midpoint
    scores = iter([0.5] + [0.5 - 0.001 * i for i in range(1, 61)] + [0.6] * 100)  # better until step 120, then no better
    result = heal(_copy(student), teacher, texts, tokenizer, HealConfig(steps=200, eval_every=2, patience=2, **FAST), show=False)
    assert result.best_step == 120 and result.steps == 140  # the tenth score without improvement


def test_schedule_is_seeded_covers_the_data_and_groups_by_length():
    lengths = [i % 37 for i in range(400)]
    a = schedule(lengths, 60, 8, torch.Generator().manual_seed(3))
    b = schedule(lengths, 60, 8, torch.Generator().manual_seed(3))
    assert a == b and len(a) == 60 and all(len(batch) == 8 for batch in a)
    first_epoch = [i for batch in a[: 400 // 8] for i in batch]
    assert sorted(first_epoch) == list(range(400))  # each text once per epoch
    spread = sum(max(lengths[i] for i in batch) - min(lengths[i] for i in batch) for batch in a) / len(a)
    assert spread < 6  # similar lengths together: little padding (random batches spread ~30)


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tiny_pair, texts, tmp_path, monkeypatch):
    teacher, student, tokenizer = tiny_pair
    cfg = HealConfig(steps=12, lr=1e-3, eval_every=3, patience=10, checkpoint_every=4, **FAST)
    straight = _copy(student)
    expected = heal(straight, teacher, texts, tokenizer, cfg, show=False)

    with _ctrl_c_at_step(monkeypatch, 7):
        heal(_copy(student), teacher, texts, tokenizer, cfg, checkpoint=tmp_path / "ckpt", show=False)
    assert (tmp_path / "ckpt" / CHECKPOINT).is_file()

    resumed = heal(_copy(student), teacher, texts, tokenizer, cfg, checkpoint=tmp_path / "ckpt", resume=True, show=False)
    # a fresh copy of the start, resumed: its state comes from the checkpoint
    assert resumed.resumed_from == 6 and resumed.steps == 12
    assert resumed.history == expected.history and resumed.best_loss == expected.best_loss
    assert not (tmp_path / "ckpt").exists()  # removed once healing ended


def test_resumed_weights_are_bit_identical(tiny_pair, texts, tmp_path, monkeypatch):
    teacher, student, tokenizer = tiny_pair
    cfg = HealConfig(steps=8, lr=1e-3, eval_every=8, patience=10, checkpoint_every=3, **FAST)
    straight = _copy(student)
    heal(straight, teacher, texts, tokenizer, cfg, show=False)
    with _ctrl_c_at_step(monkeypatch, 5):
        heal(_copy(student), teacher, texts, tokenizer, cfg, checkpoint=tmp_path, show=False)
    resumed = _copy(student)
    heal(resumed, teacher, texts, tokenizer, cfg, checkpoint=tmp_path, resume=True, show=False)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_from_another_run_is_refused(tiny_pair, texts, tmp_path, monkeypatch):
    teacher, student, tokenizer = tiny_pair
    cfg = HealConfig(steps=6, checkpoint_every=2, **FAST)
    with _ctrl_c_at_step(monkeypatch, 3):
        heal(_copy(student), teacher, texts, tokenizer, cfg, checkpoint=tmp_path, show=False)
    with pytest.raises(ArtifactError, match="another run"):
        heal(_copy(student), teacher, texts, tokenizer, HealConfig(steps=6, lr=5e-4, checkpoint_every=2, **FAST),
             checkpoint=tmp_path, resume=True, show=False)
    (tmp_path / CHECKPOINT).write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="corrupt"):
        heal(_copy(student), teacher, texts, tokenizer, cfg, checkpoint=tmp_path, resume=True, show=False)


@pytest.mark.parametrize("data, match", [([], "at least"), (["a short text"] * 10, "at least"), ("one string", "list of texts"),
                                         ([1, 2, 3], "list of texts"), (["   "] * 100, "at least")])
def test_bad_healing_data_is_refused(tiny_pair, data, match):
    teacher, student, tokenizer = tiny_pair
    with pytest.raises(DataError, match=match):
        heal(_copy(student), teacher, data, tokenizer, HealConfig(**FAST), show=False)


def test_a_dense_model_has_nothing_to_heal(tiny_pair, texts):
    teacher, _, tokenizer = tiny_pair
    with pytest.raises(ModelError, match="no tngraph factorized layers"):
        heal(_copy(teacher), teacher, texts, tokenizer, HealConfig(train_norms=False, **FAST), show=False)


def test_the_encoder_loss_weighs_pooled_cosines_and_sentence_similarities_as_asked(tiny_pair, texts):
    from tngraph.evaluate import pooled
    from tngraph.heal import _loss

    teacher, student, tokenizer = tiny_pair
    enc = tokenizer(texts[:6], padding=True, return_tensors="pt")
    with torch.no_grad():
        so, to = student(**enc, output_hidden_states=True), teacher(**enc, output_hidden_states=True)
        mask = enc["attention_mask"]
        es, et = pooled(so.last_hidden_state, mask), pooled(to.last_hidden_state, mask)
        cos_term = (1 - (es * et).sum(-1)).mean()
        sim_term = ((es @ es.T - et @ et.T) ** 2).mean()
        base = _loss("encoder", so, to, mask)
        assert cos_term > 0 and sim_term > 0
        torch.testing.assert_close(_loss("encoder", so, to, mask, 3.0), base + 2 * cos_term)
        torch.testing.assert_close(_loss("encoder", so, to, mask, 1.0, 5.0), base + 5 * sim_term)
        assert float(_loss("encoder", to, to, mask, 3.0, 5.0)) == pytest.approx(0.0, abs=1e-6)  # a perfect student costs nothing


def test_sentence_weights_are_refused_for_a_causal_lm(lm_pair, texts):
    teacher, student, tokenizer, _ = lm_pair
    with pytest.raises(ConfigError, match="similarity_weight weigh sentence embeddings.*causal LM"):
        heal(_copy(student), teacher, texts, tokenizer, HealConfig(steps=2, similarity_weight=1.0, **FAST), show=False)


@pytest.mark.parametrize("options, match", [(dict(steps=-1), "non-negative"), (dict(lr=0.0), "lr"), (dict(batch_size=0), "positive"),
                                            (dict(warmup=2.0), "warmup"), (dict(pooled_weight=-1.0), "pooled_weight"),
                                            (dict(similarity_weight=float("nan")), "similarity_weight")])
def test_bad_heal_options_are_refused(options, match):
    with pytest.raises(ConfigError, match=match):
        HealConfig(**options)
    with pytest.raises(ConfigError, match="heal_lr"):
        tngraph.Config(heal_lr=-1.0)
    with pytest.raises(ConfigError, match="heal_steps"):
        tngraph.Config(heal_steps=-3)


def test_auto_heals_on_a_gpu_when_torch_sees_one_and_a_missing_device_is_refused_before_any_step(tiny_pair, texts, monkeypatch):
    from tngraph.heal import resolve_device

    teacher, student, tokenizer = tiny_pair
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", cpu) == cpu and resolve_device("cpu", cpu) == cpu
    student = _copy(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"heal device '{spec}' is not on this machine .torch sees no CUDA GPU here.*--heal-device auto or cpu"):
            heal(student, teacher, texts, tokenizer, HealConfig(steps=2, device=spec, **FAST), show=False)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())  # refused before anything trained
    assert heal(student, teacher, texts, tokenizer, HealConfig(steps=2, **FAST), show=False).device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", cpu) == torch.device("cuda")  # a GPU when torch sees one
    assert resolve_device("auto", torch.device("cuda", 1)) == torch.device("cuda", 1)  # a student on a GPU stays there
    assert resolve_device("cuda:1", cpu) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="'cuda:2' is not on this machine .torch sees 2 CUDA GPU"):
        resolve_device("cuda:2", cpu)
    with pytest.raises(ConfigError, match="'meta'.*CPU or a CUDA GPU"):
        resolve_device("meta", cpu)
    for bad in ("gpu", "cuda:x", 3):
        with pytest.raises(ConfigError, match=f"unknown heal device {bad!r}.*auto, cpu, cuda or cuda:N"):
            HealConfig(device=bad)
    with pytest.raises(ConfigError, match="unknown heal_device 'tpu'"):
        tngraph.Config(heal_device="tpu")


def test_auto_stays_on_the_cpu_when_the_models_do_not_fit_the_gpu_and_a_named_gpu_says_why(tiny_pair, texts, monkeypatch, caplog):
    from tngraph.heal import GPU_HEADROOM, device_bytes, fitting_device

    teacher, student, tokenizer = tiny_pair
    student = _copy(student)
    trained = list(tngraph.heal.trainable(student).values())
    need = device_bytes((student, teacher), trained)
    weights = sum(t.numel() * t.element_size() for m in (student, teacher) for t in [*m.parameters(), *m.buffers()])
    assert need == weights + 3 * sum(p.numel() * 4 for p in trained)  # gradients and two AdamW moments of what trains
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(need / GPU_HEADROOM) + 1, 1 << 40))
    assert fitting_device("auto", cpu, (student, teacher), trained) == torch.device("cuda")  # room: the GPU
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need, 1 << 40))  # too little beside the activations
    with caplog.at_level("WARNING", logger="tngraph.heal"):
        result = heal(student, teacher, texts, tokenizer, HealConfig(steps=2, **FAST), show=False)
    assert result.device == "cpu" and "on the CPU: the models and the optimizer's state take" in caplog.text
    with pytest.raises(ConfigError, match="healing does not fit on cuda.*GiB free.*--heal-device cpu"):
        heal(student, teacher, texts, tokenizer, HealConfig(steps=2, device="cuda", **FAST), show=False)


@pytest.mark.gpu
def test_healing_on_the_gpu_trains_there_and_brings_everything_back(tiny_pair, texts):
    teacher, student, tokenizer = tiny_pair
    student = _copy(student)
    homes = {n: p.data_ptr() for n, p in student.named_parameters()}
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    cfg = HealConfig(steps=40, lr=1e-3, eval_every=10, patience=10, device="cuda", **FAST)
    result = heal(student, teacher, texts, tokenizer, cfg, show=False)
    assert result.device == "cuda" and result.best_loss < result.start_loss * 0.9
    # the student's own tensors, on the CPU, hold what trained; the teacher is back and untouched; the GPU keeps nothing
    assert all(p.device.type == "cpu" and p.data_ptr() == homes[n] for n, p in student.named_parameters())
    assert all(v.device.type == "cpu" and torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= allocated
    again = _copy(student)  # the healed student scores on the CPU as healing scored it on the GPU
    rescored = heal(again, teacher, texts, tokenizer, HealConfig(steps=0, device="cpu", **FAST), show=False)
    assert rescored.start_loss == pytest.approx(result.best_loss, rel=1e-3, abs=1e-6)


def test_compress_heals_by_default_and_the_artifact_keeps_what_healing_trained(minilm, texts, tmp_path):
    from transformers import BertConfig, BertModel

    _, tokenizer = minilm
    torch.manual_seed(1)
    teacher = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=128)).eval()
    config = tngraph.Config(budget=0.15, allocation="uniform", whiten=False, include=(r"^encoder\.",), heal_steps=15, heal_lr=1e-3, batch_size=16,
                            max_length=32, progress=False)
    result = tngraph.compress_with_result(teacher, calibration=texts, tokenizer=tokenizer, config=config)
    assert result.heal is not None and result.heal.best_loss < result.heal.start_loss and "heal" in result.timings
    healed = result.module.tngraph_recipe["heal"]
    assert healed["steps"] == result.heal.best_step and healed["held_out"] == result.heal.best_loss
    assert "encoder.layer.0.output.LayerNorm.weight" in healed["params"]  # a non-factor parameter healing trained
    assert not any(name.endswith((".a", ".b")) for name in healed["params"])  # factors are saved as factors
    out = tngraph.save(result.module, tmp_path / "art")
    loaded = tngraph.load(out, teacher)
    enc = dict(tokenizer(texts[:4], padding=True, return_tensors="pt"))
    with torch.no_grad():
        assert torch.equal(loaded(**enc).last_hidden_state, result.module(**enc).last_hidden_state)
    assert json.loads((out / "recipe.json").read_text())["heal"]["params"] == healed["params"]


def test_healing_without_texts_is_skipped_with_a_warning(caplog):
    from tests.conftest import MLP

    with caplog.at_level("WARNING", logger="tngraph"):
        result = tngraph.compress_with_result(MLP(), calibration=[torch.randn(8, 24) for _ in range(4)],
                                              config=tngraph.Config(budget=0.5, progress=False))
    assert result.heal is None and "healing skipped" in caplog.text


def test_heal_data_file_errors_name_the_file(tiny_pair, tmp_path):
    teacher, _, tokenizer = tiny_pair
    config = tngraph.Config(budget=0.3, allocation="uniform", include=(r"^encoder\.",), progress=False)
    calibration = ["a sentence about nothing in particular"] * 8
    for path, match in ((tmp_path / "missing.txt", "does not exist"), (tmp_path, "is a directory")):
        with pytest.raises(DataError, match=match):
            tngraph.compress(teacher, calibration=calibration, tokenizer=tokenizer, config=config.replace(heal_data=str(path)))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)))
    for path, match in ((empty, "holds no samples"), (binary, "cannot read healing data|binary")):
        with pytest.raises(DataError, match=match):
            tngraph.compress(teacher, calibration=calibration, tokenizer=tokenizer, config=config.replace(heal_data=str(path)))


def test_causal_lm_is_distilled_by_kl(lm_pair, texts):
    teacher, student, tokenizer, _ = lm_pair
    student = _copy(student)
    result = heal(student, teacher, texts, tokenizer, HealConfig(steps=20, lr=2e-3, eval_every=5, patience=10, **FAST), show=False)
    assert result.metric == "KL" and result.best_loss < result.start_loss and result.start_loss > 0


@pytest.fixture(scope="module")
def lm_pair(minilm, texts):
    """A Llama with the MiniLM's 30,522-token vocabulary and its compressed copy (uniform ranks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = minilm
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    teacher = LlamaForCausalLM(config).eval()
    batches = [{k: v for k, v in tokenizer(texts[i : i + 8], padding=True, return_tensors="pt").items() if k != "token_type_ids"}
               for i in range(0, 32, 8)]
    student = tngraph.compress(teacher, calibration=batches,
                               config=tngraph.Config(budget=0.2, allocation="uniform", include=(r"^model\.layers\.",), progress=False))
    return teacher, student, tokenizer, batches


def test_the_chunked_kl_is_the_full_logits_kl_in_value_and_gradient(lm_pair, monkeypatch):
    from tngraph import lm
    from tngraph.heal import _token_kl

    teacher, student, _, batches = lm_pair
    student = _copy(student)
    batch = batches[1]
    trained = [p for n, p in student.named_parameters() if "layers.1.mlp" in n]
    for p in trained:
        p.requires_grad_(True)
    full = _token_kl(student(**batch).logits, teacher(**batch).logits.detach(), batch["attention_mask"])
    full_grads = torch.autograd.grad(full, trained)
    monkeypatch.setattr(lm, "LOGIT_CHUNK", 30522 * 7)  # 7 tokens of logits at a time
    shown = []
    student.get_output_embeddings().register_forward_hook(lambda m, i, o: shown.append(o.shape[0] if o.dim() == 2 else o.shape[:-1].numel()))
    s, t = lm.headless(student, batch), lm.headless(teacher, batch)
    assert s is not None and t is not None and s.keep
    shown.clear()
    with torch.no_grad():
        hidden_t, _ = t.hidden(batch)
    hidden_s, _ = s.hidden(batch)
    chunked = lm.chunked_token_kl(hidden_s, hidden_t, s.head, t.head, batch["attention_mask"])
    chunked_grads = torch.autograd.grad(chunked, trained)
    assert float(chunked) == pytest.approx(float(full), rel=1e-3)  # a small difference of fp32 log-probabilities
    for a, b in zip(chunked_grads, full_grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)
    # the student's head saw one position per sequence (logits_to_keep=1), then 7 tokens at a time,
    # each chunk twice: forward, and recomputed in the backward pass instead of kept
    rows = batch["input_ids"].shape[0]
    assert shown[0] == rows and max(shown[1:]) <= 7 and sum(shown[1:]) == 2 * batch["input_ids"].numel()


def test_a_large_vocabulary_heals_a_chunk_of_logits_at_a_time_alike(lm_pair, texts, monkeypatch):
    from tngraph import lm

    teacher, student, tokenizer, _ = lm_pair
    cfg = HealConfig(steps=6, lr=2e-3, eval_every=3, patience=10, **FAST)
    whole = heal(_copy(student), teacher, texts, tokenizer, cfg, show=False)
    monkeypatch.setattr(lm, "LOGIT_CHUNK", 30522 * 16)
    calls = []
    chunked_kl = lm.chunked_token_kl
    monkeypatch.setattr(lm, "chunked_token_kl", lambda *a, **k: calls.append(1) or chunked_kl(*a, **k))
    chunked = heal(_copy(student), teacher, texts, tokenizer, cfg, show=False)
    assert len(calls) >= cfg.steps
    assert chunked.start_loss == pytest.approx(whole.start_loss, rel=1e-3)
    assert [v for _, v in chunked.history] == pytest.approx([v for _, v in whole.history], rel=1e-3)


def test_a_model_whose_logits_are_not_its_head_keeps_them_whole(lm_pair):
    from tngraph import lm

    teacher, _, _, batches = lm_pair
    scaled = _copy(teacher)
    scaled.register_forward_hook(lambda m, i, out: out.__class__(**{**out, "logits": out.logits * 2}))  # a logit scale outside the head
    assert lm.headless(scaled, batches[0]) is None and lm.headless(teacher, batches[0]) is not None


def _block_errors(student, teacher, tokenizer, texts):
    """Each block's relative output error against the teacher's block on the teacher's input to it."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hs = student(**batch, output_hidden_states=True).hidden_states
        ht = teacher(**batch, output_hidden_states=True).hidden_states
    return [float(((a - b) ** 2).sum() / (b**2).sum()) for a, b in zip(hs[1:], ht[1:])]


def test_healing_block_by_block_trains_each_block_on_the_teachers_block_outputs(tiny_pair, texts):
    from tngraph.heal import RATES, repeated_blocks

    teacher, student, tokenizer = tiny_pair
    student = _copy(student)
    assert repeated_blocks(student)[0] == "encoder.layer" and repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None
    before = _block_errors(student, teacher, tokenizer, texts[-32:])
    embedding_norm = student.embeddings.LayerNorm.weight.detach().clone()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = HealConfig(scope="blocks", steps=30, lr=3e-3, **FAST)
    assert HealConfig(scope="blocks").rate == RATES["blocks"] == 3e-4 and HealConfig().rate == RATES["model"] and cfg.rate == 3e-3
    result = heal(student, teacher, texts, tokenizer, cfg, show=False)
    after = _block_errors(student, teacher, tokenizer, texts[-32:])
    assert result.best_loss < result.start_loss * 0.5 and result.best_step == 30 and result.history == [(0, result.start_loss), (30, result.best_loss)]
    assert all(a < b * 0.8 for a, b in zip(after, before)), (before, after)  # every block, the later ones from healed inputs
    # only what sits inside the blocks trains: the embeddings' LayerNorm, outside them, does not
    assert torch.equal(student.embeddings.LayerNorm.weight, embedding_norm)
    assert result.trained and all(n.startswith("encoder.layer.") for n in result.trained)
    assert "encoder.layer.1.attention.self.query.a" in result.trained and "encoder.layer.0.output.LayerNorm.weight" in result.trained
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in student.parameters())


def test_a_causal_lm_heals_block_by_block(lm_pair, texts, monkeypatch):
    teacher, student, tokenizer, _ = lm_pair
    student = _copy(student)
    # with the KV cache on (a model's usual setting) the replayed blocks must not append to one
    monkeypatch.setattr(teacher.config, "use_cache", True)
    monkeypatch.setattr(student.config, "use_cache", True)
    import tngraph.heal as heal_module

    replayed = []
    call = heal_module._call

    def spy(block, hidden, arguments):
        replayed.append(arguments[2].get("cache", "absent"))
        return call(block, hidden, arguments)

    monkeypatch.setattr(heal_module, "_call", spy)
    result = heal(student, teacher, texts, tokenizer, HealConfig(scope="blocks", steps=20, lr=3e-3, **FAST), show=False)
    assert replayed and all(c is None for c in replayed)
    assert result.metric == "KL" and result.best_loss < result.start_loss * 0.9 and result.best_step == 20
    assert all(n.startswith("model.layers.") for n in result.trained)


def test_healing_block_by_block_never_returns_a_worse_model_and_refuses_what_it_cannot_do(tiny_pair, texts, tmp_path, monkeypatch):
    import tngraph.heal as heal_module

    teacher, student, tokenizer = tiny_pair
    student = _copy(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = heal(student, teacher, texts, tokenizer, HealConfig(scope="blocks", steps=10, lr=1.0, clip=1e6, **FAST), show=False)
    assert result.best_step == 0 and result.best_loss == result.start_loss
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    with pytest.raises(ConfigError, match="no checkpoint to resume"):
        heal(student, teacher, texts, tokenizer, HealConfig(scope="blocks", steps=2, **FAST), checkpoint=tmp_path, resume=True, show=False)
    with pytest.raises(ConfigError, match="scope"):
        HealConfig(scope="layers")
    with pytest.raises(ConfigError, match="heal_scope"):
        tngraph.Config(heal_scope="layers")
    monkeypatch.setattr(heal_module, "repeated_blocks", lambda model: None)
    with pytest.raises(ModelError, match="repeated blocks"):
        heal(student, teacher, texts, tokenizer, HealConfig(scope="blocks", steps=2, **FAST), show=False)


def test_auto_steps_are_timed_on_the_dense_model_rounded_and_bounded(tiny_pair, texts, monkeypatch):
    from tngraph.heal import AUTO_SECONDS, AUTO_STEPS, auto_steps, step_seconds

    teacher, _, tokenizer = tiny_pair
    batch = ((), dict(tokenizer(texts[:8], padding=True, return_tensors="pt")))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = {n: p.requires_grad for n, p in teacher.named_parameters()}
    took = step_seconds(teacher, batch, torch.device("cpu"))
    assert 0 < took < 10
    # the probe leaves the model as it was: weights, no gradients, its requires_grad flags, eval mode
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None and p.requires_grad == flags[n] for n, p in teacher.named_parameters()) and not teacher.training
    steps, measured, device = auto_steps(teacher, batch)
    assert device == torch.device("cpu") and AUTO_STEPS[0] <= steps <= AUTO_STEPS[1] and steps % 100 == 0
    for seconds, want in [(AUTO_SECONDS / 3000, 3000), (AUTO_SECONDS / 3050, 3000), (1e-6, AUTO_STEPS[1]), (10.0, AUTO_STEPS[0])]:
        monkeypatch.setattr(tngraph.heal, "step_seconds", lambda *a, s=seconds, **k: s)
        assert auto_steps(teacher, batch)[:2] == (want, seconds)
    with pytest.raises(ConfigError, match="heal device 'cuda' is not on this machine"):
        auto_steps(teacher, batch, "cuda") if not torch.cuda.is_available() else auto_steps(teacher, batch, "cuda:99")


def test_a_step_that_cannot_be_timed_is_a_warning_and_the_fewest_steps(tiny_pair, caplog):
    from tngraph.heal import AUTO_STEPS, auto_steps

    teacher, _, _ = tiny_pair
    flags = {n: p.requires_grad for n, p in teacher.named_parameters()}
    with caplog.at_level("WARNING", logger="tngraph.heal"):
        steps, took, _ = auto_steps(teacher, ((), {"input_ids": torch.randn(2, 4)}))  # float ids: the embedding refuses them
    assert steps == AUTO_STEPS[0] and took == float("inf") and "a step could not be timed (RuntimeError" in caplog.text
    assert all(p.grad is None and p.requires_grad == flags[n] for n, p in teacher.named_parameters())


def test_a_slow_first_probe_step_is_enough(tiny_pair, texts, monkeypatch):
    """A model whose first (warm-up) step alone is too slow for more than the fewest steps is not timed again."""
    from tngraph.heal import auto_steps

    teacher, _, tokenizer = tiny_pair
    batch = ((), dict(tokenizer(texts[:8], padding=True, return_tensors="pt")))
    calls = []
    real = teacher.forward
    monkeypatch.setattr(teacher, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert auto_steps(teacher, batch, seconds=1e-9)[0] == tngraph.heal.AUTO_STEPS[0]
    assert len(calls) == 2  # one step: the teacher's forward and the student's
    calls.clear()
    auto_steps(teacher, batch, seconds=1e9)
    assert len(calls) == 8  # the warm-up and three timed steps


def test_heal_steps_auto_is_the_default_and_the_recipe_records_the_number_it_chose(minilm, texts, monkeypatch):
    from transformers import BertConfig, BertModel

    from tngraph.config import parse_steps

    assert tngraph.Config().heal_steps == "auto" and HealConfig().steps == 700
    assert parse_steps("auto") == "auto" and parse_steps("12") == 12
    for bad in ("many", "1.5"):
        with pytest.raises(ConfigError, match=f"heal steps must be auto or a whole number, got '{bad}'"):
            parse_steps(bad)
    for bad in ("many", 1.5, True, -1):
        with pytest.raises(ConfigError, match="heal_steps must be auto or a whole number"):
            tngraph.Config(heal_steps=bad)
    _, tokenizer = minilm
    torch.manual_seed(1)
    teacher = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=128)).eval()
    monkeypatch.setattr(tngraph.heal, "AUTO_STEPS", (3, 6))  # the bounds, small enough for a test
    config = tngraph.Config(budget=0.15, allocation="uniform", whiten=False, include=(r"^encoder\.",), heal_lr=1e-3, batch_size=16,
                            max_length=32, progress=False)
    for seconds, want in [(1e-9, 6), (1e9, 3)]:
        monkeypatch.setattr(tngraph.heal, "step_seconds", lambda *a, s=seconds, **k: s)
        result = tngraph.compress_with_result(teacher, calibration=texts[:96], tokenizer=tokenizer, config=config)
        assert result.recipe["config"]["heal_steps"] == want and result.heal.steps == want


def test_auto_steps_resume_with_the_steps_of_the_checkpoint(tiny_pair, texts, tmp_path, monkeypatch):
    """heal_steps "auto" resuming an interrupted run takes the steps that run had, not a new timing's
    (which the checkpoint's fingerprint would refuse); without a checkpoint it times as usual."""
    from tngraph.api import resolve_heal_steps
    from tngraph.heal import checkpoint_steps

    teacher, student, tokenizer = tiny_pair
    cfg = HealConfig(steps=12, lr=1e-3, eval_every=3, patience=10, checkpoint_every=4, **FAST)
    with _ctrl_c_at_step(monkeypatch, 7):
        heal(_copy(student), teacher, texts, tokenizer, cfg, checkpoint=tmp_path / "ckpt", show=False)
    assert checkpoint_steps(tmp_path / "ckpt") == 12 and checkpoint_steps(tmp_path / "none") is None
    monkeypatch.setattr(tngraph.heal, "step_seconds", lambda *a, **k: 1e-9)  # a new timing would choose the most
    batch = dict(tokenizer(texts[:8], padding=True, return_tensors="pt"))
    config = tngraph.Config(progress=False)
    assert resolve_heal_steps(config, teacher, batch, tmp_path / "ckpt").heal_steps == 12
    assert resolve_heal_steps(config, teacher, batch).heal_steps == tngraph.heal.AUTO_STEPS[1]
    assert resolve_heal_steps(config.replace(heal_steps=5), teacher, batch, tmp_path / "ckpt").heal_steps == 5  # a number is kept
    (tmp_path / "ckpt" / CHECKPOINT).write_bytes(b"not a checkpoint")
    assert checkpoint_steps(tmp_path / "ckpt") is None  # resuming it says what is wrong
