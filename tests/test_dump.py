"""The graph dump tool: per-pass folders (table, diff, SVG, GraphML), index.html, --diff, traces."""
import json
import os
import re
import shutil
import subprocess
import sys

import networkx as nx
import pytest
import torch

import tngraph
from tngraph.cli import main
from tngraph.errors import DataError, PassError
from tests.conftest import MLP

aten = torch.ops.aten
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed (make test installs it)")


def _data(n=4):
    g = torch.Generator().manual_seed(1)
    return [((torch.randn(16, 24, generator=g),), {}) for _ in range(n)]


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    root = tmp_path_factory.mktemp("dump")
    result = tngraph.compress_with_result(MLP().eval(), calibration=_data(), config=tngraph.Config(budget=0.6, heal_steps=0, progress=False, dump_dir=str(root)))
    return root, result


def _folders(root):
    return sorted(p.name for p in root.iterdir() if p.is_dir())


@needs_dot
def test_every_changing_pass_has_table_diff_drawing_graphml_and_counters(dumped):
    root, result = dumped
    folders = _folders(root)
    assert folders == ["00_captured", "01_targets", "02_calibrate", "03_fisher", "04_sensitivity", "05_allocate", "06_factorize", "07_fuse"]
    for name in folders:
        folder = root / name
        for file in ("graph.txt", "graph.svg", "graph.graphml", "code.py", "pass.json"):
            assert (folder / file).is_file() and (folder / file).stat().st_size > 0, (name, file)
        assert (folder / "graph.diff").is_file() == (name != "00_captured")
        assert (folder / "graph.svg").read_text().lstrip().startswith(("<?xml", "<svg", "<!DOCTYPE"))
    info = json.loads((root / "06_factorize" / "pass.json").read_text())
    assert info["counters"]["lowrank_linear.applied"] == 2 and info["seconds"] >= 0 and info["drawing"]["svg"] == "graph.svg"
    diff = (root / "06_factorize" / "graph.diff").read_text()
    added = [line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert any("weight_lowrank_a" in line and "from=factorize" in line for line in added)
    assert any(line.startswith("-layers_1_weight ") or line.startswith("-layers_2_weight ") for line in diff.splitlines())
    fused = (root / "07_fuse" / "graph.diff").read_text()
    assert "+" in fused and "tngraph.lowrank.default" in fused
    # GraphML holds the graph as fx has it: one node per fx node, the edges of its inputs
    g = nx.read_graphml(root / "07_fuse" / "graph.graphml")
    assert g.number_of_nodes() == len(result.graph.graph.nodes)
    assert sum(1 for _, d in g.nodes(data=True) if d.get("target") == "tngraph.lowrank.default") == 2
    # clusters per module in the drawing
    assert "cluster_layers_1" in (root / "06_factorize" / "graph.dot").read_text()


def test_table_counts_flops_of_the_matrix_products(dumped):
    root, _ = dumped
    captured = (root / "00_captured" / "graph.txt").read_text()
    line = next(line for line in captured.splitlines() if line.startswith("linear "))
    assert f"{2 * 16 * 24 * 48:,}" in line  # x (16 x 24) @ W^T (24 x 48)
    fused = (root / "07_fuse" / "graph.txt").read_text()
    for line in fused.splitlines():
        if "tngraph.lowrank.default" in line:
            assert re.search(r"\d{1,3}(,\d{3})+", line)


def test_index_html_targets_and_summary(dumped):
    root, result = dumped
    page = (root / "index.html").read_text()
    for name in _folders(root):
        assert f'href="#{name}"' in page
    assert page.count("data:image/png;base64,") == 4  # sensitivity, format/rank, spectra, before/after
    assert "http://" not in page and "https://" not in page  # needs no network
    for src in re.findall(r'src="([^"]+)"', page):
        assert src.startswith("data:") or (root / src).is_file(), src
    targets = json.loads((root / "targets.json").read_text())
    assert [t["name"] for t in targets["targets"]] == ["layers.0", "layers.1", "layers.2"]
    assert set(targets["spectra"]) == {"layers.0", "layers.1", "layers.2"} and targets["spectra"]["layers.1"][0] == 1.0
    summary = json.loads((root / "summary.json").read_text())
    assert summary["flops"]["last"] < summary["flops"]["first"]


def test_a_failing_pass_leaves_the_graph_it_failed_on_and_an_error_that_points_to_it(tmp_path):
    from tngraph.passes import PIPELINE, PassContext
    from tngraph.pipeline import run_passes

    def factorize(gm, ctx):  # a rewrite that breaks
        raise RuntimeError("rank exploded")

    passes = [p if p.__name__ != "factorize" else factorize for p in PIPELINE]
    gm = tngraph.capture(MLP().eval(), (torch.randn(4, 24),))
    ctx = PassContext(config=tngraph.Config(budget=0.6, heal_steps=0, progress=False, dump_dir=str(tmp_path)), calibration=_data())
    with pytest.raises(PassError) as info:
        run_passes(gm, ctx, passes)
    text = str(info.value)
    failed = tmp_path / "06_factorize.failed"
    assert str(failed) in text and "index.html" in text and "rank exploded" in text
    assert (failed / "graph.txt").is_file() and "plan=lowrank@" in (failed / "graph.txt").read_text()
    assert "rank exploded" in (tmp_path / "index.html").read_text()


def test_diff_of_two_pass_folders(dumped, capsys, tmp_path):
    root, _ = dumped
    from tngraph.debug import compare_dumps

    text = compare_dumps(root / "05_allocate", root / "07_fuse")
    assert "tngraph.lowrank.default" in text and text.startswith("---")
    assert main(["dump", "--diff", str(root / "05_allocate"), str(root / "07_fuse")]) == 0
    assert capsys.readouterr().out.strip() == text.strip()
    assert main(["dump", "--diff", str(root / "07_fuse"), str(root / "07_fuse")]) == 0
    assert "no difference" in capsys.readouterr().out
    with pytest.raises(DataError, match="not a pass folder"):
        compare_dumps(tmp_path, root / "07_fuse")
    assert main(["dump", "--diff", str(tmp_path), str(root / "07_fuse")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a pass folder" in err[0]
    assert main(["dump", "--out", str(tmp_path / "x")]) == 2
    assert "needs --model and --out" in capsys.readouterr().err


def test_torch_compile_backend_dumps_each_graph(tmp_path, monkeypatch):
    from tngraph import backend

    torch._dynamo.reset()
    backend.clear_cache()
    monkeypatch.setenv("TNGRAPH_DUMP", str(tmp_path))
    compiled = torch.compile(MLP().eval(), backend="tngraph", options={"budget": 0.6, "fallback": "eager", "calibration": [(torch.randn(8, 24),)]})
    with torch.no_grad():
        compiled(torch.randn(8, 24))
    torch._dynamo.reset()
    graph = tmp_path / "graph_01"
    assert graph.is_dir() and (graph / "index.html").is_file()
    names = _folders(graph)
    assert names[0] == "00_captured" and "01_targets" in names and any(n.endswith("_factorize") for n in names)


def test_structured_trace_artifacts_for_tlparse(tmp_path):
    code = ("import torch, tngraph\n"
            "from tests.conftest import MLP\n"
            "data = [((torch.randn(16, 24),), {}) for _ in range(2)]\n"
            "tngraph.compress(MLP().eval(), calibration=data, config=tngraph.Config(budget=0.6, heal_steps=0, progress=False))\n")
    env = {**os.environ, "TORCH_TRACE": str(tmp_path / "trace"), "PYTHONPATH": os.getcwd()}
    env.pop("TNGRAPH_DUMP", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    logs = "".join(p.read_text() for p in (tmp_path / "trace").iterdir())
    for name in ("tngraph_01_targets", "tngraph_06_factorize", "tngraph_07_fuse"):
        assert f'"name": "{name}"' in logs


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@needs_dot
@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed (make test installs Debian's chromium)")
def test_minilm_dump_renders_in_headless_chromium(tmp_path, capsys):
    """Acceptance: `tngraph dump --model minilm --budget 0.5` writes one folder per changing pass with
    table, diff and SVG, and an index.html that Chromium renders (not blank, no console errors)."""
    import matplotlib.image

    out = tmp_path / "dump"
    argv = ["dump", "--model", "minilm", "--budget", "0.5", "--out", str(out), "--sensitivity", "fisher",
            "--calibration-samples", "64", "--no-eval", "--quiet"]
    assert main(argv) == 0
    assert "report:" in capsys.readouterr().out
    folders = _folders(out)
    assert folders[0] == "00_captured" and folders[-1] == "07_fuse" and len(folders) == 8
    for name in folders:
        assert all((out / name / f).is_file() for f in ("graph.txt", "graph.svg")) and ((out / name / "graph.diff").is_file() or name == "00_captured")
    shot = tmp_path / "shot.png"
    done = subprocess.run([_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,2000",
                           "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", (out / "index.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    pixels = matplotlib.image.imread(str(shot))[..., :3]
    assert pixels.std() > 0.05 and (pixels < 0.9).mean() > 0.05  # not a blank page
    assert main(["dump", "--model", "minilm", "--out", str(out), "--quiet"]) == 2  # exists without --force
    assert "already exists" in capsys.readouterr().err
