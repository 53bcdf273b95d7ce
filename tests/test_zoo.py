"""The architecture zoo (tools/zoo.py): every listed Hugging Face architecture, built tiny from its
config, compresses (outputs equal the original at budget 1.0 and agree within the guard at 0.5),
round-trips through tngraph.save / tngraph.load bit for bit, compiles with the tngraph backend
(its graphs holding tngraph's layer ops) and exports to ONNX (checker and onnxruntime)."""
import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.zoo

_spec = importlib.util.spec_from_file_location("tngraph_zoo", pathlib.Path(__file__).parents[1] / "tools" / "zoo.py")
zoo = sys.modules.setdefault("tngraph_zoo", importlib.util.module_from_spec(_spec))  # dataclasses look their module up
_spec.loader.exec_module(zoo)


def test_the_zoo_lists_the_architectures_the_issue_names():
    families = {a.family for a in zoo.ARCHS.values()}
    assert len(zoo.ARCHS) >= 24
    for family in ("GPT-2", "OPT", "Qwen3", "Llama", "DistilBERT", "ALBERT", "T5", "T5 (encoder)", "BART", "ViT", "ResNet",
                   "Whisper (encoder)", "Wav2Vec2", "CLIP (text)", "CLIP (vision)"):
        assert family in families


@pytest.mark.parametrize("name", list(zoo.ARCHS))
def test_architecture_compresses_loads_compiles_and_exports(name, tmp_path):
    row = zoo.check(name, tmp_path)
    assert row.passed, f"{name}: {row.steps}"


def test_a_failing_step_is_recorded_and_the_later_ones_skipped(tmp_path, monkeypatch):
    import tngraph

    def refuse(*args, **kwargs):
        raise tngraph.ConfigError("no", "yes")

    monkeypatch.setattr(tngraph, "export_onnx", refuse)
    row = zoo.check("bert", tmp_path, steps=("compress", "load", "onnx"))
    assert row.steps == {"compress": "ok", "load": "ok", "onnx": "refused: no (yes)"} and not row.passed
    table = zoo.table([row])
    assert "| BERT | yes | yes | — | no |" in table and "onnx: refused: no (yes)" in table
