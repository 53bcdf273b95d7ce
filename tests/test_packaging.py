"""The wheel holds every package: pyproject lists packages by hand (kernels/ installs as tngraph.kernels)."""
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tngraph").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert "tngraph.kernels" in listed and config["package-dir"]["tngraph.kernels"] == "kernels"
    assert (ROOT / "kernels" / "__init__.py").is_file() and (ROOT / "kernels" / "lowrank.py").is_file()
