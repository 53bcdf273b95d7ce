import math

import pytest

from tngraph import Config, ConfigError


def test_defaults_are_valid_and_frozen():
    cfg = Config()
    assert cfg.budget == 0.5 and cfg.format == "lowrank" and cfg.whiten
    with pytest.raises(Exception):
        cfg.budget = 0.3  # type: ignore[misc]


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ConfigError) as info:
        Config(budgt=0.5)
    text = str(info.value)
    assert "unknown option 'budgt'" in text and "did you mean 'budget'" in text and "calibration_samples" in text


def test_unknown_option_in_replace_and_from_options():
    with pytest.raises(ConfigError, match="unknown option 'colour'"):
        Config().replace(colour="red")
    with pytest.raises(ConfigError, match="unknown option 'x'"):
        Config.from_options({"x": 1})
    assert Config.from_options({"budget": 0.3}, seed=4) == Config(budget=0.3, seed=4)


@pytest.mark.parametrize("budget", [0, -0.1, 1.01, math.nan, "half", True])
def test_budget_out_of_range(budget):
    with pytest.raises(ConfigError, match="budget"):
        Config(budget=budget)


def test_budget_one_is_allowed():
    assert Config(budget=1).budget == 1


@pytest.mark.parametrize(
    "options, word",
    [({"format": "magic"}, "format"), ({"batch_size": 0}, "batch_size"), ({"calibration_samples": 2.5}, "calibration_samples"), ({"damping": -1}, "damping"), ({"include": [1]}, "include"),
     ({"tr_ring": 0}, "tr_ring"), ({"tr_cores": 1}, "tr_cores"), ({"cp_max_iter": 0}, "cp_max_iter"), ({"cp_tol": -1}, "cp_tol"),
     ({"cp_time_limit": 0}, "cp_time_limit"), ({"kron_shape": (4,)}, "kron_shape"), ({"kron_shape": "4by4"}, "kron_shape"),
     ({"monarch_blocks": 0}, "monarch_blocks"), ({"tucker_iters": -1}, "tucker_iters"), ({"targets": "conv"}, "target kind"), ({"targets": ()}, "target kind")],
)
def test_bad_values_name_the_option(options, word):
    with pytest.raises(ConfigError, match=word):
        Config(**options)


def test_pattern_strings_become_tuples():
    assert Config(include="encoder", exclude=["x", "y"]).include == ("encoder",)
    assert Config(exclude=["x", "y"]).exclude == ("x", "y")


def test_dump_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TNGRAPH_DUMP", str(tmp_path))
    assert Config().dump_dir == str(tmp_path)


def test_every_format_and_its_options():
    from tngraph.config import FORMATS
    from tngraph.tn.formats import FORMATS as REGISTRY

    assert set(FORMATS) == {"lowrank", "tucker", "tt", "tr", "cp", "kron", "monarch", "lrbd"}
    assert {("svd" if f == "lowrank" else f) for f in FORMATS} == set(REGISTRY)
    config = Config(format="tr", tr_cores=4, tr_ring=3, tr_als=2, kron_shape="16x8", targets="linear,embedding")
    assert REGISTRY["tr"].options(config) == {"cores": 4, "ring": 3, "als": 2}
    assert REGISTRY["kron"].options(config) == {"shape": (16, 8)}
    assert config.targets == ("linear", "embedding") and Config(targets=["embedding", "linear"]).targets == ("embedding", "linear")
    for fmt in REGISTRY.values():  # every option a format reads is a Config field
        fmt.options(Config())
