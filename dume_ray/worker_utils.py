"""What every Ray Train worker of ours does the same way: the training loop with its device, data stream,
checkpoints, progress, step history, dashboards and final save + validation; the job's result also carries
its phases (`profile`), the response `tokens` it trained on and its process's `peak_rss_mb`.

`training_run(config, train_step)` is one training job around `training.train_loop` (the loop the search
proxy and the benchmarks run too); `experts/worker.py` (base and experts, `training.ce_step`) and
`distill/worker.py` (student and multitask baseline, `training.kd_step`) only choose the step.
Checkpoints go through Ray Train: rank 0 writes the training state and passes it to `ray.train.report`,
and on a restart (worker failure, or the same run rerun after a driver crash) `ray.train.get_checkpoint()`
hands it back. Ray Train's local mode (`num_workers=0`) keeps checkpoints in memory only, so there we
also keep the latest one in the stage folder.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import tempfile
import time
from typing import Callable, Iterator, Optional

import numpy as np
import ray.train
import ray.train.torch
import torch

from dume_ray.config import OptimConfig, from_dict
from dume_ray.dashboards import ScalarLog
from dume_ray import storage
from dume_ray.manifest import atomic_dir
from dume_ray.model import enable_gradient_checkpointing, load_model, load_tokenizer, make_trainable, merge_adapters
from dume_ray.resources import peak_rss_mb, reset_peak_rss
from dume_ray.tasks.base import Example, Task
from dume_ray.training import (TrainStep, evaluate_tasks, load_training_state, make_optimizer, save_training_state,
                               train_loop, validation_loss)


def training_run(config: dict, train_step: TrainStep,
                 after_save: Optional[Callable[[torch.nn.Module, object, dict], dict]] = None) -> dict:
    """One training job on this worker, from `config["init_dir"]` to a saved, validated `config["output_dir"]`.

    Resumes from the latest checkpoint, streams Ray Data shard "train", runs the pure `train_step` until
    `optim.steps`, reports a checkpoint every `checkpoint_every` steps, and on rank 0 saves the model and
    scores it on validation. Returns the result dict (rank 0; {} on other ranks)."""
    phases = Phases(config.get("submitted_at"))
    reset_peak_rss()  # a Ray worker process is reused across jobs: its peak so far is another job's
    optim = from_dict(OptimConfig, config["optim"])
    device = setup_worker(config["seed"], config["torch_threads"])
    phases.enter("model build")
    tokenizer = load_tokenizer(config["init_dir"])
    model = make_trainable(load_model(config["init_dir"]), **config.get("trainable", {}))
    if config.get("gradient_checkpointing"):
        enable_gradient_checkpointing(model)
    model = ray.train.torch.prepare_model(model) if config["num_workers"] > 0 else model.to(device)
    optimizer, scheduler = make_optimizer(model, optim)
    step = restore_checkpoint(model, optimizer, scheduler, config.get("local_checkpoint_dir"))
    history = StepHistory(config["history_path"], step)
    progress = Progress(config["label"], optim.steps, every=max(1, optim.steps // 10))
    dashboards = open_dashboards(config, step)  # rank 0: TensorBoard (+ MLflow when configured)
    batches = phases.timed_iter(resumed_stream(
        lambda seed: batch_stream("train", per_worker_batch_size(optim.batch_size), seed=seed,
                                  keep_in_memory=config.get("keep_in_memory", False)),
        config["seed"], step, ordered=config.get("ordered_stream", False)), "data load")
    start = time.time()

    def on_step(step: int, metrics: dict) -> None:
        history.append(step, metrics)
        progress(step, metrics)
        if dashboards:
            dashboards.log(step, {**metrics, "lr": scheduler.get_last_lr()[0]}, "train")

    def on_checkpoint(step: int, metrics: dict) -> None:
        with phases.pause("steps", "checkpoint"):
            if dashboards:
                dashboards.log(step, validation_loss(unwrap(model), tokenizer, config["validation"]), "val_loss")
            report_checkpoint({**metrics, "step": step}, model, optimizer, scheduler, step, config.get("local_checkpoint_dir"))

    # ---- the shared training loop: pure steps; Ray only in the reporting and checkpoint callbacks ---------
    phases.enter("steps")
    step, metrics = train_loop(model, optimizer, scheduler, batches, train_step, tokenizer.pad_token_id,
                               start_step=step, total_steps=optim.steps, checkpoint_every=optim.checkpoint_every,
                               device=device, on_step=on_step, on_checkpoint=on_checkpoint)

    # ---- save the Hugging Face model and score it on validation (rank 0) ---------------------------------
    result = save_and_validate(model, tokenizer, config, step, metrics, start, history, phases, after_save)
    phases.enter(None)
    if result:
        result["profile"] = phases.seconds
        result["tokens"] = progress.tokens  # response tokens trained on (since the start or the resume)
        result["peak_rss_mb"] = peak_rss_mb()  # this process's peak resident memory during the job
    if dashboards:
        dashboards.log(step, result["validation"], "validation")
        dashboards.close()
    return result


def setup_worker(seed: int, torch_threads: int) -> torch.device:
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    rank = ray.train.get_context().get_world_rank()
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)  # same init on every rank; DDP keeps them equal
    return ray.train.torch.get_device()


def is_rank_zero() -> bool:
    return ray.train.get_context().get_world_rank() == 0


def per_worker_batch_size(global_batch_size: int) -> int:
    world = ray.train.get_context().get_world_size()
    return max(1, global_batch_size // world)


def resumed_stream(make_stream: Callable[[int], Iterator], seed: int, step: int, ordered: bool) -> Iterator:
    """The batches a job resumed at `step` trains on. A mixed stream (interleaved teachers, experts, multitask)
    is reseeded with `seed + step`, so a resumed job does not replay the batches it has seen. An `ordered` one
    (`distill.teacher_schedule` sequential or annealed: the stream's order IS the schedule) restarts from its
    seed and skips the `step` batches already trained, so the job continues the schedule where its checkpoint
    left it instead of starting the one-teacher-at-a-time opening again."""
    if not ordered:
        return make_stream(seed + step)
    return itertools.islice(make_stream(seed), step, None)


def batch_stream(dataset_name: str, batch_size: int, seed: int, keep_in_memory: bool = False) -> Iterator[dict]:
    """Endless numpy batches from this worker's Ray Data shard, reshuffled locally every epoch.

    `keep_in_memory` (a shard the driver already holds in memory: the experts' rows, a soft-target stream
    within `soft_targets.cache_max_mb`): the first epoch streams from Ray Data and is kept; every later epoch
    is a seeded permutation of those rows in this process (batches as dicts of per-row values, like
    `data.encode.shuffled_batches`), instead of a new Ray Data execution per epoch (~0.2 s each, an expert
    runs a dozen)."""
    shard = ray.train.get_dataset_shard(dataset_name)
    epoch, kept = 0, []
    while True:
        empty = True
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=False,
                                        local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=seed + epoch):
            empty = False
            if keep_in_memory:
                kept.extend({k: v[i] for k, v in batch.items()} for i in range(len(next(iter(batch.values())))))
            yield batch
        if empty:
            raise ValueError(f"dataset {dataset_name!r} is empty for this worker: nothing to train on")
        epoch += 1
        if keep_in_memory:
            break
    while True:
        order = np.random.default_rng(seed + epoch).permutation(len(kept))
        for start in range(0, len(kept), batch_size):
            rows = [kept[i] for i in order[start:start + batch_size]]
            yield {k: [row[k] for row in rows] for k in rows[0]}
        epoch += 1


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def restore_checkpoint(model, optimizer, scheduler, local_checkpoint_dir: Optional[str]) -> int:
    """Resume from Ray Train's latest checkpoint (or, in local mode, the stage folder's); returns the step."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and local_checkpoint_dir:  # with a storage URI: the one another node wrote before it died
        local_checkpoint_dir = storage.fetch(local_checkpoint_dir)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            step, _ = load_training_state(directory, unwrap(model), optimizer, scheduler)
    elif local_checkpoint_dir and os.path.exists(os.path.join(local_checkpoint_dir, "state.pt")):
        step, _ = load_training_state(local_checkpoint_dir, unwrap(model), optimizer, scheduler)
    else:
        return 0
    if is_rank_zero():
        print(f"resumed from checkpoint at step {step}", flush=True)
    return step


def report_checkpoint(metrics: dict, model, optimizer, scheduler, step: int, local_checkpoint_dir: Optional[str]) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (Ray persists it to the run's storage)."""
    if not is_rank_zero():
        ray.train.report(metrics)
        return
    if local_checkpoint_dir:  # local mode: Ray keeps checkpoints in memory only, so keep ours on disk
        save_training_state(local_checkpoint_dir, unwrap(model), optimizer, scheduler, step)
        storage.push_path(local_checkpoint_dir)  # with a storage URI: a retry on another node resumes from it
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local_checkpoint_dir))
        return
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = save_training_state(os.path.join(tmp, "state"), unwrap(model), optimizer, scheduler, step)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(state_dir))


class StepHistory:
    """Rank 0's append-only log of every optimiser step, one JSON line each (`history-<config hash>.jsonl`
    in the job folder).

    Every attempt starts with a `{"start": step, "pid": ...}` line: step 0 for the first, the checkpoint's
    step after a crash. So the log shows exactly which steps were redone (those between the checkpoint and
    the crash) and that none were skipped. `summary()` goes into the stage's manifest.
    """

    def __init__(self, path: str, start_step: int):
        self.path, self.file = path, None
        if is_rank_zero():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.file = open(path, "a", buffering=1)
            self.file.write(json.dumps({"start": start_step, "pid": os.getpid(), "time": time.time()}) + "\n")

    def append(self, step: int, metrics: dict) -> None:
        if self.file:
            self.file.write(json.dumps({"step": step, "loss": metrics.get("loss")}) + "\n")

    def summary(self) -> dict:
        if not self.file:
            return {}
        self.file.close()
        starts, steps = read_history(self.path)
        return {"restarts": len(starts) - 1, "resumed_from": starts[1:], "steps_redone": len(steps) - len(set(steps))}


