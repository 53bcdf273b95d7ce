"""One pipeline, two drivers: the same compress options through the whole-graph driver (compress())
and the block-by-block driver (blockwise.compress_causal_lm) on the trained tiny LM. Each option is
honoured on both, with the same observable effect, or refused by name."""
import json

import pytest

import tngraph
from tngraph.blockwise import compress_causal_lm
from tngraph.data import lm_documents, passages
from tngraph.errors import ConfigError, PassError
from tngraph.models import DECODER_BLOCKS
from tngraph.passes.targets import is_selected

BASE = dict(budget=0.5, heal_steps=0, progress=False, calibration_samples=16, batch_size=4, max_length=32, sensitivity="spectral",
            output_whiten=False, include=(DECODER_BLOCKS,))


@pytest.fixture(scope="module")
def lm(tiny_lm):
    from tngraph import lm as causal

    model, tokenizer, _ = causal.load(tiny_lm[0])
    return tiny_lm[0], model, tokenizer


@pytest.fixture(scope="module")
def texts():
    return passages(lm_documents().train)[:16]


def run(driver, lm, texts, tmp_path, **options):
    """(targets: name -> (format, guard error), the passes' counters) of one driver's run."""
    folder, model, tokenizer = lm
    config = tngraph.Config(**{**BASE, **options})
    if driver == "whole-graph":
        result = tngraph.compress_with_result(model, calibration=texts, tokenizer=tokenizer, config=config)
        errors = result.context.analysis.get("guard", {})
        return {t["name"]: (t["format"], errors.get(t["name"])) for t in result.recipe["targets"]}, dict(result.context.counters)
    result = compress_causal_lm(folder, tmp_path / "art", config, texts=texts, tokenizer=tokenizer, force=True)
    recipe = json.loads((tmp_path / "art" / "recipe.json").read_text())
    return {t["name"]: (t["format"], t["error"]) for t in recipe["targets"]}, result.counters


DRIVERS = ["whole-graph", "block-by-block"]


@pytest.mark.parametrize("driver", DRIVERS)
def test_guard_tolerance_holds_every_written_target(driver, lm, texts, tmp_path):
    targets, counters = run(driver, lm, texts, tmp_path, guard_tolerance=0.35)
    assert targets and all(error is not None and error <= 0.35 for _, error in targets.values()), targets


@pytest.mark.parametrize("driver", DRIVERS)
def test_strict_makes_a_guard_failure_an_error(driver, lm, texts, tmp_path):
    with pytest.raises(PassError, match=r"model\.layers\.\d\.\S+: relative output error .* exceeds guard_tolerance 0\.001"):
        run(driver, lm, texts, tmp_path, guard_tolerance=1e-3, strict=True, allocation="uniform")


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("kind", ["spectral", "fisher", "predicted", "measured"])
def test_every_sensitivity_kind_runs(driver, kind, lm, texts, tmp_path):
    targets, counters = run(driver, lm, texts, tmp_path, sensitivity=kind, output_whiten=kind in ("fisher", "predicted"))
    assert targets and counters.get(f"sensitivity.{kind}", 0) > 0, counters


@pytest.mark.parametrize("driver", DRIVERS)
def test_include_and_exclude_choose_the_targets(driver, lm, texts, tmp_path):
    include, exclude = (r"\.mlp\.",), (r"layers\.0\.",)
    targets, _ = run(driver, lm, texts, tmp_path, include=include, exclude=exclude, allocation="uniform")
    assert targets and all(is_selected(name, include, exclude) for name in targets) and len(targets) == 3  # layer 1's gate, up, down


@pytest.mark.parametrize("driver", DRIVERS)
def test_dense_rows_and_mixture_join_the_candidates(driver, lm, texts, tmp_path):
    _, counters = run(driver, lm, texts, tmp_path, dense_rows=True, mixture=("tucker",))
    assert counters.get("sensitivity.dense_rows.targets", 0) > 0 and counters.get("sensitivity.mixture.targets", 0) > 0, counters


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("fmt", ["tt", "tucker", "lrbd"])
def test_tensor_network_formats(driver, fmt, lm, texts, tmp_path):
    targets, _ = run(driver, lm, texts, tmp_path, format=fmt)
    assert targets and {f for f, _ in targets.values()} == {fmt}


def test_options_block_by_block_cannot_honour_are_refused_by_name(lm, texts, tmp_path):
    folder, _, tokenizer = lm
    heal = tmp_path / "heal.txt"
    heal.write_text("\n".join(texts) + "\n")
    for option, value in (("targets", ("linear", "embedding")), ("heal_data", str(heal))):
        with pytest.raises(ConfigError, match=rf"\({option}\) is not available for block-by-block compression"):
            compress_causal_lm(folder, tmp_path / "x", tngraph.Config(**{**BASE, option: value}), texts=texts, tokenizer=tokenizer)
    assert not (tmp_path / "x").exists()
