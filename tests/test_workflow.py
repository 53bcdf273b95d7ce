"""tngraph.workflow: one Python call per command, the same report the command line writes; the
compress flags come from Config's field metadata; the block-by-block decision and refusals."""
import importlib
import json
import os

import pytest
import torch

from tngraph import workflow
from tngraph.cli import build_parser, main
from tngraph.config import Config, flags
from tngraph.data import OUTSIDE_PACKAGES
from tngraph.errors import ConfigError

SMALL = dict(heal_steps=0, allocation="uniform", calibration_samples=32, eval_samples=40)
SMALL_ARGS = ["--heal-steps", "0", "--allocation", "uniform", "--calibration-samples", "32", "--eval-samples", "40", "--quiet"]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, minilm):
    from tests.conftest import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), minilm[1])


def test_compress_call_reproduces_the_command_lines_report(tiny_hf, tmp_path, capsys):
    assert main(["compress", "--model", str(tiny_hf), "--out", str(tmp_path / "cli"), *SMALL_ARGS]) == 0
    printed = capsys.readouterr().out
    cli = json.loads((tmp_path / "cli" / "report.json").read_text())
    run = workflow.compress(str(tiny_hf), tmp_path / "py", progress=False, **SMALL)
    assert run.layout == "graph" and run.rank == 0 and run.out == tmp_path / "py"
    saved = json.loads((tmp_path / "py" / "report.json").read_text())
    assert set(run.report) == set(cli) | {"out"} and set(saved) == set(cli)
    assert run.report["out"] == os.path.abspath(tmp_path / "py")
    # the same measurements, not just the same keys (latency and timings are clocks)
    assert json.loads(json.dumps(run.report["agreement"])) == cli["agreement"] == saved["agreement"]
    assert set(cli["agreement"]) == {"compressed", "plain_svd"} and 0 < cli["agreement"]["compressed"]["mean_cos"] <= 1
    # the out-of-domain sentences scored beside the built-in held-out ones, as many, and printed side by side
    inside, outside = cli["agreement"], cli["agreement_outside"]
    assert set(outside) == set(inside) and outside["compressed"]["sentences"] == inside["compressed"]["sentences"] == 40
    # other sentences, other scores: the lossy plain-SVD baseline's (the tiny model's compressed one can be 0.999996 on both)
    assert outside["plain_svd"]["mean_cos"] != inside["plain_svd"]["mean_cos"]
    assert json.loads(json.dumps(run.report["agreement_outside"])) == outside
    # which sets were scored: their sizes, digests, and the versions of the packages the out-of-domain one came from
    sets = run.report["evaluation_sets"]
    assert sets[""]["items"] == sets["_outside"]["items"] == outside["compressed"]["sentences"]
    assert len(sets["_outside"]["sha256"]) == 16 and sets["_outside"]["sha256"] != sets[""]["sha256"] and "packages" not in sets[""]
    assert sets["_outside"]["packages"]["networkx"] and set(sets["_outside"]["packages"]) == set(OUTSIDE_PACKAGES)
    table = next(line for line in printed.splitlines() if "held-out stdlib text" in line)
    assert "other domain: package docs" in table
    row = next(line for line in printed.splitlines() if line.startswith("  tngraph "))
    assert f"{outside['compressed']['mean_cos']:.4f}" in row and f"{inside['compressed']['mean_cos']:.4f}" in row
    for key in ("params", "bytes", "ranks", "per_target", "counters", "targets", "allocation", "budget", "format"):
        assert json.loads(json.dumps(run.report[key])) == cli[key], key
    assert set(run.report["latency"]) == set(cli["latency"]) and run.report["latency"]["threads"] == cli["latency"]["threads"] == 2
    assert set(run.report["timings"]) == set(cli["timings"]) >= {"evaluate", "latency", "total"}
    assert "parameters, targets" in run.summary() and "parameters, targets" in printed
    # `tngraph info` prints the summary of workflow.info
    assert main(["info", str(tmp_path / "py")]) == 0
    assert capsys.readouterr().out == workflow.info(tmp_path / "py").summary() + "\n"


