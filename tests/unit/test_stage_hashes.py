"""A changed setting invalidates exactly the stages that depend on it, never fewer (stale reuse) and never
more (needless retraining). Each row: an override -> the stages whose hash must change.

    .venv/bin/python -m pytest -q tests/unit/test_stage_hashes.py
"""

import pytest

from dume_ray.config import load_config
from dume_ray.stage_hashes import pipeline_hashes

TASKS = ["copy", "reverse", "add"]
EXPERTS = {f"experts/{t}" for t in TASKS}
SOFT_TARGETS = {"soft_targets", *(f"soft_targets/{t}" for t in TASKS)}  # each group's, and the union
BASE_ONWARDS = {"base", *EXPERTS, "upcycle", *SOFT_TARGETS, "student", "multitask", "eval"}


def _hashes(*overrides):
    return pipeline_hashes(load_config(None, ["tasks.builtin=[copy,reverse,add]", *overrides]))


@pytest.mark.parametrize("override, changed", [
    ("distill.temperature=3.0", {"student", "eval"}),
    ("distill.alpha=0.3", {"student", "eval"}),
    ("distill.anneal=true", {"student", "eval"}),
    ("distill.on_policy_ratio=0.5", {"student", "eval"}),
    ("distill.optim.steps=7", {"student", "multitask", "eval"}),
    ("distill.init=scratch", {"student", "multitask", "eval"}),
    ("soft_targets.top_k=4", SOFT_TARGETS | {"student", "multitask", "eval"}),
    ("experts.optim.lr=0.01", EXPERTS | SOFT_TARGETS | {"upcycle", "student", "multitask", "eval"}),
    ("experts.train_mlp_only=true", EXPERTS | SOFT_TARGETS | {"upcycle", "student", "multitask", "eval"}),
    ("upcycle.ridge_lambda=0.1", {"upcycle", "eval"}),
    ("upcycle.random_seed=3", {"eval"}),  # only the random-routing row of the report changes
    ("base.optim.steps=5", BASE_ONWARDS),
    ("model.hidden_size=32", BASE_ONWARDS),
    ("seed=1", BASE_ONWARDS),
    ("tasks.num_train=50", BASE_ONWARDS),
    ("eval.max_new_tokens=5", {"eval"}),
    ("eval.split=validation", {"eval"}),
    # Resources and bookkeeping never change what is computed: nothing reruns.
    ("experts.resources.num_workers=2", set()),
    ("base.resources.cpus_per_worker=2", set()),
    ("soft_targets.cache_max_mb=0", set()),
    ("distill.resources.max_failures=3", set()),
    ("soft_targets.num_actors=2", set()),
    ("eval.gpus_per_task=0.5", set()),
    ("ray_address=auto", set()),
])
def test_a_changed_setting_invalidates_exactly_its_downstream_stages(override, changed):
    before, after = _hashes(), _hashes(override)
    assert set(before) == set(after)
    assert {stage for stage in before if before[stage] != after[stage]} == changed


def test_regrouping_retrains_only_the_groups_that_changed():
    before = _hashes()
    after = _hashes("experts.groups=[[copy,reverse],[add]]")
    assert after["experts/add"] == before["experts/add"]  # same group, same base, same config: reused
    assert "experts/copy+reverse" in after and "experts/copy" not in after
    assert after["soft_targets"] != before["soft_targets"]


def test_disabling_upcycling_drops_its_stage_and_touches_nothing_else_upstream():
    before, after = _hashes(), _hashes("upcycle.enabled=false")
    assert "upcycle" not in after
    assert {stage for stage in after if before[stage] != after[stage]} == {"eval"}


def test_disabling_the_baseline_drops_its_stage_but_keeps_the_student():
    before, after = _hashes(), _hashes("multitask.enabled=false")
    assert "multitask" not in after and after["student"] == before["student"]
    assert after["eval"] != before["eval"]