def read_history(path: str) -> tuple[list[int], list[int]]:
    """(the step each attempt started from, every step in the order it ran); a line cut short by a crash
    is ignored."""
    starts, steps = [], []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "start" in record:
                starts.append(record["start"])
            elif "step" in record:
                steps.append(record["step"])
    return starts, steps


class Progress:
    """One line every `every` steps on rank 0: `[copy] step 100/300 loss 0.512 tok/s 2140 (12.3 s)`; tok/s counts
    this worker's response tokens since it started (or resumed)."""

    def __init__(self, label: str, total_steps: int, every: int):
        self.label, self.total, self.every = label, total_steps, max(1, every)
        self.start, self.tokens = time.time(), 0

    def __call__(self, step: int, metrics: dict) -> None:
        self.tokens += int(metrics.get("tokens", 0))
        if is_rank_zero() and (step % self.every == 0 or step == self.total):
            seconds = time.time() - self.start
            shown = " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith("loss"))
            speed = f" tok/s {self.tokens / seconds:.0f}" if seconds > 0 and self.tokens else ""
            print(f"[{self.label}] step {step}/{self.total} {shown}{speed} ({seconds:.1f} s)", flush=True)


def save_and_validate(model, tokenizer, config: dict, step: int, metrics: dict, start: float,
                      history: StepHistory, phases: Optional["Phases"] = None,
                      after_save: Optional[Callable[[torch.nn.Module, object, dict], dict]] = None) -> dict:
    """Rank 0: `save_pretrained` the final model + tokenizer, score it on the validation pairs, then
    `after_save` (see `training_run`)."""
    if not is_rank_zero():
        return {}
    phases = phases or Phases(None)
    phases.enter("save")
    final = merge_adapters(unwrap(model))  # LoRA experts are saved as plain dense models
    with atomic_dir(config["output_dir"]) as tmp:
        final.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    storage.push_path(config["output_dir"])  # with a storage URI: the driver may run on another node
    validation = {name: Task(name, {"validation": [Example(p, r) for p, r in pairs]})
                  for name, pairs in config["validation"].items()}
    phases.enter("validation")
    scores = evaluate_tasks(final, tokenizer, validation, "validation", config["max_new_tokens"])
    result = {"steps": step, "final_loss": metrics.get("loss"), "validation": scores,
              "train_seconds": round(time.time() - start, 2), **history.summary()}
    if after_save:
        phases.enter("soft targets")
        result["after_save"] = after_save(final, tokenizer, config)
    return result


class Phases:
    """Where one job's wall time goes, in seconds per phase: "worker start" (from the driver submitting the job
    to this function running: Ray task, Ray Train controller and worker group start), "model build", "data
    load" (waiting on the Ray Data shard), "steps", "checkpoint", "save", "validation". One phase runs at a
    time: `enter(name)` ends the current one. Reported as the job's `profile` (benchmarks/end_to_end.py)."""

    def __init__(self, submitted_at: Optional[float]):
        now = time.time()
        self.seconds: dict[str, float] = {"worker start": round(now - submitted_at, 2)} if submitted_at else {}
        self.current, self.since = None, now

    def enter(self, name: Optional[str]) -> None:
        now = time.time()
        if self.current:
            self.seconds[self.current] = round(self.seconds.get(self.current, 0.0) + now - self.since, 2)
        self.current, self.since = name, now

    @contextlib.contextmanager
    def pause(self, outer: str, inner: str):
        """Time `inner` inside `outer`, then go back to `outer`."""
        self.enter(inner)
        try:
            yield
        finally:
            self.enter(outer)

    def timed_iter(self, items: Iterator, phase: str) -> Iterator:
        """`items`, the wait for each one counted as `phase` (and taken out of the phase around it)."""
        while True:
            outer = self.current
            self.enter(phase)
            try:
                item = next(items)
            finally:
                self.enter(outer)
            yield item


def open_dashboards(config: dict, step: int) -> Optional[ScalarLog]:
    """Rank 0: a ScalarLog into `config["tensorboard_dir"]`, also logging to MLflow (Ray's `setup_mlflow`) when
    `config["mlflow_tracking_uri"]` is set; None on other ranks. A job starting at step 0 replaces its old curves."""
    if not is_rank_zero() or not config.get("tensorboard_dir"):
        return None
    mlflow = None
    if config.get("mlflow_tracking_uri"):
        from ray.air.integrations.mlflow import setup_mlflow
        for attempt in (1, 2):  # experts starting together race to create the experiment; the loser finds it
            try:
                mlflow = setup_mlflow({"label": config["label"], **config["optim"]}, tracking_uri=config["mlflow_tracking_uri"],
                                      experiment_name=config["experiment"], run_name=config["run_name"],
                                      create_experiment_if_not_exists=True)
                break
            except Exception:
                if attempt == 2:
                    raise
    return ScalarLog(config["tensorboard_dir"], fresh=step == 0, mlflow=mlflow)
