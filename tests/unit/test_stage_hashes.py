"""A changed setting invalidates exactly the stages that depend on it, never fewer (stale reuse) and never
more (needless retraining). Every leaf key of the config schema has a row below (a new key fails
`test_every_config_key_has_a_row` until its row says what it invalidates); each row flips the key to a valid,
different value and asserts the exact set of stage hashes that change.

    .venv/bin/python -m pytest -q tests/unit/test_stage_hashes.py
"""

import pytest
from omegaconf import DictConfig, OmegaConf

from dume_ray.config import PipelineConfig, load_config
from dume_ray.stage_hashes import pipeline_hashes

TASKS = ["copy", "reverse", "add"]
EXPERTS = {f"experts/{t}" for t in TASKS}
EVAL = {"eval"}
UPCYCLE = {"upcycle", "eval"}
STUDENT = {"student", "eval"}                              # the KD knobs: the baseline trains with alpha = 0
STUDENTS = {"student", "multitask", "eval"}                # both read the soft-target stream
SOFT_TARGETS = {"soft_targets", *(f"soft_targets/{t}" for t in TASKS)} | STUDENTS  # every group's, the union
UNION = {"soft_targets"} | STUDENTS  # the read budget: the union's stage checks every group for missing rows
FROM_EXPERTS = EXPERTS | {"upcycle"} | SOFT_TARGETS
EVERYTHING = {"base"} | FROM_EXPERTS
NOTHING: set = set()                                       # where or how a job runs, bookkeeping, unused knobs
PRETRAINED = ("model.name_or_path=some/model", "base.enabled=false")

