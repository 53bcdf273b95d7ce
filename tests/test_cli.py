"""The command line: a real run on the MiniLM, a local Hugging Face folder, and every bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

import tngraph
from tngraph.cli import main

SMALL = ["--calibration-samples", "32", "--eval-samples", "40", "--quiet"]


def _fail(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0
    assert len(lines) == 1 and lines[0].startswith("tngraph: error:"), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, minilm):
    """A small BERT in a local Hugging Face folder, with the MiniLM's tokenizer."""
    from tests.conftest import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), minilm[1])


def test_compress_minilm_end_to_end(tmp_path):
    """The installed console script, as a user runs it."""
    out = tmp_path / "art"
    exe = os.path.join(os.path.dirname(sys.executable), "tngraph")
    # fisher sensitivity: the default (measured) costs a minute more here; the demo runs it, test_workflow checks it is the default.
    # One thread: beside the other pytest-xdist worker, two would oversubscribe the CPU (3x slower in CI)
    proc = subprocess.run([exe, "compress", "--model", "minilm", "--budget", "0.5", "--out", str(out), "--heal-steps", "20",
                           "--sensitivity", "fisher", "--threads", "1", *SMALL],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for row in ("parameters, targets", "weight bytes, model", "CPU latency (32x128", "mean cos", "plain SVD, uniform ranks", "time per step",
                "tngraph, healed", "tngraph, before healing", "healing: held-out 1 - cos"):
        assert row in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["heal"]["steps"] == 20 and report["heal"]["best_loss"] <= report["heal"]["start_loss"]
    assert report["heal"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --heal-device auto
    assert report["agreement"]["compressed"]["mean_cos"] >= report["agreement"]["unhealed"]["mean_cos"] - 0.01
    assert report["targets"] == 36 and report["params"]["targets_kept"] <= 0.505
    assert report["agreement"]["compressed"]["mean_cos"] > report["agreement"]["plain_svd"]["mean_cos"]
    assert report["latency"]["ratio"] > 0 and report["latency"]["threads"] == 1  # --threads is honoured
    assert set(report["timings"]) >= {"capture", "targets", "calibrate", "allocate", "factorize", "heal", "evaluate", "latency", "total"}
    # the default budgeted allocation may keep some targets dense (8 attention linears here); the recipe lists the factorized ones
    factorized = [name for name, row in report["per_target"].items() if row["format"] != "dense"]
    assert 24 <= len(factorized) <= 36 and report["allocation"] == "budgeted" and report["sensitivity"] == "fisher"
    # the default for a text encoder (mlp="auto"): its six feed-forward blocks pruned by neurons, the rest low rank
    pruned = {name for name, row in report["per_target"].items() if row["format"] == "prune"}
    assert report["mlp_blocks_pruned"] == 6 and pruned == {f"encoder.layer.{i}.{part}.dense" for i in range(6) for part in ("intermediate", "output")}
    assert {row["format"] for row in report["per_target"].values()} == {"prune", "lowrank", "dense"} or len(factorized) == 36
    loaded = tngraph.load(out)
    assert sorted(t["name"] for t in loaded.tngraph_recipe["targets"]) == sorted(factorized)
    info = subprocess.run([exe, "info", str(out)], capture_output=True, text=True, timeout=300)
    assert info.returncode == 0 and "verified" in info.stdout and f"{len(factorized)} targets" in info.stdout


def test_compress_a_local_hugging_face_folder(tiny_hf, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["compress", "--heal-steps", "0", "--model", str(tiny_hf), "--out", str(out), "--budget", "0.3", "--allocation", "uniform", "--no-eval", *SMALL]) == 0
    assert "parameters, targets" in capsys.readouterr().out
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["source"] == {"kind": "hf", "path": str(tiny_hf.resolve())}
    # every linear of a generic model is a target, the pooler included
    assert len(recipe["targets"]) == 2 * 6 + 1
    loaded = tngraph.load(out)
    assert loaded.encoder.layer[0].attention.self.query.rank == recipe["targets"][0]["rank"]


def test_compress_with_pruned_mlp_blocks_reports_the_plain_svd_baseline_too(tiny_hf, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["compress", "--heal-steps", "0", "--model", str(tiny_hf), "--out", str(out), "--mlp", "prune", *SMALL]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mlp_blocks_pruned"] == 2 and report["counters"]["allocate.pruned_blocks"] == 2
    assert "plain_svd" in json.dumps(report)  # the data-free baseline is plain SVD everywhere, blocks included
    recipe = json.loads((out / "recipe.json").read_text())
    assert sum(t["format"] == "prune" for t in recipe["targets"]) == 4
    loaded = tngraph.load(out)
    assert type(loaded.encoder.layer[0].intermediate.dense).__name__ == "PrunedLinear"


def test_calibration_file(tiny_hf, tmp_path, capsys):
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(f"calibration sentence number {i} about things." for i in range(20)), encoding="utf-8")
    assert main(["compress", "--heal-steps", "0", "--model", str(tiny_hf), "--out", str(tmp_path / "a"), "--calibration", str(data), "--no-eval", "--quiet"]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["counters"]["calibrate.batches"] == 1


@pytest.mark.parametrize("budget", ["0", "1.5", "-0.2", "nan", "half"])
def test_bad_budget(budget, tmp_path, capsys):
    line = _fail(capsys, ["compress", "--model", "minilm", "--budget", budget, "--out", str(tmp_path / "o")])
    assert "budget" in line
    assert not (tmp_path / "o").exists()


def test_unknown_option(capsys, tmp_path):
    line = _fail(capsys, ["compress", "--model", "minilm", "--out", str(tmp_path / "o"), "--colour", "red"])
    assert "unrecognized arguments: --colour red" in line


def test_unknown_model_name_or_path(capsys, tmp_path):
    assert "unknown model 'bert-huge'" in _fail(capsys, ["compress", "--model", "bert-huge", "--out", str(tmp_path / "o")])
    (tmp_path / "notamodel").mkdir()
    assert "no config.json" in _fail(capsys, ["compress", "--model", str(tmp_path / "notamodel"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(capsys, tmp_path, tiny_hf):
    (tmp_path / "o").mkdir()
    assert "already exists" in _fail(capsys, ["compress", "--heal-steps", "0", "--model", str(tiny_hf), "--out", str(tmp_path / "o")])
    assert list((tmp_path / "o").iterdir()) == []
    assert main(["compress", "--heal-steps", "0", "--model", str(tiny_hf), "--out", str(tmp_path / "o"), "--force", "--no-eval", "--quiet"]) == 0
    assert (tmp_path / "o" / "recipe.json").is_file()


def test_missing_calibration_file(capsys, tmp_path, tiny_hf):
    line = _fail(capsys, ["compress", "--heal-steps", "0", "--model", str(tiny_hf), "--out", str(tmp_path / "o"), "--calibration", str(tmp_path / "none.txt")])
    assert "does not exist" in line and not (tmp_path / "o").exists()


def test_nan_weights(capsys, tmp_path, tiny_hf):
    from transformers import BertModel

    bad = tmp_path / "nan-bert"
    model = BertModel.from_pretrained(tiny_hf)
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight[0, 0] = float("inf")
    model.save_pretrained(bad)
    for name in os.listdir(tiny_hf):
        if "token" in name or name == "vocab.txt":
            (bad / name).write_bytes((tiny_hf / name).read_bytes())
    line = _fail(capsys, ["compress", "--model", str(bad), "--out", str(tmp_path / "o"), "--no-eval", "--heal-steps", "0"])  # found in the passes: nothing heals
    assert "encoder.layer.1.output.dense.weight" in line and "NaN/Inf" in line
    assert not (tmp_path / "o").exists()


def test_bad_artifacts(capsys, tmp_path, tiny_hf):
    assert "no artifact" in _fail(capsys, ["info", str(tmp_path / "missing")])
    out = tmp_path / "art"
    assert main(["compress", "--heal-steps", "0", "--model", str(tiny_hf), "--out", str(out), "--no-eval", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    capsys.readouterr()
    data = (out / "factors.safetensors").read_bytes()
    (out / "factors.safetensors").write_bytes(data[:-10] + b"0123456789")
    assert "does not match the hash" in _fail(capsys, ["info", str(out)])
    (out / "recipe.json").write_text("garbage")
    assert "corrupt" in _fail(capsys, ["info", str(out)])
    (out / "recipe.json").chmod(0)
    if os.geteuid() != 0:  # root reads any file
        assert "unreadable" in _fail(capsys, ["info", str(out)])


def test_tt_format_from_the_command_line(tiny_hf, tmp_path, capsys):
    out = tmp_path / "tt"
    assert main(["compress", "--heal-steps", "0", "--model", str(tiny_hf), "--out", str(out), "--format", "tt", "--budget", "0.5", "--no-eval", "--quiet"]) == 0
    assert "format tt" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["params"]["targets_kept"] <= 0.5 and report["counters"]["network_linear.applied"] == 13
    loaded = tngraph.load(out)
    assert type(loaded.encoder.layer[0].output.dense).__name__ == "NetworkLinear"
    assert "invalid choice: 'bogus'" in _fail(capsys, ["compress", "--heal-steps", "0", "--model", str(tiny_hf), "--out", str(tmp_path / "x"), "--format", "bogus"])
    assert "unknown target kind 'conv'" in _fail(capsys, ["compress", "--heal-steps", "0", "--model", str(tiny_hf), "--out", str(tmp_path / "x"), "--targets", "linear,conv"])
    assert "kron_shape must be two positive integers" in _fail(capsys, ["compress", "--heal-steps", "0", "--model", str(tiny_hf), "--out", str(tmp_path / "x"), "--format", "kron", "--kron-shape", "4by4"])


def test_ring_format_and_embedding_targets_from_the_command_line(tiny_hf, tmp_path, capsys):
    out = tmp_path / "tr"
    args = ["compress", "--heal-steps", "0", "--model", str(tiny_hf), "--out", str(out), "--format", "tr", "--tr-cores", "2", "--tr-als", "2",
            "--targets", "linear,embedding", "--budget", "0.5", "--no-eval", "--quiet"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["params"]["targets_kept"] <= 0.5
    assert report["counters"]["lowrank_embedding.applied"] >= 1 and report["counters"]["targets.skipped.small_table"] >= 1
    loaded = tngraph.load(out)
    assert type(loaded.embeddings.word_embeddings).__name__ == "LowRankEmbedding"
    assert loaded.tngraph_recipe["config"]["tr_cores"] == 2


def test_budgeted_allocation_options_from_the_command_line(tiny_hf, tmp_path, capsys):
    out = tmp_path / "budgeted"
    args = ["compress", "--heal-steps", "0", "--model", str(tiny_hf), "--out", str(out), "--allocation", "budgeted", "--sensitivity", "predicted",
            "--budget-kind", "bytes", "--dense-rows", "--fisher-batches", "2", "--budget", "0.5", "--no-eval", "--quiet", "--calibration-samples", "64"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["params"]["targets_kept"] <= 0.5 + 1e-9
    rows = report["per_target"]
    # the pruned blocks (the default for a text encoder) carry one curve, not a target's sensitivity
    assert len(rows) == 13 and all(r["sensitivity"]["kind"] == "predicted" and "dense_rows" in r for r in rows.values() if r["format"] != "prune")
    assert report["mlp_blocks_pruned"] == 2 and sum(r["format"] == "prune" for r in rows.values()) == 4
    assert report["counters"]["fisher.batches"] == 2
    tngraph.load(out)
    bad = ["compress", "--heal-steps", "0", "--model", str(tiny_hf), "--out", str(tmp_path / "x")]
    assert "invalid choice: 'flops'" in _fail(capsys, [*bad, "--budget-kind", "flops"])
    assert "needs allocation='budgeted'" in _fail(capsys, [*bad, "--budget-kind", "latency", "--allocation", "uniform"])


def test_heal_command_heals_an_artifact_in_place_or_into_a_new_folder(tiny_hf, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["compress", "--heal-steps", "0", "--model", str(tiny_hf), "--out", str(out), "--budget", "0.2", "--no-whiten",
                 "--allocation", "uniform", "--no-eval", "--quiet"]) == 0
    assert "heal" not in json.loads((out / "recipe.json").read_text())
    capsys.readouterr()
    assert main(["heal", str(out), "--steps", "12", "--lr", "1e-3", "--eval-samples", "40", "--out", str(tmp_path / "healed"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "held-out 1 - cos" in printed and "mean cos" in printed
    healed = tmp_path / "healed"
    summary = json.loads((healed / "heal.json").read_text())
    assert summary["heal"]["best_loss"] < summary["heal"]["start_loss"]
    assert summary["agreement"]["after"]["mean_cos"] > summary["agreement"]["before"]["mean_cos"]
    # the out-of-domain sentences before and after, beside the built-in held-out ones, both printed
    outside = summary["agreement_outside"]
    assert outside["after"]["sentences"] == summary["agreement"]["after"]["sentences"] == 40
    assert outside["after"]["mean_cos"] != summary["agreement"]["after"]["mean_cos"]
    assert "sentences of held-out stdlib text" in printed and "sentences of other domain: package docs" in printed
    recipe = json.loads((healed / "recipe.json").read_text())
    assert recipe["heal"]["steps"] == summary["heal"]["best_step"] > 0
    assert not (tmp_path / "healed.heal-checkpoint").exists()
    a, b = tngraph.load(out), tngraph.load(healed)
    assert not torch.equal(a.encoder.layer[0].attention.self.query.a, b.encoder.layer[0].attention.self.query.a)
    # healing again continues from the healed artifact, in place
    assert main(["heal", str(healed), "--steps", "4", "--no-eval", "--quiet"]) == 0
    assert json.loads((healed / "recipe.json").read_text())["heal"]["held_out_start"] == recipe["heal"]["held_out_start"]
    assert json.loads((healed / "heal.json").read_text())["heal"]["scope"] == "model"
    # one block at a time: --scope blocks reaches healing, and only the blocks' parameters train
    capsys.readouterr()
    assert main(["heal", str(healed), "--steps", "6", "--scope", "blocks", "--no-eval", "--quiet"]) == 0
    summary = json.loads((healed / "heal.json").read_text())["heal"]
    assert summary["scope"] == "blocks" and summary["history"][-1][0] == 6
    assert "of 6, per block, one block at a time" in capsys.readouterr().out


def test_heal_command_errors_are_one_line(tiny_hf, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["compress", "--heal-steps", "0", "--model", str(tiny_hf), "--out", str(out), "--no-eval", "--quiet"]) == 0
    assert "no artifact at" in _fail(capsys, ["heal", str(tmp_path / "nothing")])
    assert "--steps 0 heals nothing" in _fail(capsys, ["heal", str(out), "--steps", "0"])
    assert "does not exist" in _fail(capsys, ["heal", str(out), "--data", str(tmp_path / "none.txt")])
    assert "heal_lr must lie in (0, 1]" in _fail(capsys, ["heal", str(out), "--lr", "-1"])
    assert "invalid choice: 'layers'" in _fail(capsys, ["heal", str(out), "--scope", "layers"])
    assert "no checkpoint to resume" in _fail(capsys, ["heal", str(out), "--scope", "blocks", "--resume", "--no-eval"])
    assert "heal_steps must be" in _fail(capsys, ["compress", "--model", str(tiny_hf), "--out", str(tmp_path / "x"), "--heal-steps", "-2"])
    assert "heal steps must be auto or a whole number, got 'many'" in _fail(capsys, ["heal", str(out), "--steps", "many"])
    assert "heal steps must be auto or a whole number, got 'all'" in _fail(capsys, ["compress", "--model", str(tiny_hf), "--out",
                                                                                    str(tmp_path / "x"), "--heal-steps", "all"])
    assert not (tmp_path / "x").exists()


def test_heal_steps_auto_from_the_command_line_is_timed_and_recorded(tiny_hf, tmp_path, capsys, monkeypatch):
    """--heal-steps auto (the default of compress and of heal): the number the probe chose is what the
    report, the recipe and heal.json record."""
    monkeypatch.setattr(tngraph.heal, "AUTO_STEPS", (4, 8))  # the bounds, small enough for a test
    monkeypatch.setattr(tngraph.heal, "step_seconds", lambda *a, **k: 1e-9)  # a fast device: the most
    out = tmp_path / "art"
    assert main(["compress", "--model", str(tiny_hf), "--out", str(out), "--no-eval", "--no-whiten", "--allocation", "uniform",
                 "--heal-steps", "auto", "--quiet"]) == 0
    assert json.loads((out / "report.json").read_text())["heal"]["steps"] == 8
    assert json.loads((out / "recipe.json").read_text())["config"]["heal_steps"] == 8
    monkeypatch.setattr(tngraph.heal, "step_seconds", lambda *a, **k: 1e9)  # a slow one: the fewest
    assert main(["heal", str(out), "--no-eval", "--quiet"]) == 0
    assert json.loads((out / "heal.json").read_text())["heal"]["steps"] == 4


def test_export_onnx_of_an_artifact_and_the_tensorrt_check(tiny_hf, tmp_path, capsys):
    """`tngraph export onnx` on a compressed artifact: checked file, onnxruntime diffs at three shapes,
    the TensorRT check; `export tensorrt --check-only` passes it without a GPU."""
    import onnx

    art = tmp_path / "art"
    assert main(["compress", "--model", str(tiny_hf), "--budget", "0.5", "--out", str(art), "--no-eval", "--heal-steps", "0", *SMALL]) == 0
    capsys.readouterr()
    out = tmp_path / "tiny.onnx"
    assert main(["export", "onnx", "--model", str(art), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "checker passed" in printed and printed.count("onnxruntime (CPUExecutionProvider) vs PyTorch") == 3
    assert "TensorRT check: 0 errors" in printed
    onnx.checker.check_model(str(out), full_check=True)
    assert main(["export", "tensorrt", "--onnx", str(out), "--check-only", "--quiet"]) == 0
    assert "0 errors" in capsys.readouterr().out
    line = _fail(capsys, ["export", "onnx", "--model", str(art), "--out", str(out), "--quiet"])
    assert "already exists" in line and "--force" in line
    low = tmp_path / "tiny-bf16.onnx"  # bf16: checked through the emulation, bounded relative to the outputs
    assert main(["export", "onnx", "--model", str(art), "--out", str(low), "--dtype", "bf16", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert ", bf16, opset" in printed and printed.count("bf16 emulated in float32) vs float32 PyTorch") == 3
    assert "of the largest value <= tolerance 25%" in printed and "TensorRT check: 0 errors" in printed
    assert low.stat().st_size < 0.7 * out.stat().st_size


def test_export_of_a_quantized_artifact_in_both_onnx_forms(tiny_hf, tmp_path, capsys):
    """A --bits artifact exports as onnxruntime's MatMulNBits by default (which the TensorRT check names,
    with the flag that avoids it) and with --quant-ops standard as ONNX operators TensorRT takes."""
    art = tmp_path / "art"
    assert main(["compress", "--model", str(tiny_hf), "--budget", "0.2", "--bits", "8,4", "--sensitivity", "fisher", "--out", str(art),
                 "--no-eval", "--heal-steps", "0", *SMALL]) == 0
    capsys.readouterr()
    assert main(["export", "onnx", "--model", str(art), "--out", str(tmp_path / "q.onnx"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "com.microsoft::MatMulNBits" in printed and "TensorRT check: 0 errors" not in printed
    assert main(["export", "tensorrt", "--onnx", str(tmp_path / "q.onnx"), "--check-only", "--quiet"]) == 1
    assert "--quant-ops standard" in capsys.readouterr().out
    assert main(["export", "onnx", "--model", str(art), "--out", str(tmp_path / "s.onnx"), "--quant-ops", "standard", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "TensorRT check: 0 errors" in printed and "MatMulNBits" not in printed
    assert "invalid choice" in _fail(capsys, ["export", "onnx", "--model", str(art), "--out", str(tmp_path / "x.onnx"), "--quant-ops", "trt"])


def test_export_errors_are_one_line(tiny_hf, tmp_path, capsys):
    assert "unknown model" in _fail(capsys, ["export", "onnx", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "m.onnx"), "--quiet"])
    assert "does not end in .onnx" in _fail(capsys, ["export", "onnx", "--model", str(tiny_hf), "--out", str(tmp_path / "m.bin"), "--quiet"])
    assert "batch size 1" in _fail(capsys, ["export", "onnx", "--model", str(tiny_hf), "--out", str(tmp_path / "m.onnx"), "--batch", "1", "--quiet"])
    assert "no ONNX file" in _fail(capsys, ["export", "tensorrt", "--onnx", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "m.plan"), "--quiet"])
    assert "MIN,OPT,MAX" in _fail(capsys, ["export", "tensorrt", "--onnx", "x.onnx", "--batch", "1,2", "--quiet"])
    assert not list(tmp_path.iterdir())
    good = tmp_path / "tiny.onnx"
    assert main(["export", "onnx", "--model", str(tiny_hf), "--out", str(good), "--quiet"]) == 0
    capsys.readouterr()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        line = _fail(capsys, ["export", "tensorrt", "--onnx", str(good), "--out", str(tmp_path / "m.plan"), "--quiet"])
        assert "not installed" in line and "pip install" in line
    assert not (tmp_path / "m.plan").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a GPU this machine lacks")
def test_a_heal_device_the_machine_lacks_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["compress", "--model", "minilm", "--out", str(out), "--heal-device", "cuda:1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "heal device 'cuda:1' is not on this machine (torch sees no CUDA GPU here)" in err and "--heal-device auto or cpu" in err
    assert not out.exists()
    assert main(["compress", "--model", "minilm", "--out", str(out), "--heal-device", "gpu", "--quiet"]) == 2
    assert "unknown heal_device 'gpu'" in capsys.readouterr().err
