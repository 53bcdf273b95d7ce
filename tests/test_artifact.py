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
    loaded = tngraph.load(out, model=type(mlp)())  # a fresh instance with the same (seeded) weights
    x = torch.randn(6, 24)
    torch.testing.assert_close(loaded(x), compressed(x), atol=0, rtol=0)
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