# leaf key -> [(context overrides applied before and after, the flip, the stages whose hash must change)]
ROWS = {
    "name": [((), "name=other", NOTHING)],                  # another run folder; same hashes
    "runs_dir": [((), "runs_dir=/elsewhere", NOTHING)],
    "storage": [((), "storage=s3://bucket/prefix", NOTHING)],
    "seed": [((), "seed=1", EVERYTHING), (("base.enabled=false",), "seed=1", EVERYTHING)],
    "ray_address": [((), "ray_address=auto", NOTHING)],
    "resource_wait_s": [((), "resource_wait_s=5", NOTHING)],
    "ray_dashboard": [((), "ray_dashboard=true", NOTHING)],
    "mlflow_tracking_uri": [((), "mlflow_tracking_uri=file:/tmp/mlruns", NOTHING)],
    # Built-in splits come from one deduplicated pool, so any split's size changes the training data.
    "tasks.seed": [((), "tasks.seed=1", EVERYTHING)],
    "tasks.num_train": [((), "tasks.num_train=50", EVERYTHING),
                        (("base.enabled=false",), "tasks.num_train=50", FROM_EXPERTS)],  # an untrained base reads no task
    "tasks.num_validation": [((), "tasks.num_validation=50", EVERYTHING)],
    "tasks.num_test": [((), "tasks.num_test=50", EVERYTHING)],
    "tasks.skip_bad_rows": [((), "tasks.skip_bad_rows=true", EVERYTHING)],
    "tasks.too_long": [((), "tasks.too_long=drop", EVERYTHING)],
    "model.name_or_path": [((), "model.name_or_path=some/model", EVERYTHING)],
    "model.gguf": [((), "model.gguf=m.gguf", EVERYTHING)],
    "model.keep_layers": [(PRETRAINED, "model.keep_layers=1", EVERYTHING)],
    "model.gradient_checkpointing": [((), "model.gradient_checkpointing=true", NOTHING)],
    "model.hidden_size": [((), "model.hidden_size=32", EVERYTHING)],
    "model.num_layers": [((), "model.num_layers=1", EVERYTHING)],
    "model.num_heads": [((), "model.num_heads=2", EVERYTHING)],
    "model.intermediate_size": [((), "model.intermediate_size=128", EVERYTHING)],
    "model.max_seq_len": [((), "model.max_seq_len=48", EVERYTHING)],
    "model.dtype": [((), "model.dtype=bfloat16", EVERYTHING)],
    "data.chat_template": [(PRETRAINED, "data.chat_template=true", EVERYTHING)],
    "data.system_prompt": [((*PRETRAINED, "data.chat_template=true"), "data.system_prompt=Be brief.", EVERYTHING)],
    "base.enabled": [((), "base.enabled=false", EVERYTHING)],
    "experts.train_mlp_only": [((), "experts.train_mlp_only=true", FROM_EXPERTS)],
    "experts.lora_rank": [((), "experts.lora_rank=4", FROM_EXPERTS)],
    "experts.lora_alpha": [((), "experts.lora_alpha=8", NOTHING),                 # no LoRA, no LoRA scale
                           (("experts.lora_rank=4",), "experts.lora_alpha=8", FROM_EXPERTS)],
    "experts.lora_dropout": [((), "experts.lora_dropout=0.1", NOTHING),
                             (("experts.lora_rank=4",), "experts.lora_dropout=0.1", FROM_EXPERTS)],
    "soft_targets.top_k": [((), "soft_targets.top_k=4", SOFT_TARGETS)],
    "soft_targets.kl_max": [((), "soft_targets.kl_max=0.02", SOFT_TARGETS)],
    "soft_targets.logprob_bits": [((), "soft_targets.logprob_bits=8", SOFT_TARGETS),
                                  (("soft_targets.kl_max=0.02",), "soft_targets.logprob_bits=8", SOFT_TARGETS)],
    "soft_targets.batch_size": [((), "soft_targets.batch_size=8", NOTHING)],
    "soft_targets.num_actors": [((), "soft_targets.num_actors=2", NOTHING)],
    "soft_targets.cpus_per_actor": [((), "soft_targets.cpus_per_actor=2", NOTHING)],
    "soft_targets.gpus_per_actor": [((), "soft_targets.gpus_per_actor=0.5", NOTHING)],
    "soft_targets.cache_max_mb": [((), "soft_targets.cache_max_mb=0", NOTHING)],
    "soft_targets.in_expert_jobs": [((), "soft_targets.in_expert_jobs=false", NOTHING)],  # same bytes either way
    # The student reads 600 x 32 = 19,200 rows of 6,000: every row either way. Reading 7 x 32 = 224, "all" scores more.
    "soft_targets.rows": [((), "soft_targets.rows=all", NOTHING),
                          (("distill.optim.steps=7",), "soft_targets.rows=all", UNION)],
    "distill.alpha": [((), "distill.alpha=0.3", STUDENT)],
    "distill.temperature": [((), "distill.temperature=3.0", STUDENT)],
    "distill.divergence": [((), "distill.divergence=reverse_kl", STUDENT)],
    "distill.jsd_beta": [((), "distill.jsd_beta=0.2", NOTHING),                   # only the JSD reads it
                         (("distill.divergence=generalized_jsd",), "distill.jsd_beta=0.2", STUDENT),
                         (("distill.on_policy_ratio=0.5", "distill.on_policy_divergence=generalized_jsd"),
                          "distill.jsd_beta=0.2", STUDENT)],
    "distill.anneal": [((), "distill.anneal=true", STUDENT)],
    "distill.on_policy_ratio": [((), "distill.on_policy_ratio=0.5", STUDENT)],
    "distill.teacher_schedule": [((), "distill.teacher_schedule=sequential", STUDENT)],  # the baseline stays mixed
    "distill.on_policy_divergence": [((), "distill.on_policy_divergence=generalized_jsd", NOTHING),  # off-policy only
                                     (("distill.on_policy_ratio=0.5",), "distill.on_policy_divergence=generalized_jsd",
                                      STUDENT)],
    "distill.on_policy_schedule": [((), "distill.on_policy_schedule=end", NOTHING),  # off-policy only
                                   (("distill.on_policy_ratio=0.5",), "distill.on_policy_schedule=end", STUDENT)],
    "distill.on_policy_sample": [((), "distill.on_policy_sample=false", NOTHING),
                                 (("distill.on_policy_ratio=0.5",), "distill.on_policy_sample=false", STUDENT)],
    "base.tasks": [((), "base.tasks=[copy]", EVERYTHING),  # the base's mixture
                   (("base.enabled=false",), "base.tasks=[copy]", NOTHING)],
    "distill.after_edit": [((), "distill.after_edit=retrain", NOTHING)],  # read by add-task / remove-task only
    "distill.continue_steps": [((), "distill.continue_steps=5", NOTHING),   # nothing continued: unused
                               (("distill.continue_from.student=abc",), "distill.continue_steps=5", STUDENT),
                               (("distill.continue_from.student=abc", "distill.continue_from.multitask=def"),
                                "distill.continue_steps=5", STUDENTS),
                               # a continued student reading more rows than its parent needs more rows scored
                               (("distill.optim.steps=7", "distill.continue_from.student=abc"),
                                "distill.continue_steps=5", STUDENT),
                               (("distill.optim.steps=7", "distill.continue_from.student=abc"),
                                "distill.continue_steps=20", UNION)],
    "distill.continue_from.student": [((), "distill.continue_from.student=abc", STUDENT)],
    "distill.continue_from.multitask": [((), "distill.continue_from.multitask=def", {"multitask", "eval"})],
    "distill.init": [((), "distill.init=scratch", STUDENTS)],
    "distill.student_model": [((), "distill.student_model={hidden_size: 32}", NOTHING),  # init=base ignores it
                              (("distill.init=scratch",), "distill.student_model={hidden_size: 32}", STUDENTS)],
    "upcycle.ridge_lambda": [((), "upcycle.ridge_lambda=0.1", UPCYCLE)],
    "upcycle.top_k": [((), "upcycle.top_k=2", UPCYCLE)],
    "upcycle.normalize_columns": [((), "upcycle.normalize_columns=true", UPCYCLE)],
    "upcycle.routing": [((), "upcycle.routing=token", UPCYCLE)],
    "upcycle.score_all_routings": [((), "upcycle.score_all_routings=false", EVAL)],
    "upcycle.stats_examples_per_task": [((), "upcycle.stats_examples_per_task=16", UPCYCLE)],
    "upcycle.batch_size": [((), "upcycle.batch_size=8", UPCYCLE)],
    "upcycle.random_seed": [((), "upcycle.random_seed=3", EVAL)],  # only the random-routing row of the report
    "upcycle.dume_plus_steps": [((), "upcycle.dume_plus_steps=2", UPCYCLE)],
    "upcycle.dume_plus_lr": [((), "upcycle.dume_plus_lr=0.1", NOTHING),           # DUME+ off: lr unused
                             (("upcycle.dume_plus_steps=2",), "upcycle.dume_plus_lr=0.1", UPCYCLE)],
    "eval.split": [((), "eval.split=validation", EVAL)],
    "eval.batch_size": [((), "eval.batch_size=8", EVAL)],
    "eval.max_new_tokens": [((), "eval.max_new_tokens=5", EVAL)],
    "eval.gpus_per_task": [((), "eval.gpus_per_task=0.5", NOTHING)],
}
OPTIM_FLIPS = {"lr": "0.01", "weight_decay": "0.1", "warmup_steps": "3", "steps": "7", "batch_size": "4",
               "grad_clip": "0.5"}
