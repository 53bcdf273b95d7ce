"""Healing by distillation: trains only what it should, never returns a worse model, refuses bad data."""
import pytest
import torch

import tngraph
from tngraph.errors import DataError
from tngraph.heal import HealConfig, heal


@pytest.fixture(scope="module")
def tiny_pair(minilm, sentences):
    from transformers import BertConfig, BertModel

    _, tokenizer = minilm
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    teacher = BertModel(config).eval()
    student = tngraph.compress(teacher, calibration=sentences.calibration[:64], tokenizer=tokenizer,
                               config=tngraph.Config(budget=0.15, allocation="uniform", whiten=False, include=(r"^encoder\.",), progress=False))
    return teacher, student, tokenizer


def test_heal_lowers_the_held_out_loss_and_trains_only_factors_and_norms(tiny_pair, sentences):
    teacher, student, tokenizer = tiny_pair
    embeddings = student.embeddings.word_embeddings.weight.detach().clone()
    factor = student.encoder.layer[0].attention.self.query.a.detach().clone()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = HealConfig(steps=30, lr=3e-4, batch_size=8, max_length=32, eval_every=10, patience=10)
    result = heal(student, teacher, sentences.calibration, tokenizer, cfg, show=False)
    assert result.best_loss < result.start_loss and result.history[0] == (0, result.start_loss)
    assert torch.equal(student.embeddings.word_embeddings.weight, embeddings)  # frozen
    assert not torch.equal(student.encoder.layer[0].attention.self.query.a, factor)  # trained
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())  # the teacher is untouched
    assert not any(p.requires_grad for p in student.parameters())


def test_heal_never_returns_a_worse_model(tiny_pair, sentences):
    teacher, student, tokenizer = tiny_pair
    before = {k: v.clone() for k, v in student.state_dict().items()}
    # a learning rate this large only makes things worse: the start is kept
    cfg = HealConfig(steps=10, lr=10.0, batch_size=8, max_length=32, eval_every=5, patience=1, clip=1e6)
    result = heal(student, teacher, sentences.calibration, tokenizer, cfg, show=False)
    assert result.best_step == 0 and result.best_loss == result.start_loss
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


@pytest.mark.parametrize("texts, match", [([], "at least"), (["short"] * 10, "at least"), ("one string", "list of texts"),
                                          ([1, 2, 3], "list of texts")])
def test_bad_healing_data_is_refused(tiny_pair, texts, match):
    teacher, student, tokenizer = tiny_pair
    with pytest.raises(DataError, match=match):
        heal(student, teacher, texts, tokenizer, HealConfig(batch_size=8), show=False)
