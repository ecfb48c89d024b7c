"""Driver side of the `base` and `experts` stages: one Ray Train `TorchTrainer` per job, jobs run at once.

    python -m dume_ray base --config configs/demo.yaml
    python -m dume_ray experts --config configs/demo.yaml experts.resources.num_workers=2

`run_base(cfg)` briefly pretrains the starting model on the whole task mixture so every expert starts from
one shared point; `run_experts(cfg)` fine-tunes one expert per task group from it. Each job's
`trainer.fit()` runs inside its own Ray task, so the groups train concurrently within the cluster's
resources (`resources` section of the config). Finished experts are skipped on rerun by their manifest.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Callable

import ray.data

from dume_ray import manifest
from dume_ray.config import PipelineConfig, ResourcesConfig
from dume_ray.data.encode import training_order
from dume_ray.experts.worker import train_fn_per_worker
from dume_ray.model import create_initial_model, expert_trainable, load_tokenizer
from dume_ray.stage_hashes import base_hash, expert_hash, pipeline_hashes
from dume_ray.tasks import encode_rows, load_tasks
from dume_ray.training_jobs import fit_concurrently, job_config, mean_score, validation_pairs


def run_base(cfg: PipelineConfig) -> dict:
    stage_dir = f"{cfg.run_dir}/base"
    stage_hash = base_hash(cfg)
    if manifest.is_done(stage_dir, stage_hash):
        print(f"[base] done already ({stage_dir}), skipping", flush=True)
        return manifest.read_manifest(stage_dir)
    start = time.time()
    init_dir = create_initial_model(cfg.model, cfg.seed, f"{stage_dir}/init", cfg.data)
    model_dir = f"{stage_dir}/model"
    if not cfg.base.enabled:
        shutil.copytree(init_dir, model_dir, dirs_exist_ok=True)
        return manifest.mark_done(stage_dir, stage_hash, {"model": model_dir}, seconds=time.time() - start)

    tokenizer = load_tokenizer(init_dir)
    tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
    rows = encode_rows(tasks, tokenizer, "train", cfg.model.max_seq_len, {t: "base" for t in tasks})
    job = TrainingJob("base", init_dir, model_dir, rows, {t: tasks[t] for t in tasks}, stage_hash)
    result = run_training_jobs(cfg, [job], cfg.base.optim, cfg.base.resources, stage_dir)["base"]
    print(f"[base] validation exact-match {mean_score(result['validation']):.3f}", flush=True)
    return manifest.mark_done(stage_dir, stage_hash, {"model": model_dir}, metrics=result,
                              inputs={"init": init_dir}, seconds=time.time() - start)


def run_experts(cfg: PipelineConfig) -> dict[str, dict]:
    base = manifest.require(f"{cfg.run_dir}/base", "base", base_hash(cfg))
    base_dir = base["outputs"]["model"]
    tokenizer = load_tokenizer(base_dir)
    tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
    manifests, jobs, hashes = {}, [], {}
    for group, names in cfg.groups.items():
        group_dir = f"{cfg.run_dir}/experts/{group}"
        hashes[group] = expert_hash(base["config_hash"], names, cfg)
        if manifest.is_done(group_dir, hashes[group]):
            print(f"[experts] {group}: done already, skipping", flush=True)
            manifests[group] = manifest.read_manifest(group_dir)
            continue
        rows = encode_rows({t: tasks[t] for t in names}, tokenizer, "train", cfg.model.max_seq_len, {t: group for t in names})
        jobs.append(TrainingJob(group, base_dir, f"{group_dir}/model", rows, {t: tasks[t] for t in names}, hashes[group]))

    def mark_expert_done(group: str, result: dict) -> None:  # at once, so a driver crash keeps finished experts
        group_dir = f"{cfg.run_dir}/experts/{group}"
        manifests[group] = manifest.mark_done(group_dir, hashes[group], {"model": f"{group_dir}/model"},
                                              metrics=result, inputs={"base": base_dir, "tasks": cfg.groups[group]},
                                              seconds=result["train_seconds"])

    run_training_jobs(cfg, jobs, cfg.experts.optim, cfg.experts.resources, f"{cfg.run_dir}/experts",
                      trainable=expert_trainable(cfg.experts), on_finish=mark_expert_done)
    return manifests


class TrainingJob:
    """One model to train with cross-entropy: where it starts, where it goes, what it reads."""

    def __init__(self, label: str, init_dir: str, output_dir: str, rows: list[dict], validation_tasks: dict, config_hash: str):
        if not rows:
            raise ValueError(f"{label}: no training examples")
        self.label, self.init_dir, self.output_dir, self.rows = label, init_dir, output_dir, rows
        self.config_hash = config_hash  # checkpoints are keyed by it: a changed config never resumes a stale run
        self.validation = validation_pairs(validation_tasks)


def run_training_jobs(cfg: PipelineConfig, jobs: list[TrainingJob], optim, resources: ResourcesConfig,
                      stage_dir: str, trainable: dict | None = None,
                      on_finish: Callable[[str, dict], None] | None = None) -> dict[str, dict]:
    """Fit one TorchTrainer per job, concurrently, printing a line and calling `on_finish(label, result)` as
    each finishes; {label: return value}. `trainable`: what the jobs train (`model.make_trainable`'s keywords:
    MLP only, LoRA); None trains every weight."""
    pending = {}
    for job in jobs:
        loop_config = {**job_config(cfg, job.label, job.init_dir, job.output_dir, optim, resources, job.config_hash,
                                    job.validation, os.path.basename(stage_dir)),
                       "trainable": trainable or {}}
        pending[job.label] = (loop_config, ray.data.from_items(training_order(job.rows, cfg.seed)))
    return fit_concurrently(train_fn_per_worker, pending, resources, os.path.abspath(f"{stage_dir}/ray_train"),
                            stage=os.path.basename(stage_dir), on_finish=on_finish)


def finished_experts(cfg: PipelineConfig) -> dict[str, dict]:
    """{group: manifest} of every expert of this config; StageInputError when one is missing or stale."""
    hashes = pipeline_hashes(cfg)
    return {g: manifest.require(f"{cfg.run_dir}/experts/{g}", "experts", hashes[f"experts/{g}"]) for g in cfg.groups}