RESOURCE_FLIPS = {"num_workers": "2", "cpus_per_worker": "2", "max_concurrent_jobs": "1", "torch_threads": "2",
                  "max_failures": "3", "share_idle_cores": "false"}
for section, trained in (("base", EVERYTHING), ("experts", FROM_EXPERTS), ("distill", STUDENTS)):
    for knob, value in OPTIM_FLIPS.items():
        ROWS[f"{section}.optim.{knob}"] = [((), f"{section}.optim.{knob}={value}", trained)]
    ROWS[f"{section}.optim.checkpoint_every"] = [((), f"{section}.optim.checkpoint_every=7", NOTHING)]
    for knob, value in RESOURCE_FLIPS.items():
        ROWS[f"{section}.resources.{knob}"] = [((), f"{section}.resources.{knob}={value}", NOTHING)]
    ROWS[f"{section}.resources.use_gpu"] = [((f"{section}.resources.num_workers=1",), f"{section}.resources.use_gpu=true",
                                             NOTHING)]
# With soft_targets.rows=read the student's steps x batch size decide which rows get soft targets, once it reads
# fewer rows than there are (6,000 here): 7 x 32 = 224, 32 x 4 = 128 and 100 x 32 = 3,200 rows.
ROWS["distill.optim.steps"] = [((), "distill.optim.steps=7", UNION),
                               (("distill.optim.steps=100",), "distill.optim.steps=7", UNION),
                               (("soft_targets.rows=all",), "distill.optim.steps=7", STUDENTS)]
