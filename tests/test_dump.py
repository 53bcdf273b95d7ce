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
from tngraph.passes import PIPELINE
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


PASSES = [p.__name__ for p in PIPELINE]  # the default pipeline, in order


# the two kinds of failure take turns (a plain exception, wrapped in PassError; a tngraph error, re-raised as its own type)
FAILURES = [(position, ("bug", "tngraph")[position % 2]) for position in range(len(PASSES))]


@pytest.mark.parametrize("position, kind", FAILURES, ids=[f"{PASSES[p]}-{kind}" for p, kind in FAILURES])
def test_a_failure_in_any_pass_leaves_the_passes_before_it_and_index_html(tmp_path, monkeypatch, caplog, position, kind):
    """compress() with a dump folder, the default pipeline's pass at `position` raising."""
    from tngraph.pipeline import run_passes

    name = PASSES[position]
    message = f"{name} broke on purpose"

    def failing(gm, ctx):
        raise RuntimeError(message) if kind == "bug" else DataError(message, "a fix")

    failing.__name__ = name
    assert run_passes.__defaults__ == (PIPELINE, None)  # compress() runs the default pipeline
    monkeypatch.setattr(run_passes, "__defaults__", ([*PIPELINE[:position], failing, *PIPELINE[position + 1:]], None))
    config = tngraph.Config(budget=0.6, heal_steps=0, progress=False, dump_dir=str(tmp_path))
    with caplog.at_level("WARNING", logger="tngraph"), pytest.raises(PassError if kind == "bug" else DataError) as info:
        tngraph.compress(MLP().eval(), calibration=_data(2), config=config)
    text = str(info.value)
    assert f"pass {name!r}" in text and message in text and "after: " + (", ".join(PASSES[:position]) or "none") in text
    failed = f"{position + 1:02d}_{name}.failed"
    assert str(tmp_path / failed) in text
    # every pass of the MLP's pipeline changes the graph: one folder each before the failed one
    before = ["00_captured"] + [f"{i + 1:02d}_{p}" for i, p in enumerate(PASSES[:position])]
    assert _folders(tmp_path) == [*before, failed]
    assert str(tmp_path / "index.html") in text
    page = (tmp_path / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert f"pass {name} failed" in page and message in page and "report incomplete" not in page
    if position > PASSES.index("targets"):  # the targets table of the graph it failed on
        assert all(f"<td>layers.{i}</td>" in page for i in range(3))
    for folder in [*before, failed]:
        assert f'href="#{folder}"' in page and f'id="{folder}"' in page
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [p["folder"] for p in summary["passes"]] == [*before, failed] and summary["passes"][-1]["failed"]
    assert not [r.getMessage() for r in caplog.records if "index.html" in r.getMessage()]


def test_a_failure_dump_that_cannot_be_made_is_said_in_the_page_the_log_and_the_error(tmp_path, monkeypatch, caplog):
    from tngraph.debug import report
    from tngraph.passes import PassContext, calibrate, targets
    from tngraph.pipeline import run_passes

    def calibrate_fails(gm, ctx):
        raise RuntimeError("calibration broke")

    calibrate_fails.__name__ = calibrate.__name__

    def run(folder):
        gm = tngraph.capture(MLP().eval(), (torch.randn(4, 24),))
        ctx = PassContext(config=tngraph.Config(budget=0.6, heal_steps=0, progress=False, dump_dir=str(folder)), calibration=_data(2))
        with caplog.at_level("WARNING", logger="tngraph"), pytest.raises(PassError, match="calibration broke") as info:
            run_passes(gm, ctx, [targets, calibrate_fails])
        return str(info.value)

    def broken(*args, **kwargs):
        raise ValueError("no rows today")

    # a part of the page that fails is left out, the rest is written
    monkeypatch.setattr(report, "target_rows", broken)
    monkeypatch.setattr(report, "pictures", broken)
    text = run(tmp_path / "a")
    page = (tmp_path / "a" / "index.html").read_text()
    assert f"report: {tmp_path / 'a' / 'index.html'}" in text and "calibration broke" in page and 'href="#02_calibrate.failed"' in page
    assert "the targets table left out: ValueError: no rows today" in page and "the pictures left out: ValueError: no rows today" in page
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("targets table left out" in m for m in warned) and any("pictures left out" in m for m in warned)
    # a page that cannot be written at all: the pass's own error still comes, saying so, and the log says why
    caplog.clear()
    monkeypatch.setattr("tngraph.instruments.write_report", broken)
    text = run(tmp_path / "b")
    assert not (tmp_path / "b" / "index.html").exists() and "index.html not written, see the log" in text
    assert (tmp_path / "b" / "02_calibrate.failed" / "graph.txt").is_file()
    assert any("index.html not written: ValueError: no rows today" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    # nor does a failure to dump the graph it failed on hide the pass's error
    from tngraph import instruments

    caplog.clear()
    monkeypatch.undo()
    dump = instruments.write_pass_dump
    monkeypatch.setattr(instruments, "write_pass_dump", lambda *a, failed=False, **k: broken() if failed else dump(*a, failed=failed, **k))
    text = run(tmp_path / "c")
    assert "graph not dumped (ValueError: no rows today)" in text and f"report: {tmp_path / 'c' / 'index.html'}" in text
    assert 'href="#01_targets"' in (tmp_path / "c" / "index.html").read_text()
    assert any("was not dumped: ValueError" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


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
            "--calibration-samples", "64", "--no-eval", "--quiet",
            "--threads", "1"]  # the pytest-xdist worker's one thread: two oversubscribe the CPU beside the other worker
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
