"""What each stage's output depends on: one content hash per stage, folding in the hashes of the stages it reads.

A stage is skipped on rerun only when its `DONE.json` holds the hash computed here from the current config
(see `manifest.py`), so changing a setting invalidates exactly the stages downstream of it, e.g.
`distill.temperature` -> `student` and `eval`; `experts.optim.lr` -> every expert, `soft_targets`, `student`,
`multitask` and `eval`; `eval.max_new_tokens` -> `eval` only. A knob the configured run does not use (LoRA
scale without LoRA, `jsd_beta` without the JSD, `base.optim` with `base.enabled=false`, ...) and bookkeeping
(`optim.checkpoint_every`, resources) invalidate nothing: they are hashed at their defaults (`_optim`, `_upcycle`, ...), so a
config that leaves them alone keeps its hashes. The dependency graph is all in this file:

    base ─► experts/<group> ─┬─► soft_targets/<group> ─► student ─┐
                             │                       └─► multitask ┼─► eval
                             └─► upcycle ──────────────────────────┘

An expert and its group's soft targets depend on that group's own tasks only (`task_data`), so a run that
gains or loses a task retrains one expert and rescores one group; the student reads the union of the groups.
With `soft_targets.rows=read` the union (not each group) also hashes the student's read budget (`score_budget`:
steps x batch size), which decides how many of a group's rows are scored (data/student_rows.py): a group's rows
are the first of one seeded order, so a group that already holds every row the new budget draws keeps its hash
and shards, and the union's stage rescores only the groups left short (`soft_targets.launch.short_groups`).
A student (or baseline) continued after such an edit (`distill.continue_from`, set by `add-task`) hashes its
parent's stage hash and its own steps instead of its init, so a chain of edits gives a chain of hashes.

    from dume_ray.stage_hashes import pipeline_hashes
    pipeline_hashes(cfg)   # {"base": ..., "experts/copy": ..., "soft_targets": ..., "student": ..., "eval": ...}

Pure: no Ray here. Tested in tests/unit/test_stage_hashes.py.
"""

from __future__ import annotations

import dataclasses

from dume_ray.config import (BaseConfig, DistillConfig, ExpertsConfig, OptimConfig, PipelineConfig, SoftTargetsConfig,
                             UpcycleConfig, config_hash)


def _optim(optim: OptimConfig) -> OptimConfig:
    """The optimizer knobs that change weights: checkpoint_every only sets when checkpoints (and validation
    curves) are written; an uninterrupted run trains the same weights whatever it is."""
    return dataclasses.replace(optim, checkpoint_every=OptimConfig.checkpoint_every)


def task_data(cfg: PipelineConfig, names: list[str]) -> dict:
    """What the examples of `names` depend on, and nothing about the other tasks: each built-in task is generated
    from its own name and the shared seed/sizes; each user task from its own source. Adding or removing a task
    thus leaves every other task's experts and soft targets valid."""
    t = cfg.tasks
    sources = {s.name: s for s in t.sources}
    return {"tasks": {n: sources[n] if n in sources else "builtin" for n in sorted(names)},
            "builtin": (t.seed, t.num_train, t.num_validation, t.num_test), "rows": (t.skip_bad_rows, t.too_long),
            "max_seq_len": cfg.model.max_seq_len}


def base_tasks(cfg: PipelineConfig) -> list[str]:
    """The tasks the base pretrains on: `base.tasks`, or every task (a run that gained a task keeps its base)."""
    return list(cfg.base.tasks) or cfg.tasks.names


def base_hash(cfg: PipelineConfig) -> str:
    # Not base.resources, nor gradient checkpointing: where and how memory-thrifty a job runs changes no weight.
    # With base.enabled=false the base is the initial model as is: no training knob and no task data reach it.
    model = dataclasses.replace(cfg.model, gradient_checkpointing=False)
    optim = _optim(cfg.base.optim) if cfg.base.enabled else BaseConfig().optim
    data = task_data(cfg, base_tasks(cfg)) if cfg.base.enabled else None
    return config_hash("base", cfg.seed, model, cfg.data, data, cfg.base.enabled, optim)


def expert_hash(base: str, task_names: list[str], cfg: PipelineConfig) -> str:
    """Content hash of (the group's own tasks' data, base model, expert config): equal hashes mean reusable
    experts, whatever other groups the run has."""
    e = cfg.experts
    lora = (e.lora_alpha, e.lora_dropout) if e.lora_rank else (ExpertsConfig.lora_alpha, ExpertsConfig.lora_dropout)
    trainable = (e.train_mlp_only, e.lora_rank, *lora)
    return config_hash("expert", base, task_data(cfg, task_names), _optim(e.optim), trainable)