ROWS["distill.optim.batch_size"] = [((), "distill.optim.batch_size=4", UNION),
                                    (("soft_targets.rows=all",), "distill.optim.batch_size=4", STUDENTS)]
ROWS["base.optim.lr"].append((("base.enabled=false",), "base.optim.lr=0.01", NOTHING))  # an untrained base
SEARCH_FLIPS = {"num_samples": "3", "max_groups": "2", "groupings": "['copy | reverse | add']",
                "temperature": "[1.0,2.0]", "alpha": "[0.5,1.0]", "seed_with_affinity": "false",
                "num_affinity_seeds": "1", "include_default": "false", "compare_random": "false",
                "proxy_steps": "100", "report_every": "5", "grace_period": "2", "reduction_factor": "3",
                "affinity_batches": "1", "affinity_batch_size": "8", "cpus_per_trial": "2", "gpus_per_trial": "1",
                "max_concurrent_trials": "1", "torch_threads": "2", "cache_dir": "/tmp/cache", "best_path": "/tmp/b.yaml",
                "default_margin": "0.1"}
for knob, value in SEARCH_FLIPS.items():  # the search is its own stage: the pipeline's stages never read it
    ROWS[f"search.{knob}"] = [((), f"search.{knob}={value}", NOTHING)]

# Keys that add or remove stages rather than change one: each has its own test below.
STRUCTURAL = {"tasks.builtin", "tasks.sources", "experts.groups", "multitask.enabled", "upcycle.enabled", "grouping"}
CASES = [(key, context, flip, changed) for key, rows in ROWS.items() for context, flip, changed in rows]


def _hashes(*overrides):
    return pipeline_hashes(load_config(None, ["tasks.builtin=[copy,reverse,add]", *overrides]))


