"""The fuse pass and the tngraph ops: which ops the graph holds, numbers equal to the unfused
chain, refusals counted, fake implementations that export sees."""
import copy

import pytest
import torch

import tngraph
from tests.conftest import MLP
from tngraph.ops import kernel_unsupported, lowrank_reference
from tngraph.passes import PassContext
from tngraph.passes.fuse import LOWRANK, fuse, unfuse

aten = torch.ops.aten


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def _ops(gm, target=LOWRANK):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


@pytest.fixture(scope="module")
def mlp_result():
    data = [torch.randn(16, 24, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    result = tngraph.compress_with_result(MLP().eval(), calibration=data, config=tngraph.Config(budget=0.5, allocation="uniform", progress=False))
    return result, data


def test_chains_and_activations_become_single_ops(mlp_result):
    result, data = mlp_result
    gm = result.graph
    ops = _ops(gm)
    assert len(ops) == 3 and _count(gm, aten.linear.default) == 0 and _count(gm, aten.relu.default) == 0
    assert [n.args[3] for n in ops] == ["relu", "relu", "none"]  # the last layer has no activation after it
    assert result.context.counters["fuse.lowrank.applied"] == 3 and result.context.counters["fuse.lowrank_act.applied"] == 2
    gm.graph.lint()
    # annotations move to the fused node
    assert all(tngraph.meta.info(n).target is not None and tngraph.meta.info(n).provenance.created_by == "fuse" for n in ops)
    x = data[0]
    unfused = unfuse(copy.deepcopy(gm))
    assert _count(unfused, LOWRANK) == 0 and _count(unfused, aten.linear.default) == 6 and _count(unfused, aten.relu.default) == 2
    with torch.no_grad():
        assert torch.equal(gm(x), unfused(x)) and torch.equal(gm(x), result.module(x))


def test_fuse_can_be_turned_off(mlp_result):
    _, data = mlp_result
    result = tngraph.compress_with_result(MLP().eval(), calibration=data, config=tngraph.Config(budget=0.5, allocation="uniform", fuse=False, progress=False))
    assert _count(result.graph, LOWRANK) == 0 and _count(result.graph, aten.linear.default) == 6


class _Reused(torch.nn.Module):
    """A chain whose intermediate is also read elsewhere: fusing it would compute it twice."""

    def __init__(self):
        super().__init__()
        self.b = torch.nn.Parameter(torch.randn(4, 12))
        self.a = torch.nn.Parameter(torch.randn(10, 4))

    def forward(self, x):
        h = torch.nn.functional.linear(x, self.b)
        return torch.nn.functional.linear(h, self.a), h.sum()


def test_a_reused_intermediate_is_refused_and_counted():
    gm = tngraph.capture(_Reused(), (torch.randn(3, 12),))
    ctx = PassContext(config=tngraph.Config(progress=False))
    result = fuse(gm, ctx)
    # the low-rank reference's pattern matches only where the intermediate is the chain's own
    assert not result.modified and ctx.counters["fuse.lowrank.applied"] == 0
    assert _count(gm, LOWRANK) == 0


def test_the_op_is_the_reference_on_the_cpu_and_exports():
    g = torch.Generator().manual_seed(0)
    x, b, a, c = torch.randn(2, 5, 12, generator=g), torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g), torch.randn(10, generator=g)
    out = torch.ops.tngraph.lowrank(x, [a, b], c, "gelu")
    assert out.shape == (2, 5, 10) and torch.equal(out, lowrank_reference(x, b, a, c, "gelu"))
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        torch.ops.tngraph.lowrank(x, [a, b], c, "tanh")

    class UsesOp(torch.nn.Module):
        def forward(self, x):
            return torch.ops.tngraph.lowrank(x, [a, b], None, "none")

    exported = torch.export.export(UsesOp(), (x,))  # the fake implementation gives the shape
    assert any(n.target == LOWRANK for n in exported.graph.nodes)
    assert torch.equal(exported.module()(x), lowrank_reference(x, b, a, None, "none"))


def test_inputs_the_kernels_do_not_take_are_named():
    x = torch.randn(2, 8, dtype=torch.float64)
    b, a = torch.randn(3, 8, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    pytest.importorskip("triton")
    assert "dtype torch.float64" in kernel_unsupported(x, b, a, None)
    assert "mixed dtypes" in kernel_unsupported(x.float(), b, a.float(), None)
    assert kernel_unsupported(x.float(), b.float(), a.float(), None) is None


def test_minilm_fused_graph_holds_one_op_per_lowrank_target_and_matches_unfused(minilm, minilm_compressed, sentences):
    from tngraph.models import tokenize

    model, tokenizer = minilm
    gm = minilm_compressed.graph
    lowrank = [name for name, plan in minilm_compressed.context.plan.items() if plan.format == "lowrank" and "dense" not in plan.factors]
    ops = _ops(gm)
    assert len(ops) == len(lowrank) > 20
    # every factorized intermediate.dense takes the GELU that follows it as its epilogue
    gelu_targets = [n for n in lowrank if n.endswith("intermediate.dense")]
    assert sum(1 for n in ops if n.args[3] == "gelu") == len(gelu_targets) > 0
    assert minilm_compressed.context.counters["fuse.lowrank.applied"] == len(lowrank)
    enc = tokenize(tokenizer, sentences.evaluation[:8], 64)
    unfused = unfuse(copy.deepcopy(gm))
    assert _count(unfused, LOWRANK) == 0
    with torch.no_grad():
        fused_out, unfused_out = gm(**enc), unfused(**enc)
    assert torch.equal(fused_out.last_hidden_state, unfused_out.last_hidden_state)


@pytest.mark.parametrize("fmt", ["tt", "tucker", "monarch"])
def test_tensor_network_layers_become_network_ops(mlp_result, fmt):
    from tngraph.passes.fuse import NETWORK

    _, data = mlp_result
    result = tngraph.compress_with_result(MLP(dims=(24, 48, 40, 16)).eval(), calibration=data,
                                          config=tngraph.Config(budget=0.6, format=fmt, progress=False))
    gm = result.graph
    gm.graph.lint()
    planned = [p for p in result.context.plan.values() if p.format == fmt]
    assert planned and len(_ops(gm, NETWORK)) == len(planned) == result.context.counters["fuse.network.applied"]
    assert _count(gm, aten.einsum.default) == 0 and _count(gm, aten.unflatten.int) == 0
    assert [tngraph.meta.info(n).target.name for n in _ops(gm, NETWORK)] == [p.name for p in planned]  # annotations kept
    x = data[0]
    unfused = unfuse(copy.deepcopy(gm))
    assert _count(unfused, NETWORK) == 0 and _count(unfused, aten.einsum.default) == len(planned)
    with torch.no_grad():
        # the op contracts along opt_einsum's path, the unfused einsum left to right: equal up to rounding
        torch.testing.assert_close(gm(x), unfused(x), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gm(x), result.module(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ["none", "gelu", "silu", "relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_the_op_has_exact_gradients(act, bias):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, 7, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    c = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    inputs = (x, b, a, c) if bias else (x, b, a)
    fn = (lambda x, b, a, c: torch.ops.tngraph.lowrank(x, [a, b], c, act)) if bias else (lambda x, b, a: torch.ops.tngraph.lowrank(x, [a, b], None, act))
    assert torch.autograd.gradcheck(fn, inputs)
