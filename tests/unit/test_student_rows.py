"""Soft targets only for the rows the student reads (`soft_targets.rows=read`): the one draw both scorers and the
student call (`data.student_rows.rows_read`), the budgets the config gives it, and the scorers' shards: exactly the
rows drawn, each byte for byte what scoring every row gives. No Ray.

Run: .venv/bin/python -m pytest tests/unit/test_student_rows.py -q
"""

import pyarrow as pa
import pytest

from dume_ray.config import load_config
from dume_ray.data.student_rows import every_group_train_ids, keep_rows, row_key, rows_read, train_ids
from dume_ray.data.tokenizer import build_char_tokenizer
from dume_ray.experts.launch import scored_rows
from dume_ray.experts.worker import score_soft_targets
from dume_ray.model import load_tokenizer
from dume_ray.stage_hashes import read_budget, score_budget
from dume_ray.tasks import encode_rows, load_tasks
from dume_ray.teacher_scoring import TeacherScorer, score_rows

IDS = {g: [f"{g}/train/{i}" for i in range(1500)] for g in ("reverse_words", "sort_words", "upper_words", "rotate_words")}
ALL = [e for ids in IDS.values() for e in ids]


def test_the_student_reads_every_row_when_its_budget_covers_them():
    assert rows_read(ALL, None, seed=0) == set(ALL)
    assert rows_read(ALL, 6000, seed=0) == rows_read(ALL, 19_200, seed=0) == set(ALL)


def test_a_smaller_budget_reads_that_many_rows_in_proportion_to_each_group():
    read = rows_read(ALL, 720, seed=0)  # the shape: 90 steps x 8 of 4 x 1,500 rows
    assert len(read) == 720 and read <= set(ALL)
    assert read == rows_read(list(reversed(ALL)), 720, seed=0)  # the rows' order does not matter
    assert read != rows_read(ALL, 720, seed=1)
    shares = {g: len(read & set(ids)) for g, ids in IDS.items()}
    assert all(180 - 45 <= n <= 180 + 45 for n in shares.values()), shares  # 180 each, binomial spread ~12
    # the draw is the 720 smallest keys: every row read has a key below every row left out
    assert max(row_key(0, e) for e in read) < min(row_key(0, e) for e in set(ALL) - read)


def test_the_draws_nest_so_a_continued_student_reads_rows_its_parent_scored():
    parent = rows_read(ALL, 720, seed=0)
    assert rows_read(ALL, 180, seed=0) <= parent  # fewer steps: a subset
    added = ALL + [f"initials/train/{i}" for i in range(1500)]  # add-task: a fifth group
    continued = rows_read(added, 720, seed=0)
    assert {e for e in continued if not e.startswith("initials/")} <= parent
    assert rows_read(added, 180, seed=0) - {e for e in added if e.startswith("initials/")} <= parent
    removed = rows_read(ALL[1500:], 720, seed=0)  # remove-task: the others' shares grow (the stage rescores them)
    assert removed >= parent - set(IDS["reverse_words"]) and len(removed) == 720


def test_bad_inputs_to_the_draw_are_named():
    with pytest.raises(ValueError, match="'a/train/0' appears twice"):
        rows_read(["a/train/0", "a/train/1", "a/train/0"], 1, seed=0)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        rows_read(["a/train/0"], -1, seed=0)


@pytest.mark.parametrize("overrides, budget", [
    # the SmolLM2 shape: 4 tasks x 1,500 rows, the student reads 90 x 8 = 720
    (["tasks.builtin=[reverse_words,sort_words,upper_words,rotate_words]", "tasks.num_train=1500",
      "distill.optim.steps=90", "distill.optim.batch_size=8"], 720),
    (["--config", "configs/demo.yaml"], None),  # 600 x 32 = 19,200 reads of 6 x 2,000 rows: every row
    (["--config", "configs/smollm2.yaml"], None),  # 120 x 8 = 960 of 4 x 240: every row
    (["distill.optim.steps=90", "soft_targets.rows=all"], None),
    # a continued student reading more than the config's own optim asks for more rows; one reading less does not
    (["distill.optim.steps=10", "distill.continue_from.student=abc", "distill.continue_steps=20"], 20 * 32),
    (["distill.optim.steps=10", "distill.continue_from.student=abc", "distill.continue_steps=5"], 10 * 32),
    # user tasks: their row counts are unknown to the config, so the budget always counts
    (["distill.optim.steps=700", "tasks.sources=[{name: mine, source: jsonl, data_files: {train: a.jsonl, "
      "validation: b.jsonl, test: c.jsonl}}]"], 700 * 32),
])
def test_the_budget_the_soft_targets_are_scored_for(overrides, budget):
    config = overrides[1] if overrides[0] == "--config" else None
    cfg = load_config(config, overrides[2:] if config else overrides)
    assert score_budget(cfg) == budget


