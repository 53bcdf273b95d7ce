"""The wheel holds every package (pyproject lists them by hand), and the checkout shadows no one's."""
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tngraph").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert "tngraph.kernels" in listed and (ROOT / "tngraph" / "kernels" / "lowrank.py").is_file()


def test_the_checkout_shadows_no_installed_package():
    """Python run from the repository root (python -m pytest, python -c) imports its folders first: a
    top-level kernels/ shadowed Hugging Face's `kernels`, which transformers >= 5.25 imports, and broke
    every from_pretrained. Only tngraph and the tests may be importable from the root."""
    importable = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() or (p.suffix == ".py" and p.is_file())}
    assert importable <= {"tngraph", "tests"}, f"move {sorted(importable - {'tngraph', 'tests'})} under tngraph/"
