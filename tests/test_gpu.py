"""GPU checks (skipped without CUDA): compression on the device, in fp32 and fp16."""
import pytest
import torch

import tngraph
from tests.conftest import MLP

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_compress_on_cuda(dtype):
    model = MLP().to("cuda", dtype).eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    data = [((torch.randn(64, 24, device="cuda", generator=g).to(dtype),), {}) for _ in range(4)]
    result = tngraph.compress_with_result(model, calibration=data, config=tngraph.Config(budget=0.5, progress=False))
    x = data[0][0][0]
    out = result.module(x)
    assert out.device.type == "cuda" and out.dtype == dtype
    assert result.module.layers[0].a.device.type == "cuda"
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(result.graph(x), out, atol=tol, rtol=tol)
    err = ((out.float() - model(x).float()).norm() / model(x).float().norm()).item()
    assert err < 0.6


def test_heal_on_cuda(minilm):
    from transformers import BertConfig, BertModel

    from tngraph.data import sentence_sets
    from tngraph.heal import HealConfig, heal

    _, tokenizer = minilm
    texts = sentence_sets(calibration=256, evaluation=16, seed=1).calibration
    torch.manual_seed(0)
    teacher = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=128, max_position_embeddings=128)).to("cuda").eval()
    student = tngraph.compress(teacher, calibration=texts[:64], tokenizer=tokenizer,
                               config=tngraph.Config(budget=0.15, allocation="uniform", whiten=False, include=(r"^encoder\.",),
                                                     heal_steps=0, progress=False))
    result = heal(student, teacher, texts, tokenizer, HealConfig(steps=30, lr=1e-3, batch_size=16, held_out=32, eval_every=10), show=False)
    assert result.best_loss < result.start_loss and student.encoder.layer[0].attention.self.query.a.device.type == "cuda"
