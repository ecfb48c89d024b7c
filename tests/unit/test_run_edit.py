"""Adding and removing tasks (dume_ray/run_edit.py) and the per-group stage hashes that make it cheap: an edited
run keeps every other expert's and soft-target group's hash, so only the changed group is redone. No Ray.

Run: .venv/bin/python -m pytest tests/unit/test_run_edit.py -q
"""

from __future__ import annotations

import os

import pytest

from dume_ray.config import ConfigError, load_config, to_yaml
from dume_ray.manifest import StageInputError, mark_done
from dume_ray.run_edit import edited_config, parent_folder, parent_model
from dume_ray.stage_hashes import pipeline_hashes, student_hash, student_optim


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


def finish_student(cfg, stage: str, config_hash: str) -> str:
    """A finished student or baseline in the run folder: its model folder and manifest, as the stage leaves them."""
    model = f"{cfg.run_dir}/{stage}/model"
    os.makedirs(model)
    open(f"{model}/model.safetensors", "w").write(config_hash)
    mark_done(f"{cfg.run_dir}/{stage}", config_hash, {"model": model})
    return model


def test_continue_records_the_finished_models_as_parents_and_trains_a_share_of_the_steps(tmp_path):
    cfg = finished_run(tmp_path, "distill.optim.steps=600")
    old = pipeline_hashes(cfg)
    for stage in ("student", "multitask"):
        finish_student(cfg, stage, old[stage])
    added = edited_config(cfg.run_dir, add_tasks=["shift"])  # after_edit=continue is the default
    assert added.distill.continue_from.student == old["student"] and added.distill.continue_from.multitask == old["multitask"]
    assert student_optim(added, "student").steps == 600 // 4 and student_optim(added, "multitask").steps == 150
    assert student_optim(cfg, "student").steps == 600  # a run that continues nothing trains the full schedule
    retrained = edited_config(cfg.run_dir, add_tasks=["shift"], overrides=["distill.after_edit=retrain"])
    assert retrained.distill.continue_from.student == "" and student_optim(retrained, "student").steps == 600
    new, fresh = pipeline_hashes(added), pipeline_hashes(retrained)
    # Same upstream stages either way; only the students (and the report) differ between continue and retrain.
    assert {k for k in new if new[k] != fresh[k]} == {"student", "multitask", "eval"}
    assert edited_config(cfg.run_dir, add_tasks=["shift"], overrides=["distill.continue_steps=7"]).distill.continue_steps == 7


def test_a_continued_hash_folds_in_its_parent_so_a_chain_of_edits_is_a_chain_of_hashes():
    cfg = load_config("configs/demo.yaml", ["tasks.builtin=[copy,reverse]"])
    hashes = {}
    for parent in ("", "p1", "p2"):
        cfg.distill.continue_from.student = parent
        hashes[parent] = student_hash(cfg, "student", "soft")
    assert len(set(hashes.values())) == 3  # a different parent is a different student
    cfg.distill.continue_from.student = "p1"
    cfg.distill.init = "scratch"  # a continued student starts from its parent: its init setting does not matter
    assert student_hash(cfg, "student", "soft") == hashes["p1"]
    assert student_hash(cfg, "multitask", "soft") != student_hash(cfg, "student", "soft")


def test_the_parent_model_is_found_while_it_exists_and_named_when_it_is_gone(tmp_path):
    cfg = finished_run(tmp_path)
    model = finish_student(cfg, "student", "h-old")
    assert parent_model(cfg, "student") == ""  # nothing to continue
    cfg.distill.continue_from.student = "h-old"
    assert parent_model(cfg, "student") == model  # the run's finished student, until it is replaced
    mark_done(f"{cfg.run_dir}/student", "h-new", {"model": model})  # replaced by a later training
    with pytest.raises(StageInputError, match="continue_from.student=h-old: that student is no longer"):
        parent_model(cfg, "student")
    os.makedirs(parent_folder(cfg, "student"))  # set aside by the interrupted run that is continuing it
    assert parent_model(cfg, "student") == parent_folder(cfg, "student")


def test_an_unfinished_student_is_retrained_even_with_continue(tmp_path):
    cfg = finished_run(tmp_path)
    mark_done(f"{cfg.run_dir}/student", "h", {"model": f"{cfg.run_dir}/student/model"})  # manifest, no model folder
    added = edited_config(cfg.run_dir, add_tasks=["shift"])
    assert added.distill.continue_from.student == "" and added.distill.continue_from.multitask == ""


@pytest.fixture(params=["file", "s3"])
def stored_run(request, tmp_path):
    """A finished run's config on storage (a file:// folder, or a moto S3 bucket) and no working copy here."""
    from dume_ray.storage import RunStorage

    where = f"file://{tmp_path / 'storage'}" if request.param == "file" else f"s3://{request.getfixturevalue('new_bucket')}/p"
    cfg = finished_run(tmp_path / "node_a", f"storage={where}")
    store = RunStorage.for_run(cfg.storage, cfg.name, cfg.run_dir)
    store.push()
    return cfg, store.uri


def test_a_run_on_storage_is_edited_from_its_uri_without_a_working_copy(stored_run, tmp_path, monkeypatch):
    cfg, uri = stored_run
    monkeypatch.chdir(tmp_path)  # another node: no runs/ folder here
    added = edited_config(uri, add_tasks=["shift"])
    assert added.tasks.names == ["copy", "reverse", "sort", "shift"] and added.storage == cfg.storage
    assert changed_stages(cfg, added) == {"experts/shift", "soft_targets/shift", "soft_targets", "upcycle", "student",
                                          "multitask", "eval"}
    with pytest.raises(ConfigError, match="no dume_ray run there"):
        edited_config(uri + "-other", add_tasks=["shift"])
    with pytest.raises(ConfigError, match="'copy' is already in this run"):
        edited_config(uri, add_tasks=["copy"])


def test_a_stored_config_that_belongs_to_another_run_is_named(stored_run):
    cfg, uri = stored_run
    from dume_ray.storage import resolve

    fs, root = resolve(uri)
    fs.create_dir(f"{root}-copy")
    with fs.open_output_stream(f"{root}-copy/config.yaml") as f:  # the run copied to another prefix by hand
        f.write(open(f"{cfg.run_dir}/config.yaml", "rb").read())
    with pytest.raises(ConfigError, match="belongs to the run"):
        edited_config(uri + "-copy", add_tasks=["shift"])
