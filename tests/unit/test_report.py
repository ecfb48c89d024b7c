"""Report building, Markdown rendering and the PNG chart, on hand-made scores.

Run: cd /work/main && .venv/bin/python -m pytest tests/unit/test_report.py -q
"""

from __future__ import annotations

import math

import pytest

from dume_ray.eval.report import build_report, plot_report, provenance, render_markdown

TASKS = ["copy", "reverse", "add"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scores(student=(0.9, 0.6, 0.3), multitask=(0.8, 0.5, 0.2)):
    return {
        "base": dict(zip(TASKS, (0.0, 0.1, 0.2))),
        "experts": dict(zip(TASKS, (1.0, 0.8, 0.6))),
        "student": dict(zip(TASKS, student)),
        "multitask": dict(zip(TASKS, multitask)),
    }


def test_build_report_means_are_per_model_task_averages():
    report = build_report(_scores(), TASKS, "test")
    assert report["means"]["base"] == pytest.approx(0.1)
    assert report["means"]["experts"] == pytest.approx(0.8)
    assert report["means"]["student"] == pytest.approx(0.6)
    assert report["means"]["multitask"] == pytest.approx(0.5)
    assert report["models"] == ["base", "experts", "student", "multitask"]


def test_build_report_mean_ignores_missing_and_nan_scores():
    scores = {"student": {"copy": 0.5, "reverse": float("nan")}, "multitask": {"copy": 0.1, "reverse": 0.3, "add": 0.5}}
    report = build_report(scores, TASKS, "test")
    assert report["means"]["student"] == pytest.approx(0.5)
    assert report["means"]["multitask"] == pytest.approx(0.3)


def test_build_report_student_minus_multitask_and_pct_of_experts():
    report = build_report(_scores(), TASKS, "validation")
    assert report["student_minus_multitask"] == pytest.approx(0.1)
    assert report["student_pct_of_experts"] == pytest.approx(75.0)


def test_build_report_omits_comparisons_without_the_models():
    report = build_report({"base": {"copy": 0.5}}, ["copy"], "test")
    assert "student_minus_multitask" not in report
    assert "student_pct_of_experts" not in report


def test_build_report_omits_pct_when_experts_score_zero():
    scores = _scores()
    scores["experts"] = dict.fromkeys(TASKS, 0.0)
    assert "student_pct_of_experts" not in build_report(scores, TASKS, "test")


def test_render_markdown_has_a_row_per_task_the_mean_and_beats_verdict():
    report = build_report(_scores(), TASKS, "test", settings={"alpha": 0.5}, timings={"distill": 12.34})
    text = render_markdown(report)
    lines = text.splitlines()
    for task in TASKS:
        assert sum(1 for line in lines if line.startswith(f"| {task} |")) == 1, task
    mean_row = next(line for line in lines if line.startswith("| **mean** |"))
    assert "0.600" in mean_row and "0.500" in mean_row and "+0.100" in mean_row
    assert "**beats** the multitask baseline" in text
    assert "+10.0 points" in text
    assert "75.0%" in text
    assert "alpha: 0.5" in text and "distill: 12.3" in text


def test_render_markdown_says_does_not_beat_when_student_is_worse():
    report = build_report(_scores(student=(0.1, 0.1, 0.1)), TASKS, "test")
    text = render_markdown(report)
    assert "**does not beat** the multitask baseline" in text
    assert "**beats**" not in text


def test_render_markdown_says_does_not_beat_on_a_tie():
    report = build_report(_scores(student=(0.8, 0.5, 0.2)), TASKS, "test")
    assert "**does not beat**" in render_markdown(report)


def test_render_markdown_shows_dash_for_missing_score():
    scores = _scores()
    del scores["student"]["add"]
    row = next(l for l in render_markdown(build_report(scores, TASKS, "test")).splitlines() if l.startswith("| add |"))
    assert "–" in row


def test_plot_report_writes_non_empty_png(tmp_path):
    scores = _scores()
    scores["student"]["add"] = math.nan  # NaN/missing scores must not break the chart
    path = tmp_path / "report.png"
    returned = plot_report(build_report(scores, TASKS, "test"), str(path))
    assert returned == str(path)
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_MAGIC


def test_upcycle_section_compares_dume_with_oracle_and_rivals_and_states_the_paper_claim():
    scores = {"experts": {"a": 1.0, "b": 0.8}, "dume": {"a": 0.9, "b": 0.72}, "oracle": {"a": 1.0, "b": 0.8},
              "weight_average": {"a": 0.1, "b": 0.0}, "random": {"a": 0.2, "b": 0.1}}
    upcycle = {"variants": {"dume[token]": {"a": 0.5, "b": 0.5}}, "routing": "sequence_mean", "normalize_columns": False,
               "ridge_lambda": 0.01, "top_k": 1, "experts_trained_mlp_only": True, "moe_parameters": 300,
               "moe_active_parameters_per_token": 120, "student_parameters": 100}
    report = build_report(scores, ["a", "b"], "test", upcycle=upcycle)
    assert report["models"][:2] == ["experts", "dume"]
    assert report["upcycle"]["dume_pct_of_oracle"] == pytest.approx(90.0)
    assert report["upcycle"]["dume_beats_weight_average"] and report["upcycle"]["dume_beats_random"]
    text = render_markdown(report)
    assert "keeps **90.0%** of oracle routing" in text and "97.6%" in text and "102.1%" in text
    assert "MoE 300 in all, 120 active per token; student 100" in text and "| dume[token] | 0.500 |" in text


def test_difference_standard_error_is_the_binomial_se_of_the_task_mean():
    from dume_ray.eval.report import difference_standard_error
    a, b = {"copy": 0.5, "add": 0.2}, {"copy": 0.5, "add": 0.6}
    # Var(mean) = (1/T^2) * sum over tasks and models of p(1-p)/n, T = 2 tasks.
    expected = math.sqrt((0.25 / 100 + 0.16 / 50 + 0.25 / 100 + 0.24 / 50) / 4)
    assert difference_standard_error(a, b, ["copy", "add"], {"copy": 100, "add": 50}) == pytest.approx(expected)
    assert math.isnan(difference_standard_error(a, b, ["copy", "add"], {}))


@pytest.mark.parametrize("num_test, verdict", [(10, "is within noise of"), (10_000, "beats")])
def test_student_verdict_needs_two_standard_errors(num_test, verdict):
    # +0.10 difference: SE ~0.10 with 10 examples a task (within noise), ~0.003 with 10,000 (beats).
    report = build_report(_scores(), TASKS, "test", num_examples=dict.fromkeys(TASKS, num_test))
    text = render_markdown(report)
    assert f"**{verdict}** the multitask baseline" in text
    assert "+10.0 ± " in text and "standard error" in text


def test_student_verdict_does_not_beat_when_clearly_worse():
    report = build_report(_scores(student=(0.1, 0.1, 0.1)), TASKS, "test", num_examples=dict.fromkeys(TASKS, 10_000))
    assert "**does not beat**" in render_markdown(report)
    assert report["student_minus_multitask_se"] == pytest.approx(
        math.sqrt(sum(p * (1 - p) / 10_000 for p in (0.1, 0.1, 0.1, 0.8, 0.5, 0.2)) / 9))


def test_provenance_marks_what_this_run_trained_and_what_it_reused():
    manifests = {"base": {"run_id": "old-1", "finished_at": "t0"},
                 "experts/copy": {"finished_at": "t0"},  # written before run ids were recorded: an older run's
                 "experts/sort": {"run_id": "now-2", "finished_at": "t1"},
                 "student": {"run_id": "now-2", "finished_at": "t2", "inputs": {"continues": "abc"}, "metrics": {"steps": 150}},
                 "multitask": None}  # not finished: not listed
    found = provenance(manifests, "now-2")
    assert {k: v["status"] for k, v in found.items()} == {"base": "reused", "experts/copy": "reused",
                                                          "experts/sort": "trained in this run",
                                                          "student": "trained in this run"}
    assert found["student"]["continues"] == "abc" and found["student"]["steps"] == 150 and "continues" not in found["base"]
    report = build_report({"student": {"a": 1.0}}, ["a"], "test")
    report["provenance"] = found
    text = render_markdown(report)
    assert "## Reused or trained in this run" in text
    assert "| student | trained in this run, continued from abc for 150 steps | now-2 | t2 |" in text
    assert "| experts/copy | reused | – | t0 |" in text
