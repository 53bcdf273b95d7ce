import pytest
import torch

import tngraph
from tngraph.errors import CaptureError
from tngraph.models import tokenize

aten = torch.ops.aten


def test_minilm_capture_keeps_structure_and_metadata(minilm):
    model, tokenizer = minilm
    enc = tokenize(tokenizer, ["a short one", "a somewhat longer sentence for the test"], 32)
    gm = tngraph.capture(model, enc)
    assert isinstance(gm, torch.fx.GraphModule)
    linears = [n for n in gm.graph.nodes if n.target == aten.linear.default]
    assert len(linears) == 37  # 36 encoder linears + the pooler
    assert all(n.args[1].op == "get_attr" for n in linears)
    stack = linears[0].meta["nn_module_stack"]
    assert list(stack.values())[-1][0] == "encoder.layer.0.attention.self.query"
    # same inputs, same output structure, same numbers; other batch and sequence sizes work
    other = tokenize(tokenizer, ["x y z " * 20] * 3, 128)
    with torch.no_grad():
        out, ref = gm(**other), model(**other)
    assert type(out).__name__ == type(ref).__name__
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_plain_module_positional_and_kwargs(mlp):
    x = torch.randn(3, 24)
    for inputs in (x, (x,), [x], ((x,), {})):
        gm = tngraph.capture(mlp, inputs)
        torch.testing.assert_close(gm(torch.randn(9, 24) * 0 + x[0]), mlp(torch.randn(9, 24) * 0 + x[0]))


def test_untraceable_model_names_the_construct():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x

    with pytest.raises(CaptureError) as info:
        tngraph.capture(Branchy(), torch.randn(3))
    text = str(info.value)
    assert "cannot capture Branchy" in text and "data-dependent" in text
    assert "if x.sum() > 0" in text and "torch.cond" in text and "backend='tngraph'" in text


def test_bad_arguments():
    with pytest.raises(CaptureError, match="expected a torch.nn.Module"):
        tngraph.capture(lambda x: x, torch.randn(2))
    with pytest.raises(CaptureError, match="not supported"):
        tngraph.capture(torch.nn.Linear(2, 2), 3.5)
