"""The Ray Tune trainable of the `search` stage: one trial = one grouping, one temperature T, one alpha.

`search_trial(config, setup)` gets its sampled point in `config` ({"grouping": "copy+sort | reverse | ...",
"temperature": T, "alpha": a}) and the run's plain data in `setup` (the pipeline config as a dict, the base
model folder, the expert cache folder). It trains or reuses one expert per group (`search/proxy.py`, cached
by content hash), then runs a short proxy distillation of a student from the base and calls `tune.report`
every `search.report_every` steps with the student's mean validation exact-match (`val_mean`, validation
split, never test) and a checkpoint, so ASHA can stop it early and `Tuner.restore` can resume it.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import torch
from ray import tune

from dume_ray.config import PipelineConfig, from_dict
from dume_ray.model import load_model, load_tokenizer
from dume_ray.search.partitions import encode, parse_readable, readable
from dume_ray.search.proxy import grouping_soft_targets, proxy_distill
from dume_ray.tasks import load_tasks
from dume_ray.training import evaluate_tasks, load_training_state, make_optimizer, save_training_state


def search_trial(config: dict, setup: dict) -> None:
    os.chdir(setup["cwd"])  # Tune starts trials in their own folder; config paths are relative to the launch dir
    cfg = from_dict(PipelineConfig, setup["pipeline"])
    if cfg.search.torch_threads > 0:
        torch.set_num_threads(cfg.search.torch_threads)
    names = cfg.tasks.names
    groups = [[t for t in names if t in g] for g in parse_readable(config["grouping"])]
    encode(groups, names)  # raises on a grouping that does not partition the tasks
    base_dir = setup["base_dir"]
    tokenizer, tasks = load_tokenizer(base_dir), load_tasks(cfg.tasks)
    start = time.time()

    # ---- experts for this grouping: from the cache, or trained once and cached ---------------------------
    soft_rows, hits = grouping_soft_targets(cfg, base_dir, setup["base_hash"], setup["cache_dir"], groups, tokenizer, tasks)
    expert_seconds = time.time() - start

    # ---- proxy distillation from the base, reporting validation every report_every steps ------------------
    s = cfg.search
    optim = dataclasses.replace(cfg.distill.optim, steps=s.proxy_steps,
                                warmup_steps=min(cfg.distill.optim.warmup_steps, s.proxy_steps))
    student = load_model(base_dir)
    optimizer, scheduler = make_optimizer(student, optim)
    step = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # Tuner.restore of an interrupted trial, or a retried one
        with checkpoint.as_directory() as directory:
            step, _ = load_training_state(directory, student, optimizer, scheduler)
    fixed = {"grouping": readable(groups), "num_groups": len(groups), "cache_hits": hits,
             "cache_misses": len(groups) - hits, "expert_seconds": round(expert_seconds, 1)}

    def report(step: int, metrics: dict) -> None:
        scores = evaluate_tasks(student, tokenizer, tasks, "validation", cfg.eval.max_new_tokens, cfg.eval.batch_size)
        result = {"val_mean": sum(scores.values()) / len(scores), **{f"val_{t}": v for t, v in scores.items()},
                  "step": step, "loss": metrics["loss"], "kd_loss": metrics["kd_loss"], "ce_loss": metrics["ce_loss"],
                  "trial_seconds": round(time.time() - start, 1), **fixed}
        with tempfile.TemporaryDirectory() as tmp:
            state_dir = save_training_state(os.path.join(tmp, "state"), student, optimizer, scheduler, step)
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(state_dir))

    proxy_distill(student, tokenizer, soft_rows, optim, optimizer, scheduler, top_k=min(cfg.soft_targets.top_k, len(tokenizer)),
                  alpha=config["alpha"], temperature=config["temperature"], divergence=cfg.distill.divergence,
                  jsd_beta=cfg.distill.jsd_beta, anneal=cfg.distill.anneal, seed=cfg.seed, start_step=step,
                  report_every=s.report_every, on_report=report)
