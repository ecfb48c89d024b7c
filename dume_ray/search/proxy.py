"""What one search trial computes, in plain torch: cached experts for its grouping, then a short distillation.

A Tune trial is small (one process, a CPU or a GPU slice), so it does not nest Ray Train jobs: it runs
the loop and the steps the pipeline's workers run (`training.train_loop` with `ce_step` / `kd_step`) and
the same `TeacherScorer` for soft targets (`teacher_scoring.score_rows`). Experts are cached on disk by a
content hash of (task group, base model, expert config): a group seen by an earlier or a concurrent trial
is trained once. The cache entry holds the Hugging Face expert and its group's top-k soft targets (Parquet).

    soft_rows, hits = grouping_soft_targets(cfg, base_dir, base_hash, cache_dir, groups, tokenizer, tasks)
    proxy_distill(student, tokenizer, soft_rows, optim, optimizer, scheduler, ..., on_report=report)

A search trial (`search/worker.py`) and benchmarks/search_predicts.py (proxy vs full pipeline per grouping)
both run these. Pure: no Ray. Tested in tests/unit/test_search_proxy.py, tests/unit/test_partitions.py (the
cache) and through tests/integration/test_search.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

import pyarrow.parquet as pq
import torch

from dume_ray.config import OptimConfig, PipelineConfig, config_hash
from dume_ray.data.encode import shuffled_batches
from dume_ray.data.soft_targets import PARQUET_WRITE_ARGS
from dume_ray.model import expert_trainable, load_model, make_trainable, merge_adapters
from dume_ray.soft_targets.teacher_scoring import score_rows
from dume_ray.stage_hashes import logprob_format_key
from dume_ray.tasks import encode_rows
from dume_ray.training import ce_step, kd_step, make_optimizer, train_loop

SOFT_TARGETS = "soft_targets.parquet"


def cached_expert(cache_root: str, key: str, train: Callable[[str], None]) -> tuple[str, bool]:
    """The cache entry `<cache_root>/<key>`, built by `train(tmp_dir)` if absent; returns (dir, cache hit).

    No lock (a shared or object-store-backed folder may not honour one): the entry is built in a temp folder
    of a unique name and renamed into place, so a crash never leaves a half entry and a reader sees a whole
    entry or none. Two trials that miss at once both train it (the same key gives the same expert); the first
    rename wins, and the other keeps the winner's entry and discards its own.
    """
    os.makedirs(cache_root, exist_ok=True)
    final = os.path.join(cache_root, key)
    if os.path.isdir(final):
        return final, True
    tmp = tempfile.mkdtemp(dir=cache_root, prefix=f".tmp-{key}-")
    try:
        train(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, False


def train_expert(model, tokenizer, rows: list[dict], optim: OptimConfig, seed: int, out_dir: str, dtype: str = "float32") -> dict:
    """Plain CE fine-tune of `model` on `rows` for `optim.steps`; saves a Hugging Face folder to `out_dir`."""
    torch.manual_seed(seed)
    optimizer, scheduler = make_optimizer(model, optim)
    _, metrics = train_loop(model, optimizer, scheduler, shuffled_batches(rows, optim.batch_size, seed),
                            ce_step(optim.grad_clip, dtype), tokenizer.pad_token_id, start_step=0, total_steps=optim.steps)
    merge_adapters(model).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return metrics


def score_soft_targets(expert_dir: str, rows: list[dict], top_k: int, path: str, batch_size: int = 256,
                       kl_max: float = 0.0, logprob_bits: int = 16) -> None:
    """The expert's top-k soft targets for its group's rows, as one Parquet file (the pipeline's schema)."""
    pq.write_table(score_rows(expert_dir, rows, top_k, batch_size, kl_max, logprob_bits), path, **PARQUET_WRITE_ARGS)


def read_soft_targets(path: str) -> list[dict]:
    return pq.read_table(path).to_pylist()


def proxy_distill(model, tokenizer, rows: list[dict], optim: OptimConfig, optimizer, scheduler, top_k: int,
                  alpha: float, temperature: float, divergence: str, jsd_beta: float, anneal: bool, seed: int,
                  start_step: int, report_every: int, on_report: Callable[[int, dict], None]) -> tuple[int, dict]:
    """The student's KD loop on soft-target rows, from `start_step` to `optim.steps`; calls
    `on_report(step, metrics)` every `report_every` steps and after the last. Returns (step, metrics)."""
    stream = shuffled_batches(rows, optim.batch_size, seed + start_step)
    train_step = kd_step(optim.grad_clip, top_k, alpha, optim.steps, anneal, temperature, divergence, jsd_beta)
    return train_loop(model, optimizer, scheduler, stream, train_step, tokenizer.pad_token_id, start_step=start_step,
                      total_steps=optim.steps, checkpoint_every=report_every, on_checkpoint=on_report)


def grouping_soft_targets(cfg: PipelineConfig, base_dir: str, base_hash: str, cache_dir: str, groups: list[list[str]],
                          tokenizer, tasks: dict) -> tuple[list[dict], int]:
    """The soft-target rows of every group's expert (cached by content hash; trained here on a miss), and
    how many of the experts came from the cache."""
    soft_rows, hits = [], 0
    for group in groups:
        key = expert_cache_key(base_hash, group, cfg)
        rows = encode_rows({t: tasks[t] for t in group}, tokenizer, "train", cfg.model.max_seq_len, {t: "+".join(group) for t in group})
        entry, hit = cached_expert(cache_dir, key, lambda tmp: build_expert(cfg, base_dir, tokenizer, rows, tmp))
        hits += hit
        soft_rows += read_soft_targets(os.path.join(entry, SOFT_TARGETS))
    return soft_rows, hits


def expert_cache_key(base_hash: str, group: list[str], cfg: PipelineConfig) -> str:
    """Content hash of (task group, base model, expert config, tasks, soft-target k): equal keys, same expert."""
    return config_hash("search-expert", base_hash, sorted(group), cfg.experts.optim, expert_trainable(cfg.experts),
                       cfg.tasks, cfg.model.max_seq_len, cfg.soft_targets.top_k, cfg.seed,
                       *(("kl_max", cfg.soft_targets.kl_max) if cfg.soft_targets.kl_max > 0 else ()),
                       *logprob_format_key(cfg.soft_targets))


def build_expert(cfg: PipelineConfig, base_dir: str, tokenizer, rows: list[dict], out_dir: str) -> None:
    model = make_trainable(load_model(base_dir), **expert_trainable(cfg.experts))
    model_dir = os.path.join(out_dir, "model")
    train_expert(model, tokenizer, rows, cfg.experts.optim, cfg.seed, model_dir, cfg.model.dtype)
    score_soft_targets(model_dir, rows, cfg.soft_targets.top_k, os.path.join(out_dir, SOFT_TARGETS), kl_max=cfg.soft_targets.kl_max,
                       logprob_bits=cfg.soft_targets.logprob_bits)
