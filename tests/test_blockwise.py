"""Causal LMs block by block: lazy shards, sequential calibration, artifacts, load() + generate()."""
import json

import pytest
import torch

import tngraph
from tngraph.blockwise import compress_causal_lm
from tngraph.shards import Shards, causal_lm_config
from tngraph.cli import main
from tngraph.errors import ArtifactError, ConfigError, ModelError
from tngraph.synthetic import write_synthetic_llama


BLOCKS = 2  # decoder blocks of the tiny model: the second calibrates on the first's compressed outputs


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    info = write_synthetic_llama(folder, hidden=64, intermediate=160, layers=BLOCKS, heads=4, kv_heads=2, vocab=512, shard_bytes=300_000,
                                 spectrum_decay=1.0, max_positions=128)
    assert info["shards"] > 1
    return folder


def _dense(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()


def _swap_in_factors(model, artifact, blocks=BLOCKS):
    """The artifact's factors put into `model` by hand, as LowRankLinear layers; returns them."""
    from safetensors.torch import load_file

    from tngraph.modules import LowRankLinear

    factors = {}
    for i in range(blocks):
        factors.update(load_file(str(artifact / f"factors-{i:05d}.safetensors")))
    for name, module in list(model.named_modules()):
        if f"{name}.a" in factors:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, LowRankLinear(factors[f"{name}.a"], factors[f"{name}.b"], None))
    return factors


def _ids(n=2, length=24, seed=5):
    return torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_synthetic_model_is_a_sharded_hugging_face_llama(tiny_llama):
    index = json.loads((tiny_llama / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and causal_lm_config(tiny_llama)["model_type"] == "llama"
    dense = _dense(tiny_llama)
    assert dense.config.num_hidden_layers == BLOCKS and dense(_ids()).logits.shape == (2, 24, 512)


def test_embedding_rows_are_read_in_chunks(tiny_llama, monkeypatch):
    from tngraph import shards as module

    monkeypatch.setattr(module, "EMBEDDING_CHUNK", 100)
    shards = Shards(tiny_llama)
    ids = _ids()
    torch.testing.assert_close(shards.rows("model.embed_tokens.weight", ids), shards.get("model.embed_tokens.weight")[ids])


def test_loaded_model_is_the_source_with_the_artifacts_factors_and_generates(tiny_llama, tmp_path):
    from tngraph.modules import LowRankLinear

    dense = _dense(tiny_llama)
    ids = _ids()
    with torch.no_grad():
        ref = dense(ids).logits
    half = compress_causal_lm(tiny_llama, tmp_path / "half", budget=0.5, calibration_samples=16, max_length=32, progress=False, allocation="uniform")
    assert half.targets == BLOCKS * 7 and 0.4 < half.params_after / half.params_before <= 0.5
    model = tngraph.load(tmp_path / "half")
    assert all(isinstance(model.get_submodule(f"model.layers.{i}.{n}"), LowRankLinear) for i in range(BLOCKS)
               for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"))
    # the same as the dense model with the artifact's factors swapped in by hand
    _swap_in_factors(dense, tmp_path / "half")
    with torch.no_grad():
        got = model(ids).logits
        torch.testing.assert_close(got, dense(ids).logits, atol=1e-6, rtol=1e-6)
    err = _rel(got, ref)
    assert 0 < err < 0.5
    more = compress_causal_lm(tiny_llama, tmp_path / "more", budget=0.9, calibration_samples=16, max_length=32, progress=False, allocation="uniform")
    with torch.no_grad():
        assert _rel(tngraph.load(tmp_path / "more")(ids).logits, ref) < err and more.params_after > half.params_after
    out = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, attention_mask=torch.ones(1, 5, dtype=torch.long))
    assert out.shape == (1, 11) and torch.equal(out[:, :5], ids[:1, :5])


def test_budgeted_blockwise_artifact_loads_to_its_factors(tiny_llama, tmp_path):
    """The default (budgeted) artifact: within the budget, some projections at other ranks than the
    uniform one, dense ones left to the source, and the loaded model is the source with exactly the
    artifact's factors swapped in."""
    result = compress_causal_lm(tiny_llama, tmp_path / "art", budget=0.5, calibration_samples=16, max_length=32, progress=False)
    assert result.params_after <= 0.5 * result.params_before
    recipe = json.loads((tmp_path / "art" / "recipe.json").read_text())
    assert recipe["config"]["allocation"] == "budgeted" and len({t["rank"] for t in recipe["targets"]}) > 2
    model = tngraph.load(tmp_path / "art")
    dense = _dense(tiny_llama)
    factors = _swap_in_factors(dense, tmp_path / "art")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=1e-6, rtol=1e-6)
    kept_dense = [f"model.layers.{i}.{n}" for i in range(BLOCKS) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") if f"model.layers.{i}.{n}.a" not in factors]
    assert kept_dense and all(type(model.get_submodule(n)) is torch.nn.Linear for n in kept_dense)


def test_block_healing_lowers_each_blocks_held_out_error_and_is_what_loads(tiny_llama, tmp_path):
    """heal_steps: each block's factors are fine-tuned to the dense model's hidden states; the held-out
    calibration batch's error never rises (the best factors are kept) and falls overall; the written
    factors are the healed ones, and the recipe says how they were healed."""
    from safetensors.torch import load_file

    plain = compress_causal_lm(tiny_llama, tmp_path / "plain", budget=0.5, calibration_samples=16, max_length=32, progress=False)
    healed = compress_causal_lm(tiny_llama, tmp_path / "healed", budget=0.5, calibration_samples=16, max_length=32, progress=False,
                                heal_steps=40, heal_lr=1e-3)
    assert not plain.healed and len(healed.healed) == BLOCKS
    assert all(after <= before for before, after in healed.healed) and sum(a for _, a in healed.healed) < sum(b for b, _ in healed.healed)
    recipe = json.loads((tmp_path / "healed" / "recipe.json").read_text())
    assert recipe["config"]["heal"] == {"steps": 40, "lr": 1e-3, "scope": "block"}
    assert healed.params_after == plain.params_after  # the same ranks, other values
    first = load_file(str(tmp_path / "healed" / "factors-00000.safetensors"))
    assert any(not torch.equal(v, load_file(str(tmp_path / "plain" / "factors-00000.safetensors"))[k]) for k, v in first.items())
    model = tngraph.load(tmp_path / "healed")
    name = next(k for k in first if k.endswith(".a"))[: -len(".a")]
    torch.testing.assert_close(model.get_submodule(name).a.detach(), first[name + ".a"])
    with pytest.raises(ConfigError, match="heal_steps"):
        compress_causal_lm(tiny_llama, tmp_path / "x", heal_steps=-1, progress=False)


@pytest.mark.parametrize("allocation", ["budgeted", "uniform"])
def test_a_nan_weight_is_an_error_naming_the_projection(tiny_llama, tmp_path, allocation):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    key = "model.layers.1.mlp.up_proj.weight"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][key]
    tensors = load_file(str(shard))
    tensors[key][3, 5] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="the weight of model.layers.1.mlp.up_proj holds NaN"):
        compress_causal_lm(folder, tmp_path / "art", budget=0.5, calibration_samples=4, max_length=16, progress=False, allocation=allocation)
    assert not (tmp_path / "art").exists()