def _leaves(node, prefix=""):
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            yield from _leaves(child, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_every_config_key_has_a_row():
    leaves = set(_leaves(OmegaConf.structured(PipelineConfig)))
    assert leaves - STRUCTURAL - set(ROWS) == set(), "add a row saying which stages the new key invalidates"
    assert set(ROWS) - leaves == set() and STRUCTURAL <= leaves


@pytest.mark.parametrize("key, context, flip, changed", CASES,
                         ids=[f"{flip}|{'+'.join(context)}" if context else flip for _, context, flip, _ in CASES])
def test_a_changed_setting_invalidates_exactly_its_downstream_stages(key, context, flip, changed):
    base_overrides = ["tasks.builtin=[copy,reverse,add]", *context]
    before_cfg, after_cfg = load_config(None, base_overrides), load_config(None, [*base_overrides, flip])
    as_container = [OmegaConf.select(OmegaConf.structured(c), key) for c in (before_cfg, after_cfg)]
    assert as_container[0] != as_container[1], f"{flip} does not change {key}: the row tests nothing"
    before, after = pipeline_hashes(before_cfg), pipeline_hashes(after_cfg)
    assert set(before) == set(after)
    assert {stage for stage in before if before[stage] != after[stage]} == changed


def test_regrouping_retrains_only_the_groups_that_changed():
    before = _hashes()
    after = _hashes("experts.groups=[[copy,reverse],[add]]")
    assert after["experts/add"] == before["experts/add"]  # same group, same base, same config: reused
    assert "experts/copy+reverse" in after and "experts/copy" not in after
    assert "soft_targets/copy+reverse" in after and after["soft_targets/add"] == before["soft_targets/add"]
    assert {s for s in before.keys() & after.keys() if before[s] != after[s]} == {"upcycle", "soft_targets"} | STUDENTS


def test_adding_a_task_invalidates_everything_from_the_base():
    before, after = _hashes(), _hashes("tasks.builtin=[copy,reverse,add,sort]")
    assert set(after) == set(before) | {"experts/sort", "soft_targets/sort"}
    assert {s for s in before if before[s] != after[s]} == EVERYTHING  # the base pretrains on the new mixture


def test_adding_a_task_to_a_pinned_base_invalidates_only_its_group_and_what_reads_every_group():
    before = _hashes()
    after = _hashes("tasks.builtin=[copy,reverse,add,sort]", "base.tasks=[copy,reverse,add]")
    assert set(after) == set(before) | {"experts/sort", "soft_targets/sort"}
    assert {s for s in before if before[s] != after[s]} == {"upcycle", "soft_targets"} | STUDENTS


def test_a_user_task_source_counts_like_a_builtin_one(tmp_path):
    sources = ("tasks.sources=[{name: mine, source: jsonl, data_files: {train: a.jsonl, validation: b.jsonl, "
               "test: c.jsonl}}]")
    before, after = _hashes(sources), _hashes(sources.replace("c.jsonl", "d.jsonl"))
    assert {s for s in before if before[s] != after[s]} == EVERYTHING | {"experts/mine", "soft_targets/mine"}


def test_disabling_upcycling_drops_its_stage_and_touches_nothing_else_upstream():
    before, after = _hashes(), _hashes("upcycle.enabled=false")
    assert set(before) - set(after) == {"upcycle"}
    assert {stage for stage in after if before[stage] != after[stage]} == {"eval"}


def test_disabling_the_baseline_drops_its_stage_but_keeps_the_student():
    before, after = _hashes(), _hashes("multitask.enabled=false")
    assert set(before) - set(after) == {"multitask"}
    assert {stage for stage in after if before[stage] != after[stage]} == {"eval"}


def test_grouping_from_search_takes_groups_and_kd_knobs_from_best_yaml(tmp_path):
    best = tmp_path / "best.yaml"
    best.write_text("grouping: copy+reverse | add\ngroups: [[copy, reverse], [add]]\ntemperature: 3.0\nalpha: 0.3\n")
    searched = _hashes("grouping=from_search", f"search.best_path={best}")
    by_hand = _hashes("experts.groups=[[copy,reverse],[add]]", "distill.temperature=3.0", "distill.alpha=0.3")
    assert searched == by_hand


# Computed at 7a98660, before `logprob_format_key` joined the 8-bit soft-target key of the stage hash and the
# search proxy's cache key: that refactor must leave every stage hash where it was (a moved hash retrains a run).
PINNED_SOFT_TARGETS = {(): {"soft_targets/copy": "1a11dc89a6ce35f3", "soft_targets": "eb80019af5e9ca6a"},
                       ("soft_targets.logprob_bits=8",): {"soft_targets/copy": "ed0da6d380418fa8",
                                                          "soft_targets": "51d5f3f65205ca60"}}


@pytest.mark.parametrize("overrides", list(PINNED_SOFT_TARGETS), ids=["16 bits", "8 bits"])
def test_soft_target_hashes_are_the_ones_computed_before_the_format_key_refactor(overrides):
    hashes = _hashes(*overrides)
    assert {stage: hashes[stage] for stage in PINNED_SOFT_TARGETS[overrides]} == PINNED_SOFT_TARGETS[overrides]