def test_a_continued_student_reads_its_own_steps():
    cfg = load_config(None, ["distill.optim.steps=10", "distill.continue_from.student=abc", "distill.continue_steps=5"])
    assert read_budget(cfg, "student") == 5 * 32 and read_budget(cfg, "multitask") == 10 * 32


TOP_K, BATCH = 4, 8


def _rows_and_cfg(steps: int, rows: str = "read"):
    """A run of 3 tasks x 40 rows; its student reads steps x 4 rows."""
    cfg = load_config(None, ["tasks.builtin=[copy,reverse,add]", "tasks.num_train=40", "distill.optim.batch_size=4",
                             f"distill.optim.steps={steps}", f"soft_targets.rows={rows}", "model.max_seq_len=32"])
    tokenizer = build_char_tokenizer()
    tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
    rows = encode_rows(tasks, tokenizer, "train", cfg.model.max_seq_len, {t: "g" for t in cfg.tasks.names})
    return cfg, tasks, rows


def test_every_group_train_ids_are_the_encoded_ids_of_every_task_in_every_group_and_both_draws_use_them():
    cfg, tasks, rows = _rows_and_cfg(steps=6)
    groups = {"g1": ["add", "copy"], "g2": ["reverse"]}  # several tasks in a group, not in the tasks' order
    ids = every_group_train_ids(tasks, groups)
    assert len(ids) == len(set(ids)) == 120
    assert set(ids) == {r["example_id"] for r in rows}  # the ids tasks.encode_rows gives the rows
    assert set(every_group_train_ids(tasks, {"g2": ["reverse"]})) == {r["example_id"] for r in rows if r["task"] == "reverse"}
    # the scorers' draw (experts.launch.scored_rows) is the student's (distill.launch: its budget, these ids)
    assert scored_rows(cfg, tasks) == rows_read(every_group_train_ids(tasks, cfg.groups), read_budget(cfg, "student"), cfg.seed)


def _shard_rows(written: dict) -> list[dict]:
    import glob

    import pyarrow.parquet as pq
    return pa.concat_tables([pq.read_table(p) for p in sorted(glob.glob(f"{written['shards']}/*.parquet"))]).to_pylist()


def test_the_shards_hold_exactly_the_rows_read_with_the_bytes_of_scoring_every_row(stand_in_expert, tiny_model_dir, tmp_path):
    expert_dir = str(tmp_path / "expert")
    model = stand_in_expert(expert_dir)
    cfg, tasks, rows = _rows_and_cfg(steps=6)  # 24 of 120 rows
    keep = scored_rows(cfg, tasks)
    assert keep == rows_read(train_ids(tasks, cfg.tasks.names), 24, cfg.seed) and len(keep) == 24
    tokenizer = load_tokenizer(expert_dir)

    def job(rows_scored, name):  # the expert job's path (experts/worker.score_soft_targets)
        st = {"rows": rows_scored, "top_k": TOP_K, "batch_size": BATCH, "shards_dir": str(tmp_path / name)}
        return _shard_rows(score_soft_targets(model, tokenizer, {"soft_targets": st}))

    read, every = job(keep_rows(rows, keep), "read"), job(rows, "all")
    assert [r["example_id"] for r in read] == [r["example_id"] for r in rows if r["example_id"] in keep]
    assert read == [r for r in every if r["example_id"] in keep]  # ids, float16 log-probs and tails, exactly
    # the stage's pool path: the saved expert loaded again, the same rows in the same batches
    pool = score_rows(TeacherScorer(expert_dir, TOP_K), keep_rows(rows, keep), TOP_K, BATCH).to_pylist()
    assert pool == read