def test_whitened_on_the_data_it_sees_beats_plain_svd_there(tiny_llama, tmp_path):
    """Calibration matters: the compressed model's error on its calibration distribution is lower than
    a data-free truncated SVD's at the same ranks."""
    from tngraph.modules import LowRankLinear
    from tngraph.tn.lowrank import decompose_lowrank

    compress_causal_lm(tiny_llama, tmp_path / "art", budget=0.5, calibration_samples=16, max_length=32, seed=3, progress=False, allocation="uniform")
    ours = tngraph.load(tmp_path / "art")
    plain = _dense(tiny_llama)
    for name, module in list(ours.named_modules()):
        if isinstance(module, LowRankLinear):
            linear = plain.get_submodule(name)
            a, b = decompose_lowrank(linear.weight.detach(), module.rank)
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, LowRankLinear(a, b, None))
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(3))  # the calibration ids' generator
    with torch.no_grad():
        ref = _dense(tiny_llama)(ids).logits
        assert _rel(ours(ids).logits, ref) < _rel(plain(ids).logits, ref)


def test_same_inputs_give_the_same_artifact_bytes(tiny_llama, tmp_path):
    for name in ("a", "b"):
        compress_causal_lm(tiny_llama, tmp_path / name, budget=0.5, calibration_samples=8, max_length=16, progress=False)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and f"factors-{BLOCKS - 1:05d}.safetensors" in files
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_bad_inputs_and_tampered_artifacts(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="budget"):
        compress_causal_lm(tiny_llama, tmp_path / "x", budget=0)
    with pytest.raises(ModelError, match="not a"):
        compress_causal_lm(tmp_path, tmp_path / "x")
    compress_causal_lm(tiny_llama, tmp_path / "art", budget=0.5, calibration_samples=4, max_length=16, progress=False)
    with pytest.raises(ArtifactError, match="already exists"):
        compress_causal_lm(tiny_llama, tmp_path / "art", budget=0.5, calibration_samples=4, max_length=16, progress=False)
    factors = tmp_path / "art" / "factors-00001.safetensors"
    data = factors.read_bytes()
    factors.write_bytes(data[:-10])
    with pytest.raises(ArtifactError, match="does not match the hash"):
        tngraph.load(tmp_path / "art")
    factors.write_bytes(data)
    recipe = json.loads((tmp_path / "art" / "recipe.json").read_text())
    recipe["source_hash"] = "0" * 64
    (tmp_path / "art" / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(ArtifactError, match="different source model"):
        tngraph.load(tmp_path / "art")


def test_command_line_routes_causal_lms_block_by_block(tiny_llama, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["compress", "--model", str(tiny_llama), "--out", str(out), "--budget", "0.5", "--calibration-samples", "4", "--quiet"]) == 0
    printed = capsys.readouterr().out
    recipe = json.loads((out / "recipe.json").read_text())
    assert "block by block" in printed and f"{len(recipe['targets'])} targets" in printed and recipe["config"]["allocation"] == "budgeted"
    assert main(["info", str(out)]) == 0 and "hf-causal" in capsys.readouterr().out
    assert main(["compress", "--model", str(tiny_llama), "--out", str(tmp_path / "u"), "--budget", "0.5", "--calibration-samples", "4",
                 "--allocation", "uniform", "--quiet"]) == 0
    assert f"{BLOCKS * 7} targets" in capsys.readouterr().out
    assert main(["compress", "--model", str(tiny_llama), "--out", str(tmp_path / "h"), "--budget", "0.5", "--calibration-samples", "8",
                 "--heal-steps", "5", "--quiet"]) == 0
    assert "5 healing steps per block" in capsys.readouterr().out
    assert json.loads((tmp_path / "h" / "recipe.json").read_text())["config"]["heal"]["steps"] == 5
    # a tensor-network format runs block by block too (the same factorize pass)
    assert main(["compress", "--model", str(tiny_llama), "--out", str(tmp_path / "t"), "--format", "tt", "--calibration-samples", "4",
                 "--quiet"]) == 0
    assert {t["format"] for t in json.loads((tmp_path / "t" / "recipe.json").read_text())["targets"]} == {"tt"}
    capsys.readouterr()
    assert main(["compress", "--model", str(tiny_llama), "--out", str(tmp_path / "b"), "--targets", "linear,embedding", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--targets (targets) is not available for block-by-block" in err and not (tmp_path / "b").exists()


def test_two_gloo_processes_write_the_same_artifact_bytes_as_one(tiny_llama, tmp_path):
    """torchrun --nproc-per-node 2 -m tngraph compress: the decompositions are shared between the
    ranks (gloo), the artifact is byte-identical to a one-process run with the same thread count."""
    import os
    import subprocess
    import sys

    args = ["compress", "--model", str(tiny_llama), "--budget", "0.5", "--calibration-samples", "4", "--quiet", "--threads", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    one = subprocess.run([sys.executable, "-m", "tngraph", *args, "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    # as on a machine with CUDA: the group must still be gloo (the block tensors are on the CPU); before, it was
    # NCCL, which fails to start here (no GPU) and on a GPU machine cannot broadcast the CPU tensors
    cuda = tmp_path / "as_if_cuda.py"
    cuda.write_text("import sys, torch\ntorch.cuda.is_available = lambda: True\nfrom tngraph.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(cuda), *args,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "on 2 processes" in two.stdout and two.stdout.count("artifact:") == 1
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f


def test_the_guard_runs_block_by_block(tiny_llama, tmp_path):
    """The guard of the whole-graph pipeline, per block: every factorized target's recorded error is
    its relative output error on the calibration inputs; with a tolerance, no written target is over
    it and the budget holds (the guard's dense targets are made up for by the others, for budgeted
    and uniform allocation alike); strict makes it an error naming the layer; nothing is written then."""
    from tngraph.errors import PassError

    loose = compress_causal_lm(tiny_llama, tmp_path / "loose", budget=0.5, calibration_samples=8, max_length=16, progress=False)
    errors = [t["error"] for t in json.loads((tmp_path / "loose" / "recipe.json").read_text())["targets"]]
    assert all(0 < e < 1 for e in errors)
    tolerance = sorted(errors)[len(errors) // 2]  # half of the default plan's targets are over it
    tight = compress_causal_lm(tiny_llama, tmp_path / "tight", budget=0.5, calibration_samples=8, max_length=16, progress=False,
                               guard_tolerance=tolerance)
    recipe = json.loads((tmp_path / "tight" / "recipe.json").read_text())
    assert recipe["config"]["guard_tolerance"] == tolerance and recipe["config"]["allocation"] == "budgeted"
    assert recipe["targets"] and all(t["error"] <= tolerance for t in recipe["targets"])
    assert tight.params_after <= 0.5 * tight.params_before
    # uniform ranks cannot plan around it: the guard keeps layers dense, and the others cannot make up for them here
    with pytest.raises(ConfigError, match=r"block 0: the numerical guard kept model\.layers\.0\.\S+.* dense, and then budget 0\.5"):
        compress_causal_lm(tiny_llama, tmp_path / "u", budget=0.5, calibration_samples=8, max_length=16, progress=False, allocation="uniform",
                           guard_tolerance=tolerance)
    assert max(errors) > tolerance  # the default plan had targets over it: the tight ones are other plans
    with pytest.raises(PassError, match=r"block \d: model\.layers\.\d\.\S+: relative output error .* exceeds guard_tolerance"):
        compress_causal_lm(tiny_llama, tmp_path / "s", budget=0.5, calibration_samples=8, max_length=16, progress=False, allocation="uniform",
                           guard_tolerance=tolerance, strict=True)
    assert not (tmp_path / "s").exists() and not (tmp_path / "u").exists()


def test_include_exclude_and_plain_svd_block_by_block(tiny_llama, tmp_path):
    from tngraph.modules import LowRankLinear
    from tngraph.tn.lowrank import decompose_lowrank

    compress_causal_lm(tiny_llama, tmp_path / "mlp", budget=0.5, calibration_samples=4, max_length=16, progress=False, allocation="uniform",
                       include=[r"\.mlp\."], exclude=[r"layers\.0\."])
    names = [t["name"] for t in json.loads((tmp_path / "mlp" / "recipe.json").read_text())["targets"]]
    assert names and all(".mlp." in n and not n.startswith("model.layers.0.") for n in names) and len(names) == (BLOCKS - 1) * 3
    with pytest.raises(ConfigError, match="no layer of the model is a target"):
        compress_causal_lm(tiny_llama, tmp_path / "none", budget=0.5, calibration_samples=4, max_length=16, progress=False, include=["nothing"])
    compress_causal_lm(tiny_llama, tmp_path / "plain", budget=0.5, calibration_samples=4, max_length=16, progress=False, allocation="uniform", whiten=False)
    model, dense = tngraph.load(tmp_path / "plain"), _dense(tiny_llama)
    assert json.loads((tmp_path / "plain" / "recipe.json").read_text())["config"]["whiten"] is False
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):  # exactly the data-free truncated SVD of the dense weight
            a, b = decompose_lowrank(dense.get_submodule(name).weight.detach(), module.rank)
            torch.testing.assert_close(module.a @ module.b, a @ b, atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked == BLOCKS * 7


@pytest.mark.parametrize("flag", [["--targets", "linear,embedding"], ["--resume"], ["--heal-data", "x.txt"], ["--mlp", "prune"], ["--heal-scope", "model"],
                                  ["--heal-device", "cuda"], ["--heal-steps", "auto"]])
def test_what_block_by_block_cannot_honour_is_refused_by_name(tiny_llama, tmp_path, capsys, flag):
    assert main(["compress", "--model", str(tiny_llama), "--out", str(tmp_path / "o"), "--blockwise", *flag, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{flag[0]}" in err and "not available for block-by-block" in err and "--no-blockwise" in err
    assert not (tmp_path / "o").exists()


def test_whole_graph_options_work_block_by_block_from_the_command_line(tiny_llama, tmp_path, capsys):
    """Options the block-by-block path used to refuse now run there (the same passes): a dump folder
    per block, fisher sensitivity refined end to end, patch-level rows; the recipe records them."""
    out, dump = tmp_path / "o", tmp_path / "dump"
    assert main(["compress", "--model", str(tiny_llama), "--out", str(out), "--blockwise", "--sensitivity", "fisher", "--dense-rows",
                 "--refine", "1", "--fisher-batches", "2", "--dump", str(dump), "--calibration-samples", "4", "--quiet"]) == 0
    config = json.loads((out / "recipe.json").read_text())["config"]
    assert config["sensitivity"] == "fisher" and config["dense_rows"] is True and config["fisher_batches"] == 2 and config["refine"] == 1
    assert sorted(p.name for p in dump.iterdir() if p.is_dir()) == [f"block_{i:03d}" for i in range(BLOCKS)]
    assert any(p.name.endswith("_factorize") for p in (dump / "block_000").iterdir())
