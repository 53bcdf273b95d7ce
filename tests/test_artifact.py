import json

import pytest
import torch

import tngraph
from tngraph.artifact import FACTORS, RECIPE
from tngraph.errors import ArtifactError, ModelError
from tngraph.ownership import MARKER


@pytest.fixture
def compressed(mlp, mlp_data):
    return tngraph.compress(mlp, calibration=mlp_data, config=tngraph.Config(budget=0.5, progress=False))


def test_round_trip_of_a_user_module(compressed, mlp, tmp_path):
    out = tngraph.save(compressed, tmp_path / "art")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, FACTORS, RECIPE]
    assert json.loads((out / MARKER).read_text())["entries"] == [FACTORS, RECIPE]
    recipe = json.loads((out / RECIPE).read_text())
    assert recipe["source"] == {"kind": "module", "path": None}
    assert [t["name"] for t in recipe["targets"]] == ["layers.0", "layers.1", "layers.2"]
    assert recipe["tngraph_version"] == tngraph.__version__ and len(recipe["source_hash"]) == 64
    source = type(mlp)()  # a fresh instance with the same (seeded) weights
    loaded = tngraph.load(out, model=source)
    x = torch.randn(6, 24)
    torch.testing.assert_close(loaded(x), compressed(x), atol=0, rtol=0)
    # the recipe goes onto a copy: the model passed in stays dense, usable as the reference
    assert loaded is not source and all(type(m) is torch.nn.Linear for m in source.layers)
    torch.testing.assert_close(source(x), mlp(x), atol=0, rtol=0)
    with pytest.raises(ModelError, match="user-supplied module"):
        tngraph.load(out)


