"""Driver side of every Ray Train job of ours (base, experts, student, multitask): the plain-data config a
worker's `worker_utils.training_run` reads, its checkpoint and step-log paths, and `fit_concurrently`, which
runs one `TorchTrainer.fit()` per job in its own Ray task so jobs train side by side.

    pending = {label: (job_config(cfg, label, init_dir, output_dir, optim, resources, job_hash, validation, stage),
                       dataset)}
    fit_concurrently(train_fn_per_worker, pending, resources, storage_path, stage, on_finish=mark_done)

The stage launchers (`experts/launch.py`, `distill/launch.py`) decide which jobs to run and what each one
adds to the config (what it trains, its distillation settings); everything every job needs is set here once.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Callable

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from dume_ray import storage
from dume_ray.config import OptimConfig, PipelineConfig, ResourcesConfig, to_dict
from dume_ray.dashboards import mlflow_tracking_uri, tensorboard_dir
from dume_ray.resources import TRAIN_MEMORY_FACTOR, idle_core_share, job_memory_bytes


def job_config(cfg: PipelineConfig, label: str, init_dir: str, output_dir: str, optim: OptimConfig,
               resources: ResourcesConfig, job_hash: str, validation: dict, stage: str) -> dict:
    """What `worker_utils.training_run` reads, as plain data: train `init_dir` into `output_dir` with `optim`
    on `resources`, score on `validation` ({task: [(prompt, response)]}); checkpoints, step log and the Ray
    Train run name are keyed by `job_hash`, so a changed config never resumes a stale run."""
    job_dir = os.path.dirname(output_dir)
    return {
        "label": label, "init_dir": init_dir, "output_dir": output_dir, "optim": to_dict(optim), "seed": cfg.seed,
        "torch_threads": resources.torch_threads, "num_workers": resources.num_workers, "dtype": cfg.model.dtype,
        "gradient_checkpointing": cfg.model.gradient_checkpointing, "validation": validation,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "local_checkpoint_dir": local_checkpoint_dir(job_dir, job_hash, resources),
        "history_path": history_path(job_dir, job_hash),
        "run_name": f"{label}-{job_hash}",  # Ray Train resumes a run of this name: never one of another config
        "experiment": cfg.name, "mlflow_tracking_uri": mlflow_tracking_uri(cfg.mlflow_tracking_uri),
        "tensorboard_dir": tensorboard_dir(cfg.run_dir, stage, label),
    }


def validation_pairs(tasks: dict) -> dict[str, list[tuple[str, str]]]:
    """{task: [(prompt, response)] of its validation split}: what a job scores its final model on."""
    return {n: [(e.prompt, e.response) for e in t.examples("validation")] for n, t in tasks.items()}


def fit_concurrently(train_fn: Callable, pending: dict[str, tuple[dict, object]], resources: ResourcesConfig,
                     storage_path: str, stage: str, on_finish: Callable[[str, dict], None] | None = None) -> dict[str, dict]:
    """Run `trainer.fit()` for each (loop_config, dataset) in its own Ray task; at most
    `resources.max_concurrent_jobs` at once (0 = let the cluster's free resources decide). Each job (its
    task in local mode, each worker otherwise) asks for memory sized from its initial model
    (`resources.job_memory_bytes`)."""
    limit = resources.max_concurrent_jobs or len(pending) or 1
    # In local mode the training runs inside the task, so the task holds the CPUs; otherwise it only drives.
    # Fewer local-mode jobs than free cores (the base alone, one added expert): each takes a whole share of them.
    share = 1
    if resources.num_workers == 0 and resources.torch_threads > 0:
        share = idle_core_share(resources.cpus_per_worker, min(limit, len(pending)),
                                ray.available_resources().get("CPU", 0), largest_node("CPU"), resources.share_idle_cores)
    task_cpus = resources.cpus_per_worker * share if resources.num_workers == 0 else 0
    # A died task (its node lost, its process killed) is retried; the rerun resumes from the checkpoint.
    fit = ray.remote(num_cpus=task_cpus, max_retries=resources.max_failures)(_fit)
    largest_memory = largest_node("memory")  # once per stage: a job's memory request never exceeds it
    queue, running, results, start = list(pending.items()), {}, {}, time.time()
    total = len(queue)
    store = storage.active()
    if store is not None:
        store.push()  # what the driver made for these jobs (an init folder), for workers on other nodes
    while queue or running:
        while queue and len(running) < limit:
            label, (loop_config, dataset) = queue.pop(0)
            loop_config = {**loop_config, "submitted_at": time.time(),  # the job's profile counts worker start from here
                           "torch_threads": loop_config["torch_threads"] * share}
            memory = job_memory_bytes(loop_config["init_dir"], TRAIN_MEMORY_FACTOR, largest_memory)
            ref = fit.options(memory=memory if resources.num_workers == 0 else None).remote(
                train_fn, loop_config, {**to_dict(resources), "memory": memory}, dataset, storage_path, loop_config["run_name"])
            running[ref] = label, loop_config["submitted_at"]
        done, _ = ray.wait(list(running), num_returns=1)
        label, submitted_at = running.pop(done[0])
        results[label] = ray.get(done[0])
        if store is not None:  # its model, saved and pushed by a worker that may be on another node
            store.fetch(pending[label][0]["output_dir"])
        if "profile" in results[label]:  # what the job's own phases leave out: Ray Train's shutdown, the result's way back
            profile = results[label]["profile"]
            profile["job wall"] = round(time.time() - submitted_at, 2)
            profile["teardown"] = round(profile["job wall"] - sum(v for k, v in profile.items() if k != "job wall"), 2)
        scores = results[label].get("validation", {})
        print(f"[{stage}] {len(results)}/{total} finished: {label} validation exact-match "
              f"{mean_score(scores):.3f} ({time.time() - start:.0f} s since stage start)", flush=True)
        if on_finish:
            on_finish(label, results[label])
    return results


def largest_node(resource: str) -> float:
    """The most of `resource` ("CPU", "memory") any live node of the cluster offers Ray (0 when unknown)."""
    return max((node["Resources"].get(resource, 0) for node in ray.nodes() if node.get("Alive")), default=0)


def _fit(train_fn: Callable, loop_config: dict, resources: dict, dataset, storage_path: str, name: str) -> dict:
    filesystem, store = None, storage.active()
    if store is not None and store.relative(storage_path) is not None:  # checkpoints on the run's storage
        storage_path, filesystem = store.ray_train_storage(storage_path)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=resources["num_workers"], use_gpu=resources["use_gpu"],
                                     resources_per_worker={"CPU": resources["cpus_per_worker"],
                                                           **({"memory": resources["memory"]} if resources["num_workers"] else {})}),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=resources["max_failures"])),
        datasets={"train": dataset},
    )
    global _JOBS_IN_THIS_PROCESS
    cpu = time.process_time()
    result = trainer.fit().return_value
    if result:  # the compute the job cost, beside its wall time: every thread of this process (local mode: the
        #          whole job; with Ray Train workers only the driving of them, their own CPU is in their processes)
        result["cpu_seconds"] = round(time.process_time() - cpu, 2)
        # a worker process's first job also paid its start (interpreter, imports of torch and Ray Train); Ray
        # reuses the process for later jobs, which then pay none
        result["process_start_cpu_seconds"] = round(cpu, 2) if _JOBS_IN_THIS_PROCESS == 0 else 0.0
    _JOBS_IN_THIS_PROCESS += 1
    return result


_JOBS_IN_THIS_PROCESS = 0  # `_fit` calls so far in this (Ray worker) process


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


def mean_score(scores: dict) -> float:
    return sum(scores.values()) / len(scores) if scores else float("nan")
