"""Adding and removing tasks (dume_ray/run_edit.py) and the per-group stage hashes that make it cheap: an edited
run keeps every other expert's and soft-target group's hash, so only the changed group is redone. No Ray.

Run: .venv/bin/python -m pytest tests/unit/test_run_edit.py -q
"""

from __future__ import annotations

import os

import pytest

from dume_ray.config import ConfigError, load_config, to_yaml
from dume_ray.run_edit import edited_config
from dume_ray.stage_hashes import pipeline_hashes


def finished_run(tmp_path, *overrides: str):
    cfg = load_config("configs/demo.yaml", [f"runs_dir={tmp_path}", "name=r", "tasks.builtin=[copy,reverse,sort]",
                                            *overrides])
    os.makedirs(cfg.run_dir)
    with open(f"{cfg.run_dir}/config.yaml", "w") as f:
        f.write(to_yaml(cfg))
    return cfg


def changed_stages(before, after) -> set[str]:
    old, new = pipeline_hashes(before), pipeline_hashes(after)
    return {k for k in set(old) | set(new) if old.get(k) != new.get(k)}


def test_adding_a_task_changes_exactly_its_expert_its_soft_targets_and_what_reads_the_union(tmp_path):
    cfg = finished_run(tmp_path)
    added = edited_config(cfg.run_dir, add_tasks=["shift"])
    assert added.tasks.names == ["copy", "reverse", "sort", "shift"] and added.base.tasks == ["copy", "reverse", "sort"]
    assert changed_stages(cfg, added) == {"experts/shift", "soft_targets/shift", "soft_targets", "upcycle", "student",
                                          "multitask", "eval"}


def test_removing_a_task_drops_its_group_and_keeps_the_base_and_the_other_experts(tmp_path):
    cfg = finished_run(tmp_path)
    removed = edited_config(cfg.run_dir, remove=["reverse"])
    assert removed.tasks.names == ["copy", "sort"] and removed.base.tasks == ["copy", "reverse", "sort"]
    assert changed_stages(cfg, removed) == {"experts/reverse", "soft_targets/reverse", "soft_targets", "upcycle",
                                            "student", "multitask", "eval"}
    assert "experts/reverse" not in pipeline_hashes(removed)


def test_written_groups_get_the_new_task_alone_and_lose_the_removed_one(tmp_path):
    cfg = finished_run(tmp_path, "experts.groups=[[copy,sort],[reverse]]")
    added = edited_config(cfg.run_dir, add_tasks=["add"], remove=["sort"])
    assert added.experts.groups == [["copy"], ["reverse"], ["add"]]
    # copy lost its partner: its group's data changed, so that expert is retrained; reverse is untouched
    assert "experts/reverse" not in changed_stages(cfg, added)
    assert {"experts/copy", "experts/add"} <= changed_stages(cfg, added)


def test_a_user_task_source_can_be_added(tmp_path):
    cfg = finished_run(tmp_path)
    data = tmp_path / "faq.jsonl"
    data.write_text('{"prompt": "q=", "response": "a"}\n')
    files = f"{{train: {data}, validation: {data}, test: {data}}}"
    added = edited_config(cfg.run_dir, add_sources=[f"{{name: faq, source: jsonl, data_files: {files}}}"])
    assert added.tasks.names[-1] == "faq"
    assert changed_stages(cfg, added) >= {"experts/faq", "soft_targets/faq"}
    assert not {"experts/copy", "experts/reverse", "experts/sort", "base"} & changed_stages(cfg, added)


@pytest.mark.parametrize("kwargs,match", [
    ({"add_tasks": ["copy"]}, "'copy' is already in this run"),
    ({"remove": ["shift"]}, "cannot remove task 'shift': not in this run"),
    ({"add_tasks": ["nope"]}, "--task 'nope': not a built-in task"),
    ({"add_sources": ["[1, 2]"]}, "must be a mapping"),
    ({}, "nothing to do"),
])
def test_bad_edits_name_the_task_and_leave_the_run_untouched(tmp_path, kwargs, match):
    cfg = finished_run(tmp_path)
    before = {p: open(os.path.join(cfg.run_dir, p)).read() for p in os.listdir(cfg.run_dir)}
    with pytest.raises(ConfigError, match=match):
        edited_config(cfg.run_dir, **kwargs)
    assert {p: open(os.path.join(cfg.run_dir, p)).read() for p in os.listdir(cfg.run_dir)} == before


def test_a_folder_without_a_run_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not a dume_ray run folder"):
        edited_config(str(tmp_path), add_tasks=["copy"])


def test_base_tasks_accept_a_removed_builtin_and_reject_unknown_names():
    assert load_config("configs/demo.yaml", ["tasks.builtin=[copy]", "base.tasks=[copy,sub]"]).base.tasks == ["copy", "sub"]
    with pytest.raises(ConfigError, match="base.tasks names unknown task"):
        load_config("configs/demo.yaml", ["base.tasks=[nope]"])