EIGHT_BIT_FORMAT = 2  # version of the 8-bit layout: 2 = tokens below its floor stored as padding, mass in the tail


def logprob_format_key(soft_targets: SoftTargetsConfig) -> tuple:
    """What the stored log-prob format adds to a hash of soft targets, spread into `config_hash`
    (`config_hash(..., *logprob_format_key(cfg.soft_targets))`): nothing at the default 16 bits, so those hashes
    are what they were before 8 bits existed; else one entry, the bits and the 8-bit layout's version
    (`EIGHT_BIT_FORMAT`), so a new layout invalidates the old shards. Used by the soft-target stage hash and
    the search proxy's expert cache key (`search.proxy.expert_cache_key`)."""
    bits = soft_targets.logprob_bits
    return () if bits == 16 else (("logprob_bits", bits, EIGHT_BIT_FORMAT),)


def soft_target_group_hash(cfg: PipelineConfig, task_names: list[str], expert: str) -> str:
    """One group's soft targets: its expert, its tasks' training rows, k and kl_max when adaptive (left out at its
    default 0, so fixed-k runs keep their hashes), logprob_bits when not the default 16 (likewise). Not how many rows are scored: that is the union's
    (`soft_targets_hash`), so an edit that changes the students' budget (a task added) keeps every group that
    still holds the rows it needs."""
    st = cfg.soft_targets
    k = (st.top_k, "kl_max", st.kl_max) if st.kl_max > 0 else st.top_k
    return config_hash("soft_targets", expert, k, task_data(cfg, task_names), *logprob_format_key(st))


def read_budget(cfg: PipelineConfig, stage: str) -> int:
    """How many rows `stage` ("student" or "multitask") reads: its steps x batch size (`student_optim`), the
    budget `data.student_rows.rows_read` draws its rows with."""
    optim = student_optim(cfg, stage)
    return optim.steps * optim.batch_size


def score_budget(cfg: PipelineConfig) -> int | None:
    """The budget the soft targets are scored for: what a student trained from the init reads (`distill.optim`),
    or a continued student's when that is larger. A continued student (`add-task`) reads a subset of those rows
    (data/student_rows.py), so its parent's groups keep their hash and their shards. None = every training
    row, with `soft_targets.rows=all` or when the config alone shows the students read them all (built-in tasks
    only: at most num_train rows each)."""
    if cfg.soft_targets.rows == "all":
        return None
    optim = cfg.distill.optim
    budget = max(optim.steps * optim.batch_size, *(read_budget(cfg, stage) for stage in ("student", "multitask")))
    if not cfg.tasks.sources and budget >= cfg.tasks.num_train * len(cfg.tasks.names):
        return None
    return budget


def soft_targets_hash(cfg: PipelineConfig, expert_hashes: dict[str, str]) -> str:
    """The union the student reads: every group's soft targets, and the read budget they are scored for
    (`score_budget`; left out when every row is scored), so a changed budget reruns the stage, which checks
    every group for rows it lacks (cheap: it links shards and rescores only short groups)."""
    budget = score_budget(cfg)
    rows = () if budget is None else (("read", budget),)
    return config_hash("soft_targets_union", sorted(soft_target_group_hash(cfg, cfg.groups[g], h)
                                                    for g, h in expert_hashes.items()), *rows)


def student_hash(cfg: PipelineConfig, stage: str, soft_targets: str) -> str:
    """`stage` is "student" or "multitask". The baseline's hash leaves out the KD knobs it does not use
    (it trains with alpha = 0), so tuning T or alpha never retrains it."""
    d = cfg.distill
    on_policy = stage == "student" and d.on_policy_ratio > 0
    uses_jsd = d.divergence == "generalized_jsd" or (on_policy and d.on_policy_divergence == "generalized_jsd")
    jsd_beta = d.jsd_beta if uses_jsd else DistillConfig.jsd_beta
    kd = (d.alpha, d.temperature, d.divergence, jsd_beta, d.anneal) if stage == "student" else None
    if on_policy:  # (off-policy runs keep the hashes they had before)
        kd += (d.on_policy_ratio, d.on_policy_divergence, d.on_policy_sample)
        if d.on_policy_schedule != "interleaved":  # (interleaved runs keep the hashes they had before)
            kd += (d.on_policy_schedule,)
    if stage == "student" and d.teacher_schedule != "interleaved":  # the baseline always reads the mixed stream
        kd += (d.teacher_schedule,) if d.teacher_schedule != "annealed" else ("annealed", "over the step budget")
        # (a student annealed per epoch, as before, is not this one: it trains again)
    student_model = d.student_model if d.init == "scratch" else None  # the base's own architecture otherwise
    parent = parent_hash(cfg, stage)
    if parent:  # continued from a finished model: its hash (which folds in its own parent) and the steps added
        return config_hash(stage, soft_targets, _optim(student_optim(cfg, stage)), cfg.seed, kd, "continues", parent)
    return config_hash(stage, soft_targets, _optim(d.optim), d.init, student_model, cfg.seed, kd)


