"""Driver side of the `distill` (student) and `multitask` (baseline) stages.

    python -m dume_ray distill --config configs/demo.yaml distill.temperature=4 distill.anneal=true
    python -m dume_ray multitask --config configs/demo.yaml

Both read the soft-target shards as one Ray Data stream (`read_parquet`, passed to the TorchTrainer as
`datasets={"train": ...}` and consumed with `get_dataset_shard`), start from the same init, and use
`distill.optim` and `distill.resources`; the multitask baseline sets alpha = 0 (plain mixed CE).
"""

from __future__ import annotations

import os
import time

import ray.data

from dume_ray import manifest
from dume_ray.config import PipelineConfig, to_dict
from dume_ray.dashboards import mlflow_tracking_uri, tensorboard_dir
from dume_ray.distill.worker import train_fn_per_worker
from dume_ray.experts.launch import _require, fit_concurrently, history_path, local_checkpoint_dir
from dume_ray.model import build_embedded_model, check_same_vocab, load_tokenizer
from dume_ray.soft_targets.launch import checked_soft_targets
from dume_ray.stage_hashes import pipeline_hashes, student_hash
from dume_ray.tasks import load_tasks


def run_distill(cfg: PipelineConfig) -> dict:
    return _run_student(cfg, "student", alpha=cfg.distill.alpha)


def run_multitask(cfg: PipelineConfig) -> dict:
    return _run_student(cfg, "multitask", alpha=0.0)


def _run_student(cfg: PipelineConfig, stage: str, alpha: float) -> dict:
    stage_dir = f"{cfg.run_dir}/{stage}"
    hashes = pipeline_hashes(cfg)
    base_dir = _require(f"{cfg.run_dir}/base", "base", hashes["base"])["outputs"]["model"]
    soft_targets = checked_soft_targets(cfg)
    stage_hash = student_hash(cfg, stage, soft_targets["config_hash"])
    if manifest.is_done(stage_dir, stage_hash):
        print(f"[{stage}] done already ({stage_dir}), skipping", flush=True)
        return manifest.read_manifest(stage_dir)
    start = time.time()
    init_dir = student_init(cfg, base_dir, f"{stage_dir}/init")
    check_same_vocab(base_dir, init_dir)
    tasks = load_tasks(cfg.tasks, load_tokenizer(base_dir), cfg.model.max_seq_len)
    loop_config = {
        "label": stage, "init_dir": init_dir, "output_dir": f"{stage_dir}/model", "optim": to_dict(cfg.distill.optim),
        "alpha": alpha, "temperature": cfg.distill.temperature, "divergence": cfg.distill.divergence,
        "jsd_beta": cfg.distill.jsd_beta, "anneal": cfg.distill.anneal and alpha > 0,
        "top_k": min(cfg.soft_targets.top_k, len(load_tokenizer(base_dir))),
        "seed": cfg.seed, "torch_threads": cfg.distill.resources.torch_threads,
        "num_workers": cfg.distill.resources.num_workers, "dtype": cfg.model.dtype,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "validation": {n: [(e.prompt, e.response) for e in t.examples("validation")] for n, t in tasks.items()},
        "local_checkpoint_dir": local_checkpoint_dir(stage_dir, stage_hash, cfg.distill.resources),
        "history_path": history_path(stage_dir, stage_hash),
        "run_name": f"{stage}-{stage_hash}",  # Ray Train resumes a run of this name: never one of another config
        "experiment": cfg.name, "tensorboard_dir": tensorboard_dir(cfg.run_dir, stage, stage),
        "mlflow_tracking_uri": mlflow_tracking_uri(cfg.mlflow_tracking_uri),
    }
    stream = ray.data.read_parquet(soft_targets["outputs"]["shards"])
    result = fit_concurrently(train_fn_per_worker, {stage: (loop_config, stream)}, cfg.distill.resources,
                              os.path.abspath(f"{stage_dir}/ray_train"), stage=stage)[stage]
    return manifest.mark_done(stage_dir, stage_hash, {"model": f"{stage_dir}/model"}, metrics=result,
                              inputs={"soft_targets": soft_targets["outputs"]["shards"], "init": init_dir},
                              seconds=time.time() - start)


def student_init(cfg: PipelineConfig, base_dir: str, out_dir: str) -> str:
    """The student's starting weights: the base itself, or a fresh (possibly smaller) embedded model."""
    if cfg.distill.init == "base":
        return base_dir
    tokenizer = load_tokenizer(base_dir)
    model = build_embedded_model(cfg.distill.student_model or cfg.model, tokenizer, cfg.seed)
    with manifest.atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir
