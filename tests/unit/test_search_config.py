"""The `search` config section: bad input stops with a ConfigError naming the key before any trial, and
`grouping=from_search` feeds a search's best.yaml into the pipeline (or says clearly that there is none).

    .venv/bin/python -m pytest tests/unit/test_search_config.py -q
"""

import pytest
import yaml

from dume_ray.config import ConfigError, load_config

TINY = "configs/smoke/tiny.yaml"  # tasks copy, reverse, add


@pytest.mark.parametrize("override, message", [
    ("search.num_samples=0", "search.num_samples must be >= 1"),
    ("search.max_groups=0", "search.max_groups must be >= 1"),
    ("search.temperature=[0,4]", r"search.temperature: both bounds must be > 0"),
    ("search.temperature=[-1,4]", r"search.temperature: both bounds must be > 0"),
    ("search.temperature=[4,2]", "empty range"),
    ("search.alpha=[0.2,1.5]", r"search.alpha: both bounds must be in \[0, 1\]"),
    ("search.groupings=['copy+upper | reverse | add']", r"search.groupings\[0\].*unknown task\(s\) \['upper'\]"),
    ("search.groupings=['copy | reverse']", "exactly one non-empty group"),
    ("search.report_every=500", "search.report_every must be in"),
    ("grouping=best", "grouping must be 'config' or 'from_search'"),
])
def test_bad_search_input_is_a_config_error_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])


def test_group_cap_that_excludes_every_listed_grouping_is_an_empty_space():
    with pytest.raises(ConfigError, match="empty search space"):
        load_config(TINY, ["search.groupings=['copy | reverse | add']", "search.max_groups=2"])


def test_search_yaml_loads():
    cfg = load_config("configs/search.yaml")
    assert cfg.search.num_samples >= 2 and cfg.grouping == "config"


def test_from_search_without_a_result_says_how_to_get_one(tmp_path):
    with pytest.raises(ConfigError, match="no search result at .*dume_ray search"):
        load_config(TINY, ["grouping=from_search", f"runs_dir={tmp_path}"])


def test_from_search_overrides_groups_temperature_and_alpha(tmp_path):
    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump({"grouping": "copy+add | reverse", "groups": [["copy", "add"], ["reverse"]],
                                    "temperature": 3.5, "alpha": 0.7}))
    cfg = load_config(TINY, ["grouping=from_search", f"search.best_path={best}"])
    assert cfg.experts.groups == [["copy", "add"], ["reverse"]]
    assert (cfg.distill.temperature, cfg.distill.alpha) == (3.5, 0.7)
    assert list(cfg.groups) == ["copy+add", "reverse"]


def test_from_search_result_naming_an_unknown_task_is_rejected(tmp_path):
    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump({"groups": [["copy", "upper"], ["reverse", "add"]], "temperature": 2.0, "alpha": 0.5}))
    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['upper'\]"):
        load_config(TINY, ["grouping=from_search", f"search.best_path={best}"])
