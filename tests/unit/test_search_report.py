"""The search's winner rule (`search/report.py: choose_winner`): the default point (one expert per task at the
default T and alpha) stays unless a searched trial beats it by more than `search.default_margin`; no Ray.

    .venv/bin/python -m pytest tests/unit/test_search_report.py -q
"""

import pytest
import yaml

from dume_ray.config import ConfigError, load_config
from dume_ray.search.report import choose_winner, write_report

DEFAULT = {"grouping": "copy | reverse | add", "temperature": 1.0, "alpha": 0.5}


def row(trial: int, grouping: str, val_mean, temperature=1.0, alpha=0.5, completed=True) -> dict:
    return {"trial_id": f"t_{trial:05d}", "grouping": grouping, "temperature": temperature, "alpha": alpha,
            "val_mean": val_mean, "reports": 4 if completed else 1, "completed": completed, "cache_hits": 0,
            "cache_misses": 3, "seconds": 1.0, "error": None}


def test_default_stays_when_the_best_searched_trial_gains_no_more_than_the_margin():
    trials = {"seeded": [row(0, DEFAULT["grouping"], 0.40), row(1, "copy+reverse | add", 0.42)]}
    choice = choose_winner(trials, DEFAULT, margin=0.02)
    assert choice["kept_default"] and choice["winner"]["grouping"] == DEFAULT["grouping"]
    assert choice["best_searched"]["grouping"] == "copy+reverse | add"
    assert "+0.020" in choice["reason"] and "the default stays" in choice["reason"]


def test_a_gain_equal_to_the_margin_in_float_arithmetic_is_still_a_tie():
    assert 0.43 - 0.41 > 0.02  # 0.020000000000000018: what a plain comparison would call a win
    trials = {"seeded": [row(0, DEFAULT["grouping"], 0.41), row(1, "copy+reverse | add", 0.43)]}
    assert choose_winner(trials, DEFAULT, margin=0.02)["kept_default"]


def test_a_default_stopped_early_still_anchors_the_rule_with_its_best_report():
    trials = {"seeded": [row(0, DEFAULT["grouping"], 0.40, completed=False), row(1, "copy+reverse | add", 0.41)]}
    choice = choose_winner(trials, DEFAULT, margin=0.02)
    assert choice["default"]["val_mean"] == 0.40 and choice["kept_default"]


def test_searched_trial_wins_when_it_beats_the_default_by_more_than_the_margin():
    trials = {"seeded": [row(0, DEFAULT["grouping"], 0.40), row(1, "copy+reverse | add", 0.43)],
              "random": [row(0, DEFAULT["grouping"], 0.40), row(1, "copy | reverse+add", 0.45)]}
    choice = choose_winner(trials, DEFAULT, margin=0.02)
    assert not choice["kept_default"]
    assert (choice["arm"], choice["winner"]["grouping"]) == ("random", "copy | reverse+add")


def test_same_grouping_at_another_temperature_is_a_searched_trial():
    trials = {"seeded": [row(0, DEFAULT["grouping"], 0.30), row(1, DEFAULT["grouping"], 0.50, temperature=4.0)]}
    choice = choose_winner(trials, DEFAULT, margin=0.02)
    assert not choice["kept_default"] and choice["winner"]["temperature"] == 4.0


def test_margin_zero_is_the_plain_best_trial_with_ties_going_to_the_default():
    trials = {"seeded": [row(0, DEFAULT["grouping"], 0.40), row(1, "copy+reverse | add", 0.40),
                         row(2, "copy | reverse+add", 0.39)]}
    assert choose_winner(trials, DEFAULT, margin=0.0)["kept_default"]
    trials["seeded"].append(row(3, "copy+add | reverse", 0.41))
    choice = choose_winner(trials, DEFAULT, margin=0.0)
    assert not choice["kept_default"] and choice["winner"]["grouping"] == "copy+add | reverse"


def test_trials_stopped_early_do_not_count_against_completed_ones():
    """An ASHA-stopped trial's score is of lower fidelity: it can neither win nor be the default's score."""
    trials = {"seeded": [row(0, DEFAULT["grouping"], 0.40), row(1, "copy+reverse | add", 0.90, completed=False),
                         row(2, "copy | reverse+add", 0.41)]}
    choice = choose_winner(trials, DEFAULT, margin=0.02)
    assert choice["kept_default"] and choice["best_searched"]["grouping"] == "copy | reverse+add"


def test_without_a_measured_default_the_best_trial_wins_and_the_reason_says_so():
    trials = {"seeded": [row(1, "copy+reverse | add", 0.30), row(2, "copy | reverse+add", 0.35)]}
    choice = choose_winner(trials, DEFAULT, margin=0.02)
    assert not choice["kept_default"] and choice["winner"]["grouping"] == "copy | reverse+add"
    assert choice["default"] is None and "no margin rule" in choice["reason"]


def test_no_scored_trial_is_an_error_quoting_the_trial_errors():
    failed = row(0, DEFAULT["grouping"], None) | {"error": "RuntimeError('boom')"}
    with pytest.raises(RuntimeError, match="boom"):
        choose_winner({"seeded": [failed]}, DEFAULT, margin=0.02)


def test_best_yaml_and_report_state_the_rule_and_its_outcome(tmp_path):
    import torch

    cfg = load_config("configs/smoke/tiny.yaml", ["search.default_margin=0.05"])  # tasks copy, reverse, add
    default = {"grouping": "copy | reverse | add", "temperature": cfg.distill.temperature, "alpha": cfg.distill.alpha}
    trials = {"seeded": [row(0, default["grouping"], 0.40, cfg.distill.temperature, cfg.distill.alpha),
                         row(1, "copy+reverse | add", 0.44, 2.0, 0.7)]}
    best = write_report(cfg, str(tmp_path), trials, torch.eye(3), [], {"seeded": 1.0}, default)
    on_disk = yaml.safe_load(open(tmp_path / "best.yaml"))
    assert on_disk == best and best["kept_default"] and best["default_margin"] == 0.05
    assert best["groups"] == [["copy"], ["reverse"], ["add"]] and best["val_mean"] == 0.40
    assert best["best_searched"]["grouping"] == "copy+reverse | add" and best["best_searched"]["val_mean"] == 0.44
    report = open(tmp_path / "report.md").read()
    assert "`search.default_margin` = 0.05" in report and "the default stays" in report
    assert "| best searched | copy+reverse \\| add | 2 | 0.7 | 0.440 |" in report


@pytest.mark.parametrize("value", ["-0.01", "1.5"])
def test_margin_outside_zero_one_is_a_config_error_naming_the_key(value):
    with pytest.raises(ConfigError, match=f"search.default_margin must be in \\[0, 1\\].*got {value}"):
        load_config("configs/smoke/tiny.yaml", [f"search.default_margin={value}"])
