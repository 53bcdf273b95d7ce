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
    [({"format": "magic"}, "format"), ({"batch_size": 0}, "batch_size"), ({"calibration_samples": 2.5}, "calibration_samples"), ({"damping": -1}, "damping"), ({"include": [1]}, "include")],
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
