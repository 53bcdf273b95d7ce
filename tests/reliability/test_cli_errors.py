"""Every user error on the command line is one line naming the problem and the fix, exit code 2,
never a traceback; a bug is one line too (exit 1), with the traceback on request."""
import json

import pytest

from tngraph.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, minilm):
    from tests.conftest import write_tiny_bert

    root = tmp_path_factory.mktemp("bad-inputs")
    bert = write_tiny_bert(root / "bert", minilm[1], layers=1, positions=64)
    (root / "empty.txt").write_text("")
    (root / "binary.bin").write_bytes(bytes(range(256)))
    (root / "noconfig").mkdir()
    broken = root / "broken-config"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    art = root / "art"
    assert main(["compress", "--model", str(bert), "--out", str(art), "--no-eval", "--heal-steps", "0", "--quiet",
                 "--calibration-samples", "16", "--allocation", "uniform"]) == 0
    tampered = root / "tampered"
    import shutil

    shutil.copytree(art, tampered)
    data = bytearray((tampered / "factors.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tampered / "factors.safetensors").write_bytes(bytes(data))
    truncated = root / "truncated"
    shutil.copytree(art, truncated)
    blob = (truncated / "factors.safetensors").read_bytes()
    (truncated / "factors.safetensors").write_bytes(blob[: len(blob) // 2])
    badrecipe = root / "badrecipe"
    shutil.copytree(art, badrecipe)
    (badrecipe / "recipe.json").write_text("[]")
    other = root / "other-source"
    shutil.copytree(art, other)
    recipe = json.loads((other / "recipe.json").read_text())
    recipe["source_hash"] = "0" * 64
    (other / "recipe.json").write_text(json.dumps(recipe))
    return root


# (argv with {root}, fragment of the one error line): the bad inputs the reliability note lists
BAD = [
    (["compress", "--model", "{root}/nope", "--out", "{root}/o"], "no such folder"),
    (["compress", "--model", "{root}/noconfig", "--out", "{root}/o"], "no config.json"),
    (["compress", "--model", "{root}/broken-config", "--out", "{root}/o"], "cannot load a model"),
    (["compress", "--model", "{root}/bert", "--out", "{root}/o", "--budget", "0"], "budget"),
    (["compress", "--model", "{root}/bert", "--out", "{root}/o", "--budget", "nan"], "budget"),
    (["compress", "--model", "{root}/bert", "--out", "{root}/o", "--budget", "abc"], "budget must be a number"),
    (["compress", "--model", "{root}/bert", "--out", "{root}/o", "--tt-cores", "99", "--format", "tt"], "tt_cores"),
    (["compress", "--model", "{root}/bert", "--out", "{root}/o", "--calibration", "{root}/empty.txt"], "holds no samples"),
    (["compress", "--model", "{root}/bert", "--out", "{root}/o", "--calibration", "{root}/binary.bin"], "binary"),
    (["compress", "--model", "{root}/bert", "--out", "{root}/o", "--calibration", "{root}/missing.txt"], "does not exist"),
    (["compress", "--model", "{root}/bert", "--out", "{root}/o", "--include", "("], "not a regular expression"),
    (["compress", "--model", "{root}/bert", "--out", "{root}/o", "--include", "nothing-matches"], "no layer of the model is a target"),
    (["compress", "--model", "{root}/bert", "--out", "{root}/o", "--guard-tolerance", "-1"], "guard_tolerance"),
    (["compress", "--model", "{root}/bert", "--out", "{root}/o", "--threads", "0"], "--threads"),
    (["compress", "--model", "{root}/bert", "--out", "{root}/art"], "already exists"),
    (["compress", "--model", "{root}/bert", "--out", "{root}/o", "--bogus"], "unrecognized arguments"),
    (["compress", "--model", "{root}/bert", "--out", "{root}/o", "--blockwise"], "not one"),
    (["info", "{root}/nope"], "no artifact"),
    (["info", "{root}/tampered"], "hash"),
    (["info", "{root}/truncated"], "hash|corrupt|truncated"),
    (["info", "{root}/badrecipe"], "not a tngraph recipe"),
    (["info", "{root}/other-source"], "different source model"),
    (["heal", "{root}/art", "--steps", "0"], "heals nothing"),
    (["heal", "{root}/art", "--data", "{root}/empty.txt"], "holds no samples"),
    (["eval", "--model", "{root}/bert"], "not a causal LM"),
    (["eval", "--model", "{root}/art"], "not a causal LM"),
    (["export", "onnx", "--model", "{root}/nope", "--out", "{root}/x.onnx"], "no such folder|no artifact|not a"),
    (["dump", "--out", "{root}/d"], "needs --model"),
]


@pytest.mark.parametrize("argv,fragment", BAD, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD])
def test_user_errors_are_one_line_with_the_fix(files, capsys, argv, fragment):
    import re

    rc = main([part.format(root=files) for part in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("tngraph: error:") and "Traceback" not in err, err
    assert re.search(fragment, lines[0]), lines[0]
    assert not (files / "o").exists()


def test_a_bug_is_one_line_unless_the_traceback_is_asked_for(files, capsys, monkeypatch):
    import tngraph.api

    def broken(*args, **kwargs):
        raise RuntimeError("something deep inside")

    monkeypatch.setattr(tngraph.api, "capture", broken)
    argv = ["compress", "--model", str(files / "bert"), "--out", str(files / "o"), "--no-eval", "--heal-steps", "0", "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: RuntimeError: something deep inside" in err and "-v" in err
    monkeypatch.setenv("TNGRAPH_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="something deep inside"):
        main(argv)
