import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# under pytest-xdist (`make test` runs one worker per core) each worker computes on one thread
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
# without a GPU the Triton kernels run (and are tested) in triton's interpreter on CPU tensors;
# it is read when a kernel is decorated, so before tngraph.kernels is first imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """Every test starts on the worker's thread count: one that changes it (a helper process's setup,
    a call under test) does not slow down the tests after it on an oversubscribed CPU."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm():
    from tngraph.models import ModelSource, load_model

    model, tokenizer = load_model(ModelSource("minilm"))
    return model, tokenizer


@pytest.fixture(scope="session")
def sentences():
    from tngraph.data import sentence_sets

    return sentence_sets(calibration=96, evaluation=200, seed=0)


@pytest.fixture(scope="session")
def minilm_compressed(minilm, sentences):
    """The bundled MiniLM compressed at budget 0.5 (96 calibration sentences) by the default
    pipeline with the fisher sensitivity (the default "measured" takes minutes), without healing,
    every linear low rank (mlp="lowrank": the tests on it check the low-rank ops, fusion and
    export; the default's pruned blocks are checked end to end in test_cli and in test_mlp_prune)."""
    import tngraph
    from tngraph.models import MINILM_INCLUDE, ModelSource

    model, tokenizer = minilm
    config = tngraph.Config(budget=0.5, include=MINILM_INCLUDE, sensitivity="fisher", heal_steps=0, progress=False,
                            mlp="lowrank")
    return tngraph.compress_with_result(
        model, calibration=sentences.calibration, config=config, tokenizer=tokenizer, source=ModelSource("minilm")
    )


def write_tiny_bert(folder, tokenizer, *, layers=2, positions=128):
    """A small random BERT (hidden 32) saved as a local Hugging Face folder with `tokenizer`."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=positions)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class MLP(torch.nn.Module):
    def __init__(self, dims=(24, 48, 40, 16), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


@pytest.fixture
def mlp():
    return MLP().eval()


@pytest.fixture
def mlp_data():
    g = torch.Generator().manual_seed(1)
    # correlated inputs, so that whitening has something to do
    mix = torch.randn(24, 24, generator=g)
    return [((torch.randn(16, 24, generator=g) @ mix,), {}) for _ in range(8)]


def backend_spy():
    """A torch.compile backend that runs tngraph's and keeps each rewritten graph (in .graphs)."""
    from tngraph import backend

    graphs = []

    def spy(gm, example_inputs, **kw):
        run = backend.tngraph_backend(gm, example_inputs, **kw)
        graphs.append(run.tngraph_graph)
        return run

    spy.graphs = graphs
    return spy


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """The trained tiny LM (tngraph.tinylm's `test` preset: a 2-layer, 64-wide Llama) and its training
    record, trained once per session: about 20 s on 2 cores."""
    from tngraph import tinylm

    folder = tmp_path_factory.mktemp("tiny-lm") / "model"
    meta = tinylm.train(tinylm.spec_for("test"), folder, show=False)
    return folder, meta