def test_a_student_that_reads_every_row_still_scores_every_row(tiny_model_dir):
    cfg, tasks, rows = _rows_and_cfg(steps=30)  # 30 x 4 = 120 reads of 120 rows
    assert score_budget(cfg) is None and keep_rows(rows, scored_rows(cfg, tasks)) == rows
    cfg, tasks, rows = _rows_and_cfg(steps=6, rows="all")
    assert keep_rows(rows, scored_rows(cfg, tasks)) == rows


def test_a_group_the_student_never_reads_gets_an_empty_validated_shard(stand_in_expert, tiny_model_dir, tmp_path):
    model = stand_in_expert(str(tmp_path / "expert"))
    st = {"rows": [], "top_k": TOP_K, "batch_size": BATCH, "shards_dir": str(tmp_path / "none")}
    written = score_soft_targets(model, load_tokenizer(str(tmp_path / "expert")), {"soft_targets": st})
    assert written["rows"] == 0 and _shard_rows(written) == []


def test_an_unknown_rows_setting_is_a_config_error_naming_the_key():
    from dume_ray.config import ConfigError
    with pytest.raises(ConfigError, match=r"soft_targets\.rows must be one of \('read', 'all'\), got 'some'"):
        load_config("configs/demo.yaml", ["soft_targets.rows=some"])


def test_after_remove_task_a_kept_group_holding_too_few_rows_is_scored_again(tiny_model_dir, tmp_path):
    """`soft_targets.launch.short_groups`: a group whose manifest holds fewer rows than the student now reads
    from it (its share grew when another group left) is scored again; one holding enough is kept."""
    from dume_ray import manifest
    from dume_ray.experts.launch import soft_target_group_dir
    from dume_ray.soft_targets.launch import short_groups

    cfg = load_config(None, ["tasks.builtin=[copy,reverse,add]", "tasks.num_train=40", "distill.optim.batch_size=4",
                             "distill.optim.steps=6", f"runs_dir={tmp_path}", "model.max_seq_len=32"])
    tasks = load_tasks(cfg.tasks, load_tokenizer(tiny_model_dir), cfg.model.max_seq_len)
    keep = scored_rows(cfg, tasks)
    needed = {g: len(keep & set(train_ids(tasks, names))) for g, names in cfg.groups.items()}
    assert sum(needed.values()) == 24
    for g in cfg.groups:  # copy holds one row too few, the others exactly what is read
        held = needed[g] - 1 if g == "copy" else needed[g]
        manifest.mark_done(soft_target_group_dir(cfg, g), "h", {"shards": "x"}, metrics={"rows": held})
    assert short_groups(cfg, list(cfg.groups), tiny_model_dir) == ["copy"]
    every = load_config(None, ["tasks.builtin=[copy,reverse,add]", "tasks.num_train=40", "distill.optim.steps=6",
                               "soft_targets.rows=all", f"runs_dir={tmp_path}"])
    # soft_targets.rows=all wants all 40 rows of each group: every group holding only its read share is short
    assert short_groups(every, list(every.groups), tiny_model_dir) == list(every.groups)


def test_a_task_added_or_a_budget_changed_keeps_every_group_hash_and_changes_only_the_union():
    """The read budget is the union's, not each group's: adding a task (user source or built-in, past the point
    where the students read every row) rescoring nothing but the new group is what add-task promises."""
    from dume_ray.stage_hashes import pipeline_hashes
    three = load_config(None, ["tasks.builtin=[copy,reverse,sort]", "base.tasks=[copy,reverse,sort]",
                               "distill.optim.steps=200"])
    four = load_config(None, ["tasks.builtin=[copy,reverse,sort,add]", "base.tasks=[copy,reverse,sort]",
                              "distill.optim.steps=200"])
    old, new = pipeline_hashes(three), pipeline_hashes(four)
    assert score_budget(three) is None and score_budget(four) == 200 * four.distill.optim.batch_size
    assert all(old[f"soft_targets/{g}"] == new[f"soft_targets/{g}"] for g in ("copy", "reverse", "sort"))
    assert old["soft_targets"] != new["soft_targets"]
    fewer = load_config(None, ["tasks.builtin=[copy,reverse,sort]", "distill.optim.steps=20"])
    assert all(pipeline_hashes(fewer)[f"soft_targets/{g}"] == old[f"soft_targets/{g}"] for g in fewer.groups)
