"""The house rules of issue 23, read from the source: no import circles, short functions, a thin
CLI, no private names across modules, passes without module-global state."""
import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_architecture", ROOT / "tools" / "check_architecture.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


checker = _checker()
report = checker.analyse()


def test_no_import_circles():
    assert report.cycles == []


def test_no_function_over_80_lines():
    assert report.long_functions == []


def test_cli_is_thin():
    assert report.cli_lines <= checker.MAX_CLI_LINES


def test_no_private_names_across_modules():
    assert report.private_imports == []


def test_passes_keep_no_module_global_state():
    assert report.pass_state == []


def test_the_checker_finds_what_it_looks_for(tmp_path):
    """Each rule fires on a package built to break it (a rule that cannot fire checks nothing)."""
    pkg = tmp_path / "tngraph"
    (pkg / "passes").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("x = 1\n" * 301)
    (pkg / "a.py").write_text("from .b import _hidden\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n" + "".join(f"    y{i} = {i}\n" for i in range(80)))
    (pkg / "passes" / "__init__.py").write_text("")
    (pkg / "passes" / "p.py").write_text("_SEEN = {}\n\ndef run(key):\n    _SEEN[key] = 1\n")
    found = checker.analyse(pkg)
    assert found.cycles == [["tngraph.a", "tngraph.b"]]
    assert found.private_imports == [("tngraph.a", "tngraph.b", "_hidden")]
    assert found.long_functions == [("tngraph.b", "f", 82)] and found.cli_lines == 301
    assert found.pass_state == [("tngraph.passes.p", "_SEEN")]
    assert len(found.breaches()) == 5


@pytest.mark.parametrize("name", ["targets", "calibrate", "fisher", "sensitivity", "allocate", "factorize", "fuse"])
def test_every_pipeline_pass_declares_its_contract(name):
    from tngraph.passes import PIPELINE, PRODUCTS

    fn = next(p for p in PIPELINE if p.__name__ == name)
    assert fn.kind in ("analysis", "rewrite") and fn.produces and fn.produces <= PRODUCTS
    before = set().union(*(p.produces for p in PIPELINE[: PIPELINE.index(fn)]))
    assert fn.requires <= before, f"{name} requires {fn.requires - before}, produced by no pass before it"


def test_the_docs_name_every_module_of_the_house():
    """docs/architecture.md places every top-level module of tngraph/ somewhere in its picture or rules."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    modules = [p.stem for p in (ROOT / "tngraph").glob("*.py") if p.stem not in ("__init__", "__main__")]
    missing = [m for m in modules if f"{m}.py" not in text and f"{m}/" not in text]
    assert not missing, f"docs/architecture.md does not place {missing}"
