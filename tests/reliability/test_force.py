"""--force replaces only what tngraph wrote: never the source model, the current or home directory,
`/`, or a folder or file holding anything of the user's. Each refusal is one line and touches nothing."""
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

import tngraph
from tngraph.cli import main
from tngraph.errors import ArtifactError
from tngraph.ownership import MARKER, STAGING, check_output_dir, clean_stale


def _snapshot(folder: pathlib.Path) -> dict[str, str]:
    """Every file under `folder` by relative path, with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _stranger(folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "sub").mkdir()
    (folder / "sub" / "y").write_text("also mine")
    return folder


@pytest.fixture
def compressed(mlp, mlp_data):
    return tngraph.compress(mlp, calibration=mlp_data, config=tngraph.Config(budget=0.5, progress=False, heal_steps=0))


def test_a_strangers_folder_is_refused_and_untouched(compressed, tmp_path):
    out = _stranger(tmp_path / "mine")
    before = _snapshot(out)
    with pytest.raises(ArtifactError, match="not written by tngraph"):
        tngraph.save(compressed, out, force=True)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["mine"], "no staging folder may be left"


def test_an_artifact_with_a_strangers_file_is_refused(compressed, tmp_path):
    out = tngraph.save(compressed, tmp_path / "art")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="holds files tngraph did not write.*notes.txt"):
        tngraph.save(compressed, out, force=True)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    tngraph.save(compressed, out, force=True)  # its own artifact again: replaced


def test_an_artifact_written_before_markers_is_still_tngraphs(compressed, tmp_path):
    out = tngraph.save(compressed, tmp_path / "art")
    (out / MARKER).unlink()  # as written by earlier versions: recognised by its recipe
    tngraph.save(compressed, out, force=True)
    assert (out / MARKER).is_file()
    (out / MARKER).unlink()
    (out / "recipe.json").write_text(json.dumps({"not": "a recipe"}))
    with pytest.raises(ArtifactError, match="not written by tngraph"):
        tngraph.save(compressed, out, force=True)


def test_a_marker_of_a_running_write_is_not_ownership(compressed, tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"kind": STAGING, "pid": os.getpid()}))
    (out / "data.bin").write_bytes(b"1")
    with pytest.raises(ArtifactError, match="not written by tngraph"):
        tngraph.save(compressed, out, force=True)


def test_protected_places(compressed, tmp_path, monkeypatch):
    art = tngraph.save(compressed, tmp_path / "work" / "art")
    monkeypatch.chdir(art)  # the current directory, even an artifact of tngraph's
    with pytest.raises(ArtifactError, match="is the current directory"):
        tngraph.save(compressed, ".", force=True)
    with pytest.raises(ArtifactError, match="contains the current directory"):
        tngraph.save(compressed, tmp_path / "work", force=True)
    monkeypatch.chdir(tmp_path)
    home = tngraph.save(compressed, tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(ArtifactError, match="is your home directory"):
        tngraph.save(compressed, home, force=True)
    with pytest.raises(ArtifactError, match="is the root directory"):
        check_output_dir("/", True)
    assert (art / "recipe.json").is_file() and (home / "recipe.json").is_file()


def test_a_symbolic_link_is_refused(compressed, tmp_path):
    art = tngraph.save(compressed, tmp_path / "art")
    (tmp_path / "link").symlink_to(art)
    with pytest.raises(ArtifactError, match="symbolic link"):
        tngraph.save(compressed, tmp_path / "link", force=True)
    assert (tmp_path / "link").is_symlink() and (art / "recipe.json").is_file()


def test_stale_staging_folders_are_removed_only_when_tngraphs_and_dead(tmp_path):
    out = tmp_path / "art"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    for name, marker in ((".art.tmp-dead1", {"kind": STAGING, "pid": int(dead)}), (".art.old-dead2", {"kind": STAGING, "pid": int(dead)}),
                         (".art.tmp-live", {"kind": STAGING, "pid": os.getpid()}), (".art.tmp-swapped", {"kind": "artifact", "entries": []}),
                         (".art.tmp-users", None), (".other.tmp-dead", {"kind": STAGING, "pid": int(dead)})):
        (tmp_path / name).mkdir()
        if marker is not None:
            (tmp_path / name / MARKER).write_text(json.dumps(marker))
    removed = sorted(p.name for p in clean_stale(out))
    assert removed == [".art.old-dead2", ".art.tmp-dead1", ".art.tmp-swapped"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".art.tmp-live", ".art.tmp-users", ".other.tmp-dead"]


# --- the command line --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert(tmp_path_factory, minilm):
    from tests.conftest import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("force") / "bert", minilm[1], layers=1, positions=64)


def _refused(capsys, argv, fragment):
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("tngraph: error:"), err
    assert fragment in lines[0], lines[0]
    return lines[0]


FAST = ["--no-eval", "--heal-steps", "0", "--quiet", "--calibration-samples", "16", "--allocation", "uniform"]


def test_compress_never_replaces_its_source_model(capsys, bert):
    before = _snapshot(bert.parent)
    _refused(capsys, ["compress", "--model", str(bert), "--out", str(bert), "--force", *FAST], "is an input of this run")
    _refused(capsys, ["compress", "--model", str(bert), "--out", str(bert.parent), "--force", *FAST], "contains an input of this run")
    assert _snapshot(bert.parent) == before


def test_cli_refusals_touch_nothing(capsys, bert, tmp_path, monkeypatch):
    mine = _stranger(tmp_path / "mine")
    before = _snapshot(tmp_path)
    _refused(capsys, ["compress", "--model", str(bert), "--out", str(mine), "--force", *FAST], "not written by tngraph")
    _refused(capsys, ["dump", "--model", str(bert), "--out", str(mine), "--force", *FAST], "not written by tngraph")
    monkeypatch.chdir(mine)
    _refused(capsys, ["dump", "--model", str(bert), "--out", ".", "--force", *FAST], "is the current directory")
    _refused(capsys, ["compress", "--model", str(bert), "--out", ".", "--force", *FAST], "is the current directory")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(mine))
    _refused(capsys, ["compress", "--model", str(bert), "--out", str(mine), "--force", *FAST], "your home directory")
    assert _snapshot(tmp_path) == before


def test_cli_replaces_its_own_outputs(capsys, bert, tmp_path):
    art, dump, onnx = tmp_path / "art", tmp_path / "dump", tmp_path / "m.onnx"
    for _ in range(2):  # the second run replaces what the first wrote
        assert main(["compress", "--model", str(bert), "--out", str(art), "--force", *FAST]) == 0
        assert main(["dump", "--model", str(bert), "--out", str(dump), "--force", *FAST]) == 0
        assert main(["export", "onnx", "--model", str(art), "--out", str(onnx), "--force", "--quiet"]) == 0
    capsys.readouterr()
    assert (dump / "index.html").is_file() and json.loads((dump / MARKER).read_text())["kind"] == "dump"
    mine = tmp_path / "mine"
    _refused(capsys, ["heal", str(art), "--out", str(_stranger(mine)), "--force", "--steps", "1", "--no-eval", "--quiet"],
             "not written by tngraph")
    _refused(capsys, ["heal", str(art), "--out", str(tmp_path), "--force", "--steps", "1", "--no-eval", "--quiet"],
             "contains an input of this run")
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(b"not onnx")
    _refused(capsys, ["export", "onnx", "--model", str(art), "--out", str(foreign), "--force", "--quiet"], "not an ONNX file that tngraph wrote")
    assert foreign.read_bytes() == b"not onnx"
    (dump / "notes.txt").write_text("mine")
    _refused(capsys, ["dump", "--model", str(bert), "--out", str(dump), "--force", *FAST], "notes.txt")
    assert (dump / "notes.txt").read_text() == "mine" and (dump / "index.html").is_file()
