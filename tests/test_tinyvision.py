"""The tiny digits classifier: trained here on scikit-learn's digits, it compresses to half its
convolution parameters and keeps its held-out accuracy (the vision side's quality measure)."""
import json

import pytest
import torch

from tngraph import tinyvision, workflow
from tngraph.models import ModelSource, load_model
from tngraph.samples import read_calibration
from tngraph.workflow.measure import unhealed

pytest.importorskip("sklearn")
SPEC = tinyvision.TinyVisionSpec(epochs=8)  # about 5 s on 2 cores; the default (30 epochs) is what the README reports


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tinyvision") / "model"
    meta = tinyvision.train(SPEC, folder, show=False)
    return folder, meta


def test_the_classifier_is_a_model_folder_with_its_processor_and_disjoint_image_splits(digits_model):
    folder, meta = digits_model
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", tinyvision.META):
        assert (folder / name).is_file(), name
    train = {p.name for p in (folder / "images" / "train").rglob("*.png")}
    test = {p.name for p in (folder / "images" / "test").rglob("*.png")}
    assert len(train) == meta["train_samples"] == 1348 and len(test) == meta["test_samples"] == 449 and not train & test
    assert sorted(p.name for p in (folder / "images" / "test").iterdir()) == [str(d) for d in range(10)]
    assert json.loads((folder / tinyvision.META).read_text())["test_accuracy"] == meta["test_accuracy"] > 0.9


def test_half_the_parameters_keep_the_held_out_accuracy(digits_model, tmp_path):
    folder, meta = digits_model
    run = workflow.compress(str(folder), tmp_path / "out", calibration=str(folder / "images" / "train"), budget=0.5, heal_steps=60,
                            progress=False, baseline=False)
    kinds = {row["format"] for row in run.report["per_target"].values()}
    assert "lowrank" in kinds and run.report["params"]["targets_kept"] <= 0.5 + 1e-6
    assert not any("classifier" in name for name in run.report["per_target"])  # the head stays dense
    test = read_calibration(folder / "images" / "test", folder)
    x, y = test.inputs["pixel_values"], test.labels
    dense, _ = load_model(ModelSource("hf", str(folder)))
    acc_dense, acc_healed = tinyvision.accuracy(dense, x, y), tinyvision.accuracy(run.result.module, x, y)
    with unhealed(run.result) as before:
        acc_before = tinyvision.accuracy(before, x, y)
    assert abs(acc_dense - meta["test_accuracy"]) < 1e-6  # the saved folder is the trained model
    assert acc_healed >= acc_dense - 0.02 and acc_healed >= acc_before - 0.01
    assert torch.isfinite(torch.tensor(run.report["outputs"]["compressed"]["relative_error"]))