def test_existing_directory_needs_force(compressed, tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    with pytest.raises(ArtifactError, match="already exists.*--force"):
        tngraph.save(compressed, out)
    tngraph.save(compressed, out, force=True)  # an empty folder may be replaced
    assert (out / RECIPE).is_file()
    tngraph.save(compressed, out, force=True)  # and so may an artifact tngraph wrote
    assert (out / RECIPE).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["art"], "no temporary folders may be left behind"


def test_failed_save_leaves_nothing(compressed, tmp_path):
    # a write that fails half-way (the extra file's folder does not exist) must not leave a folder
    with pytest.raises(FileNotFoundError):
        tngraph.save(compressed, tmp_path / "art", extra={"missing/report.json": {}})
    assert list(tmp_path.iterdir()) == []


def test_plain_modules_cannot_be_saved(mlp, tmp_path):
    with pytest.raises(ModelError, match="not produced by tngraph"):
        tngraph.save(mlp, tmp_path / "art")


@pytest.fixture
def artifact(compressed, tmp_path):
    return tngraph.save(compressed, tmp_path / "art")


def test_missing_artifact(tmp_path, mlp):
    with pytest.raises(ArtifactError, match="no artifact"):
        tngraph.load(tmp_path / "nothing", model=mlp)


def test_missing_recipe(artifact, mlp):
    (artifact / RECIPE).unlink()
    with pytest.raises(ArtifactError, match="has no recipe.json"):
        tngraph.load(artifact, model=mlp)


def test_corrupt_recipe(artifact, mlp):
    (artifact / RECIPE).write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        tngraph.load(artifact, model=mlp)
    (artifact / RECIPE).write_text("[]")
    with pytest.raises(ArtifactError, match="not a tngraph recipe"):
        tngraph.load(artifact, model=mlp)


def test_truncated_or_modified_factors(artifact, mlp):
    data = (artifact / FACTORS).read_bytes()
    (artifact / FACTORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="does not match the hash"):
        tngraph.load(artifact, model=mlp)
    (artifact / FACTORS).unlink()
    with pytest.raises(ArtifactError, match="has no factors.safetensors"):
        tngraph.load(artifact, model=mlp)


def test_different_source_model_is_refused(artifact):
    from tests.conftest import MLP

    with pytest.raises(ArtifactError, match="different source model"):
        tngraph.load(artifact, model=MLP(seed=5))


class _WithBatchNorm(torch.nn.Module):
    """A linear layer after a BatchNorm, whose num_batches_tracked buffer is a 0-dim tensor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.BatchNorm1d(24)
        self.proj = torch.nn.Linear(24, 32)

    def forward(self, x):
        return self.proj(self.norm(x))


def test_zero_dim_buffers_hash_save_and_load(tmp_path):
    from tngraph.backend import _tensor_hash
    from tngraph.models import tensor_bytes, weights_hash

    model = _WithBatchNorm().eval()
    assert model.norm.num_batches_tracked.dim() == 0
    assert tensor_bytes(torch.tensor(7, dtype=torch.int64)) == (7).to_bytes(8, "little")
    assert _tensor_hash(torch.tensor(1.0)) != _tensor_hash(torch.tensor([1.0]))  # the shape is part of the hash
    for dtype in (torch.bool, torch.bfloat16, torch.float16, torch.int8):
        assert len(tensor_bytes(torch.zeros((), dtype=dtype))) == torch.zeros((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(0)
    data = [((torch.randn(16, 24, generator=g),), {}) for _ in range(4)]
    compressed = tngraph.compress(model, calibration=data, config=tngraph.Config(budget=0.5, progress=False, heal_steps=0))
    out = tngraph.save(compressed, tmp_path / "art")
    assert json.loads((out / RECIPE).read_text())["source_hash"] == weights_hash(model)
    loaded = tngraph.load(out, model=_WithBatchNorm())
    x = torch.randn(5, 24)
    torch.testing.assert_close(loaded(x), compressed(x), atol=0, rtol=0)


def test_loading_a_model_leaves_the_environment_alone(monkeypatch):
    import os

    from tngraph.models import ModelSource, load_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    load_model(ModelSource("minilm"))
    assert "HF_HUB_OFFLINE" not in os.environ


@pytest.mark.parametrize("change,fragment", [
    (lambda r: r["files"].update({"../../etc/passwd": {"sha256": "0" * 64}}), "not factor files"),
    (lambda r: r.update(files={"/etc/passwd": {"sha256": "0" * 64}}), "not factor files"),
    (lambda r: r.update(source={"kind": "hf", "path": "../../etc"}), "not an absolute, normalised"),
    (lambda r: r.update(source={"kind": "hf", "path": "/models/../../etc"}), "not an absolute, normalised"),
    (lambda r: r.update(source={"kind": "hf-causal", "path": "relative/model"}), "not an absolute, normalised"),
    (lambda r: r.update(source={"kind": "minilm", "path": "/etc"}), "has no path"),
    (lambda r: r.update(source={"kind": "shell", "path": None}), "unknown source"),
    (lambda r: r["targets"][0].update(name="../layers"), "not a module path"),
    (lambda r: r["targets"][0].update(file="../../factors-00000.safetensors"), "not one of the recipe's"),
], ids=["files-dotdot", "files-absolute", "source-dotdot", "source-unnormalised", "source-relative", "minilm-path", "kind",
        "target-name", "target-file"])
def test_a_crafted_recipe_is_refused_before_anything_is_read(artifact, mlp, monkeypatch, change, fragment):
    import tngraph.artifact as module
    import tngraph.shards as shards

    def nothing(*args, **kwargs):
        raise AssertionError("read something of a crafted recipe")

    monkeypatch.setattr(module, "load_model", nothing)
    monkeypatch.setattr(module, "file_sha256", nothing)
    monkeypatch.setattr(shards, "file_sha256", nothing)
    monkeypatch.setattr(module, "load_file", nothing)
    monkeypatch.setattr(shards, "Shards", nothing)
    recipe = json.loads((artifact / RECIPE).read_text())
    change(recipe)
    (artifact / RECIPE).write_text(json.dumps(recipe))
    with pytest.raises(ArtifactError, match=fragment):
        tngraph.load(artifact, model=mlp)
    recipe["layout"] = "causal-lm-blockwise"  # the block-by-block loader reads the same checked recipe
    (artifact / RECIPE).write_text(json.dumps(recipe))
    with pytest.raises(ArtifactError, match=fragment):
        tngraph.load(artifact)
