"""GPU checks (skipped without CUDA): compression on the device, in fp32 and fp16."""
import pytest
import torch

import tngraph
from tests.conftest import MLP, backend_spy
from tests.helpers_reference import by_hand, graph_ranks, linear_grams, lowrank_ranks, output_factors, rel

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
    # the module computes the truncated SVD whitened on both sides applied by hand (float64 on the
    # device, at the ranks it chose), so its error is what that decomposition reaches; a model that
    # outputs zeros (1.0) is far outside
    ranks = lowrank_ranks(result.module)
    reached = by_hand(model, ranks, linear_grams(model, data), result.context.config.damping, output_factors(result.context, model))
    with torch.no_grad():
        ref, hand, out = model(x), reached(x), result.module(x)
    assert ranks and rel(out, hand) < tol
    assert rel(out, ref) <= rel(hand, ref) + tol


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 16, 100, 600])  # whichever implementation the timing picks, and each one forced
@pytest.mark.parametrize("forced", [None, "split_rank", "tiled", "chain", "dense"])
def test_lowrank_op_dispatch_on_cuda(dtype, rows, forced, monkeypatch):
    from tngraph.ops import lowrank_reference

    if forced:
        monkeypatch.setenv("TNGRAPH_LOWRANK", forced)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, 300, device="cuda", generator=g).to(dtype)
    b = (torch.randn(70, 300, device="cuda", generator=g) / 300**0.5).to(dtype)
    a = (torch.randn(200, 70, device="cuda", generator=g) / 70**0.5).to(dtype)
    bias = torch.randn(200, device="cuda", generator=g).to(dtype)
    for act in ("none", "gelu"):
        out = torch.ops.tngraph.lowrank(x, [a, b], bias, act)
        ref = lowrank_reference(x.float(), b.float(), a.float(), bias.float(), act)
        tol = 1e-3 if dtype == torch.float32 else 3e-2
        assert out.dtype == dtype and out.device.type == "cuda"
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_lowrank_op_falls_back_with_a_logged_reason(caplog):
    from tngraph.ops import _fallback_once, lowrank_reference

    _fallback_once.cache_clear()  # the reason is logged once per process
    x = torch.randn(4, 32, device="cuda", dtype=torch.float64)
    b, a = torch.randn(8, 32, device="cuda", dtype=torch.float64), torch.randn(16, 8, device="cuda", dtype=torch.float64)
    with caplog.at_level("WARNING", logger="tngraph"):
        out = torch.ops.tngraph.lowrank(x, [a, b], None, "none")
    assert torch.equal(out, lowrank_reference(x, b, a, None, "none"))
    assert "runs its torch reference" in caplog.text and "dtype torch.float64" in caplog.text


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("forced", [None, "kernel", "einsum", "dense"])  # the timed choice, and each one forced
def test_network_op_dispatch_on_cuda(dtype, forced, monkeypatch):
    from tngraph.ops import network_reference

    if forced:
        monkeypatch.setenv("TNGRAPH_NETWORK", forced)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(37, 24 * 20, device="cuda", generator=g).to(dtype)
    g1 = (torch.randn(30, 24, 50, device="cuda", generator=g) / 24**0.5).to(dtype)
    g2 = (torch.randn(50, 16, 20, device="cuda", generator=g) / 1000**0.5).to(dtype)
    bias = torch.randn(30 * 16, device="cuda", generator=g).to(dtype)
    eq = "...ab,Aar,rBb->...AB"
    out = torch.ops.tngraph.network(x, [g1, g2], bias, eq, [24, 20], 480)
    ref = network_reference(x.float(), [g1.float(), g2.float()], eq, [24, 20], 480, bias.float())
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_lowrank_linear_runs_the_op_on_cuda_in_inference():
    from tngraph.modules import LowRankLinear

    layer = LowRankLinear(torch.randn(40, 8), torch.randn(8, 30), torch.randn(40)).to("cuda", torch.float16)
    x = torch.randn(3, 30, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        fused = layer(x)
    chain = torch.nn.functional.linear(torch.nn.functional.linear(x, layer.b), layer.a, layer.bias)
    torch.testing.assert_close(fused, chain.detach(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("fmt", ["tt", "tr", "cp", "tucker", "kron", "monarch"])
def test_network_linear_runs_the_op_on_cuda_in_inference(fmt, caplog):
    """Every two-mode format runs its kernel (no fallback logged); monarch runs the reference and says so."""
    from tngraph import ops

    ops._fallback_once.cache_clear()
    options = {"tr_cores": 2} if fmt == "tr" else {}
    model = MLP().eval()
    data = [torch.randn(32, 24) for _ in range(2)]
    compressed = tngraph.compress(model, calibration=data, config=tngraph.Config(budget=0.6, format=fmt, progress=False, **options))
    x = torch.randn(7, 24)
    with torch.no_grad(), caplog.at_level("WARNING", logger="tngraph.ops"):
        on_cpu = compressed(x)
        on_gpu = compressed.to("cuda")(x.to("cuda")).cpu()
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-3, rtol=1e-3)
    assert ("runs its torch reference" in caplog.text) == (fmt == "monarch"), caplog.text


def test_export_onnx_of_a_cuda_module_translates_the_fused_ops(tmp_path):
    """On CUDA in inference the factorized modules call the tngraph ops; the export translates them."""
    import onnx

    model = MLP().eval()
    g = torch.Generator().manual_seed(0)
    data = [((torch.randn(32, 24, generator=g),), {}) for _ in range(4)]
    module = tngraph.compress(model, calibration=data, config=tngraph.Config(budget=0.5, heal_steps=0, progress=False)).cuda()
    with torch.no_grad():
        result = tngraph.export_onnx(module, (torch.randn(4, 24, device="cuda"),), tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "MatMul" in ops and not any(n.domain for n in onnx.load(str(tmp_path / "m.onnx")).graph.node)
    assert result.max_abs_diff <= 1e-4


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_tensorrt_engine_matches_onnxruntime(tmp_path, dtype):
    """tngraph export tensorrt: an engine built from the exported compressed MLP runs and agrees; an
    fp16/bf16 export builds a strongly typed engine of that precision."""
    pytest.importorskip("tensorrt")
    from tngraph.lowering.tensorrt import build_engine, run_engine

    model = MLP().eval()
    g = torch.Generator().manual_seed(0)
    data = [((torch.randn(32, 24, generator=g),), {}) for _ in range(4)]
    module = tngraph.compress(model, calibration=data, config=tngraph.Config(budget=0.5, heal_steps=0, progress=False))
    tngraph.export_onnx(module, (torch.randn(4, 24),), tmp_path / "m.onnx", dtype=dtype)
    engine = build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", batch=(1, 8, 64), workspace_gb=1)
    assert engine.path.stat().st_size > 0 and "x" in engine.profile and engine.precision == dtype
    x = torch.randn(13, 24)
    (got,) = run_engine(engine.path, {"x": x}).values()
    tol = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 5e-2}[dtype]
    with torch.no_grad():
        torch.testing.assert_close(got.float().cpu(), module(x), atol=tol, rtol=tol)


def test_compile_backend_on_cuda_puts_the_fused_ops_in_and_inductor_runs_them():
    from tngraph import backend

    torch._dynamo.reset()
    backend.clear_cache()
    model = MLP().cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    data = [(torch.randn(32, 24, device="cuda", generator=g),) for _ in range(4)]
    spy = backend_spy()
    graphs = spy.graphs

    compiled = torch.compile(model, backend=spy, options={"budget": 0.5, "calibration": data})
    xs = [torch.randn(16, 24, device="cuda", generator=g) for _ in range(8)]  # one compiled shape, 128 rows in all
    with torch.no_grad():
        got, ref = torch.cat([compiled(x) for x in xs]), model(torch.cat(xs))
    fused = [n for n in graphs[0].graph.nodes if n.target == torch.ops.tngraph.lowrank.default]
    assert fused and got.device.type == "cuda" and len(graphs) == 1
    # as close as the input-whitened truncated SVD applied by hand at the graph's ranks (the backend
    # also whitens the outputs, which serves the model's output better; zeros would be at 1.0)
    ranks = graph_ranks(graphs[0])
    with torch.no_grad():
        reached = rel(by_hand(model, ranks, linear_grams(model, data))(torch.cat(xs)), ref)
    assert ranks and rel(got, ref) <= 1.05 * reached + 1e-3
    torch._dynamo.reset()


def test_speculative_decoding_on_cuda_reproduces_greedy_output():
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from tngraph import speculative

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=128)
    target = LlamaForCausalLM(config).cuda().eval()
    draft = copy.deepcopy(target)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ids = torch.randint(3, 256, (4, 12), device="cuda")
    ref = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24, eos_token_id=None, pad_token_id=0)
    out, stats = speculative.generate(target, draft, ids, max_new_tokens=24)
    assert out.device.type == "cuda" and torch.equal(out, ref) and stats.proposed > 0