def test_no_eval_reports_no_measurements_and_a_config_object_works_too(tiny_hf, tmp_path, monkeypatch):
    import tngraph.data

    torch.set_num_threads(1)
    # nothing is scored, so the out-of-domain packages are not read
    monkeypatch.setattr(tngraph.data, "outside_sentences", lambda *a, **k: pytest.fail("read the out-of-domain set without --eval"))
    run = workflow.compress(str(tiny_hf), tmp_path / "a", Config(budget=0.3, progress=False, **SMALL), evaluate=False, threads=2)
    # the call ran on its 2 threads and gave the caller's count back (a library call must not leave
    # the process oversubscribed: under pytest-xdist that made every later test several times slower)
    assert torch.get_num_threads() == 1
    assert "agreement" not in run.report and "agreement_outside" not in run.report and "latency" not in run.report
    assert run.config.budget == 0.3 and run.report["params"]["targets_kept"] <= 0.3
    assert len(run.report["per_target"]) == 2 * 6 + 1  # a generic model: every linear, the pooler included


def test_compress_flags_are_generated_from_config_metadata():
    parser = build_parser()
    compress = parser._subparsers._group_actions[0].choices["compress"]  # argparse keeps subparsers here
    declared = {s for a in compress._actions for s in a.option_strings}
    assert all(f.flag in declared for f in flags())
    fields = {f.name for f in flags()}
    assert {"budget", "format", "heal_steps", "include", "dump_dir", "refit", "whiten", "output_whiten"} <= fields
    args = parser.parse_args(["compress", "--model", "m", "--out", "o", "--no-refit", "--tt-cores", "3", "--include", "a", "--include", "b",
                              "--no-dense-rows"])
    assert args.refit is False and args.whiten is None and args.tt_cores == 3 and args.include == ["a", "b"] and args.dense_rows is False
    assert args.budget == 0.5 and args.format == "lowrank" and args.eval_samples == 2000 and args.seed == 0  # the flags' defaults
    assert args.sensitivity is None and Config().sensitivity == "measured"  # left to Config: measured sensitivity by default
    fmt = next(a for a in compress._actions if "--format" in a.option_strings)
    assert list(fmt.choices) == ["svd", "lowrank", "tucker", "tt", "tr", "cp", "kron", "monarch", "lrbd"]  # the registry's
    heal = parser._subparsers._group_actions[0].choices["heal"]
    assert {"--steps", "--lr", "--data"} <= {s for a in heal._actions for s in a.option_strings}
    assert Config(**{f.name: f.default for f in flags() if f.default is not None}) == Config()


def test_block_by_block_refuses_by_name_what_it_cannot_honour(tmp_path):
    """One table (blockwise.UNSUPPORTED, Config field names) plus --resume; nothing is written."""
    from tngraph.blockwise import UNSUPPORTED
    from tngraph.synthetic import write_synthetic_llama

    assert set(UNSUPPORTED) <= {f.name for f in flags()}
    write_synthetic_llama(tmp_path / "llama", hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1, vocab=64, max_positions=32)
    for given, flag in (({"targets": ("linear", "embedding")}, "--targets"), ({"heal_data": "x.txt"}, "--heal-data"), ({"bits": "8,4"}, "--bits"),
                        ({"mlp": "prune"}, "--mlp"), ({"resume": True}, "--resume")):
        with pytest.raises(ConfigError, match="not available for block-by-block") as info:
            workflow.compress(str(tmp_path / "llama"), tmp_path / "out", blockwise=True, progress=False, **given)
        assert str(info.value).startswith(flag), str(info.value)
        assert not (tmp_path / "out").exists()


def test_the_blockwise_decision(tiny_hf, tmp_path):
    from tngraph.models import resolve
    from tngraph.synthetic import write_synthetic_llama

    bert = resolve(str(tiny_hf))
    assert workflow.use_blockwise(str(tiny_hf), bert) is False
    with pytest.raises(ConfigError, match="is not one"):
        workflow.use_blockwise(str(tiny_hf), bert, True)
    write_synthetic_llama(tmp_path / "llama", hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1, vocab=64, max_positions=32)
    llama = resolve(str(tmp_path / "llama"))
    assert workflow.use_blockwise("llama", llama) is True  # no tokenizer in the folder
    assert workflow.use_blockwise("llama", llama, False) is False


