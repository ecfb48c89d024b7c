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

import ray
import ray.data
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from dume_ray import manifest
from dume_ray.config import PipelineConfig, ResourcesConfig, to_dict
from dume_ray.dashboards import mlflow_tracking_uri, tensorboard_dir
from dume_ray.data.encode import training_order
from dume_ray.experts.worker import train_fn_per_worker
from dume_ray.model import create_initial_model, expert_trainable, load_tokenizer
from dume_ray.stage_hashes import base_hash, expert_hash, pipeline_hashes
from dume_ray.tasks import encode_rows, load_tasks


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
    print(f"[base] validation exact-match {_mean(result['validation']):.3f}", flush=True)
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
        self.validation = {n: [(e.prompt, e.response) for e in t.examples("validation")] for n, t in validation_tasks.items()}


def run_training_jobs(cfg: PipelineConfig, jobs: list[TrainingJob], optim, resources: ResourcesConfig,
                      stage_dir: str, trainable: dict | None = None,
                      on_finish: Callable[[str, dict], None] | None = None) -> dict[str, dict]:
    """Fit one TorchTrainer per job, concurrently, printing a line and calling `on_finish(label, result)` as
    each finishes; {label: return value}. `trainable`: what the jobs train (`model.make_trainable`'s keywords:
    MLP only, LoRA); None trains every weight."""
    pending = {}
    for job in jobs:
        loop_config = {"label": job.label, "init_dir": job.init_dir, "output_dir": job.output_dir,
                       "optim": to_dict(optim), "seed": cfg.seed, "torch_threads": resources.torch_threads,
                       "num_workers": resources.num_workers, "dtype": cfg.model.dtype,
                       "gradient_checkpointing": cfg.model.gradient_checkpointing,
                       "trainable": trainable or {}, "validation": job.validation,
                       "max_new_tokens": cfg.eval.max_new_tokens,
                       "local_checkpoint_dir": local_checkpoint_dir(os.path.dirname(job.output_dir), job.config_hash, resources),
                       "history_path": history_path(os.path.dirname(job.output_dir), job.config_hash),
                       "run_name": f"{job.label}-{job.config_hash}", "experiment": cfg.name,
                       "mlflow_tracking_uri": mlflow_tracking_uri(cfg.mlflow_tracking_uri),
                       "tensorboard_dir": tensorboard_dir(cfg.run_dir, os.path.basename(stage_dir), job.label)}
        pending[job.label] = (loop_config, ray.data.from_items(training_order(job.rows, cfg.seed)))
    return fit_concurrently(train_fn_per_worker, pending, resources, os.path.abspath(f"{stage_dir}/ray_train"),
                            stage=os.path.basename(stage_dir), on_finish=on_finish)


def fit_concurrently(train_fn: Callable, pending: dict[str, tuple[dict, object]], resources: ResourcesConfig,
                     storage_path: str, stage: str, on_finish: Callable[[str, dict], None] | None = None) -> dict[str, dict]:
    """Run `trainer.fit()` for each (loop_config, dataset) in its own Ray task; at most
    `resources.max_concurrent_jobs` at once (0 = let the cluster's free resources decide)."""
    limit = resources.max_concurrent_jobs or len(pending) or 1
    # In local mode the training runs inside the task, so the task holds the CPUs; otherwise it only drives.
    task_cpus = resources.cpus_per_worker if resources.num_workers == 0 else 0
    # A died task (its node lost, its process killed) is retried; the rerun resumes from the checkpoint.
    fit = ray.remote(num_cpus=task_cpus, max_retries=resources.max_failures)(_fit)
    queue, running, results, start = list(pending.items()), {}, {}, time.time()
    total = len(queue)
    while queue or running:
        while queue and len(running) < limit:
            label, (loop_config, dataset) = queue.pop(0)
            ref = fit.remote(train_fn, loop_config, to_dict(resources), dataset, storage_path, loop_config["run_name"])
            running[ref] = label
        done, _ = ray.wait(list(running), num_returns=1)
        label = running.pop(done[0])
        results[label] = ray.get(done[0])
        scores = results[label].get("validation", {})
        print(f"[{stage}] {len(results)}/{total} finished: {label} validation exact-match "
              f"{_mean(scores):.3f} ({time.time() - start:.0f} s since stage start)", flush=True)
        if on_finish:
            on_finish(label, results[label])
    return results


def _fit(train_fn: Callable, loop_config: dict, resources: dict, dataset, storage_path: str, name: str) -> dict:
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=resources["num_workers"], use_gpu=resources["use_gpu"],
                                     resources_per_worker={"CPU": resources["cpus_per_worker"]}),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=resources["max_failures"])),
        datasets={"train": dataset},
    )
    return trainer.fit().return_value


def local_checkpoint_dir(job_dir: str, config_hash: str, resources: ResourcesConfig):
    """Local mode keeps its checkpoint in the job folder, keyed by config hash (older ones are removed)."""
    if resources.num_workers > 0:
        return None
    keep = f"checkpoint-{config_hash}"
    if os.path.isdir(job_dir):
        for name in os.listdir(job_dir):
            if name.startswith("checkpoint-") and name != keep:
                shutil.rmtree(os.path.join(job_dir, name), ignore_errors=True)
    return os.path.join(job_dir, keep)


def history_path(job_dir: str, config_hash: str) -> str:
    """The job's step log (see worker_utils.StepHistory), keyed by config hash like its checkpoints."""
    keep = f"history-{config_hash}.jsonl"
    if os.path.isdir(job_dir):
        for name in os.listdir(job_dir):
            if name.startswith("history-") and name != keep:
                os.remove(os.path.join(job_dir, name))
    return os.path.join(job_dir, keep)


def finished_experts(cfg: PipelineConfig) -> dict[str, dict]:
    """{group: manifest} of every expert of this config; StageInputError when one is missing or stale."""
    hashes = pipeline_hashes(cfg)
    return {g: manifest.require(f"{cfg.run_dir}/experts/{g}", "experts", hashes[f"experts/{g}"]) for g in cfg.groups}


def _mean(scores: dict) -> float:
    return sum(scores.values()) / len(scores) if scores else float("nan")