def parent_hash(cfg: PipelineConfig, stage: str) -> str:
    """The stage hash of the finished student or baseline that `stage` continues from; "" = trained from the init."""
    return getattr(cfg.distill.continue_from, stage)


def student_optim(cfg: PipelineConfig, stage: str) -> OptimConfig:
    """`distill.optim`, or for a continued stage the same with `distill.continue_steps` steps (0: the optim's
    steps / number of groups, the share of the training a one-group change would get)."""
    d = cfg.distill
    if not parent_hash(cfg, stage):
        return d.optim
    return dataclasses.replace(d.optim, steps=d.continue_steps or max(1, d.optim.steps // len(cfg.groups)))


def upcycle_hash(cfg: PipelineConfig, expert_hashes: dict[str, str]) -> str:
    """The MoE depends on the upcycle config (the random-routing seed is eval's business), the experts and data."""
    u = _upcycle(cfg)
    knobs = (u.ridge_lambda, u.top_k, u.normalize_columns, u.routing, u.stats_examples_per_task, u.batch_size,
             u.dume_plus_steps, u.dume_plus_lr, cfg.seed)
    return config_hash("upcycle", knobs, task_data(cfg, cfg.tasks.names), expert_hashes)


def router_stats_hash(cfg: PipelineConfig, expert_hashes: dict[str, str], group: str) -> str:
    """One group's DUME router statistics (its expert forced over its tasks' examples, through the MoE's trunk).
    With MLP-only experts every expert's trunk is the base's, so the statistics depend on that group's expert
    alone and survive adding or removing another expert; otherwise the trunk is the average of all experts."""
    trunk = None if cfg.experts.train_mlp_only else sorted(expert_hashes.values())
    return config_hash("router_stats", trunk, expert_hashes[group], task_data(cfg, cfg.groups[group]),
                       cfg.upcycle.stats_examples_per_task)


def eval_hash(cfg: PipelineConfig, model_hashes: dict[str, str]) -> str:
    """`model_hashes`: {report label: the scored model's stage hash}, e.g. {"base": ..., "expert:copy": ...}.
    With the MoE in the report, which routings it shows (and the random-routing seed) count too."""
    scoring = dataclasses.replace(cfg.eval, gpus_per_task=0)  # where it runs does not change the scores
    return config_hash("eval", scoring, task_data(cfg, cfg.tasks.names), model_hashes, _upcycle(cfg) if cfg.upcycle_active else None)


def _upcycle(cfg: PipelineConfig) -> UpcycleConfig:
    """DUME+'s learning rate counts only when DUME+ runs (dume_plus_steps > 0)."""
    u = cfg.upcycle
    return u if u.dume_plus_steps else dataclasses.replace(u, dume_plus_lr=UpcycleConfig.dume_plus_lr)


def pipeline_hashes(cfg: PipelineConfig) -> dict[str, str]:
    """Every stage's hash for this config, as the stages compute them when they run."""
    hashes = {"base": base_hash(cfg)}
    experts = {g: expert_hash(hashes["base"], names, cfg) for g, names in cfg.groups.items()}
    hashes.update({f"experts/{g}": h for g, h in experts.items()})
    hashes.update({f"soft_targets/{g}": soft_target_group_hash(cfg, cfg.groups[g], h) for g, h in experts.items()})
    hashes["soft_targets"] = soft_targets_hash(cfg, experts)
    models = {"base": hashes["base"], **{f"expert:{g}": h for g, h in experts.items()}}
    if cfg.upcycle_active:
        hashes["upcycle"] = models["weight_average"] = upcycle_hash(cfg, experts)
    for stage in ("student", "multitask"):
        if stage == "multitask" and not cfg.multitask.enabled:
            continue
        hashes[stage] = models[stage] = student_hash(cfg, stage, hashes["soft_targets"])
    hashes["eval"] = eval_hash(cfg, models)
    return hashes