def test_threads_and_given_options():
    with pytest.raises(ConfigError, match="--threads must be at least 1"):
        workflow.set_threads(0)
    assert workflow.given_options(Config(budget=0.3), {"seed": 1}) == {"budget": 0.3, "seed": 1}
    assert workflow.given_options(None, {"seed": 1}) == {"seed": 1}


def test_the_report_prints_both_evaluation_sets_side_by_side():
    from tngraph.report import format_table

    def scores(dense, compressed, tokens):
        entry = {"tokens": tokens, "window": 128, "stride": 64}
        return {"dense": {**entry, "perplexity": dense}, "compressed": {**entry, "perplexity": compressed}}

    sizes = {"targets_before": 100, "targets_after": 50, "model_before": 200, "model_after": 150}
    report = {"model": "m", "budget": 0.5, "targets": 2, "format": "lowrank", "timings": {"total": 1.0}, "params": sizes, "bytes": sizes,
              "perplexity": scores(60.0, 63.0, 1000), "perplexity_outside": scores(80.0, 88.0, 990)}
    lines = format_table(report).splitlines()
    assert "1,000 and 990 held-out tokens" in next(line for line in lines if line.startswith("perplexity on"))
    titles = next(line for line in lines if "held-out stdlib text" in line)
    row = next(line for line in lines if line.startswith("  tngraph"))
    assert titles.index("held-out stdlib text") < titles.index("other domain: package docs")
    assert row.split() == ["tngraph", "63.000", "(1.050x)", "88.000", "(1.100x)"]
    report.pop("perplexity_outside")  # one set: one column
    assert "other domain" not in format_table(report)


@pytest.mark.parametrize("stop", [RuntimeError("the scorer broke"), KeyboardInterrupt()])
def test_a_failure_while_scoring_keeps_the_compressed_and_healed_model(tiny_hf, tmp_path, monkeypatch, stop):
    """compress and heal save the model, its report naming the error, before the error goes on: a
    failure (or Ctrl-C) in the scores after minutes of compressing and healing loses nothing."""
    import tngraph
    from tngraph.workflow import measure

    def broken(*args, **kwargs):
        raise stop

    with monkeypatch.context() as patch:
        patch.setattr(measure, "score_report", broken)
        with pytest.raises(type(stop)):
            workflow.compress(str(tiny_hf), tmp_path / "a", progress=False, **SMALL)
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["error"].startswith(f"scoring stopped by {type(stop).__name__}") and "agreement" not in report
    assert report["params"]["targets_after"] < report["params"]["targets_before"]
    model = tngraph.load(tmp_path / "a")
    ids = torch.tensor([[101, 2023, 2003, 102]])
    assert model(input_ids=ids).last_hidden_state.isfinite().all()

    heal_flow = importlib.import_module("tngraph.workflow.heal")  # the package exports a function of that name

    real_scorer, calls = heal_flow.heal_scorer, []

    def scorer(*args, **kwargs):
        key, scores, texts = real_scorer(*args, **kwargs)

        def failing(score):
            def wrapped(model):
                calls.append(model)
                if len(calls) > len(scores):  # the scores before healing pass, the first after it fails
                    raise stop
                return score(model)
            return wrapped

        return key, {suffix: failing(score) for suffix, score in scores.items()}, texts

    monkeypatch.setattr(heal_flow, "heal_scorer", scorer)
    with pytest.raises(type(stop)):
        workflow.heal(tmp_path / "a", tmp_path / "b", steps=2, progress=False)
    healed = json.loads((tmp_path / "b" / "heal.json").read_text())
    assert healed["heal"]["steps"] == 2 and healed["error"].startswith("scoring stopped by")
    assert tngraph.load(tmp_path / "b")(input_ids=ids).last_hidden_state.isfinite().all()
