"""What one search trial computes, in plain torch: cached experts for its grouping, then a short distillation.

A Tune trial is small (one process, a CPU or a GPU slice), so it does not nest Ray Train jobs: it loops
over the same pure steps the pipeline's workers use (`training.ce_train_step`, `distill_train_step`) and
the same `TeacherScorer` for soft targets. Experts are cached on disk by a content hash of (task group,
base model, expert config): a group seen by an earlier or a concurrent trial is trained once. The cache
entry holds the Hugging Face expert and its group's top-k soft targets (Parquet).

    expert_dir, hit = cached_expert(cache_root, key, train=lambda out: train_expert(...))
    for step, metrics in proxy_distill(student, tokenizer, soft_rows, optim, ...): ...

Pure: no Ray. Tested through tests/integration/test_search.py (and the cache in tests/unit/test_partitions.py).
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import tempfile
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dume_ray.config import OptimConfig
from dume_ray.data.encode import collate
from dume_ray.distill.losses import annealed_alpha
from dume_ray.model import merge_adapters
from dume_ray.soft_targets.teacher_scoring import TeacherScorer
from dume_ray.training import ce_train_step, distill_train_step, make_optimizer

SOFT_TARGETS = "soft_targets.parquet"


def cached_expert(cache_root: str, key: str, train: Callable[[str], None]) -> tuple[str, bool]:
    """The cache entry `<cache_root>/<key>`, built by `train(tmp_dir)` if absent; returns (dir, cache hit).

    An exclusive file lock per key makes a concurrent trial wait for the one training it and then reuse
    the result; the entry is built in a temp folder and renamed, so a crash never leaves a half entry.
    """
    os.makedirs(cache_root, exist_ok=True)
    final = os.path.join(cache_root, key)
    with open(os.path.join(cache_root, f".{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.isdir(final):
                return final, True
            tmp = tempfile.mkdtemp(dir=cache_root, prefix=f".tmp-{key}-")
            try:
                train(tmp)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return final, False
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def batches(rows: list[dict], batch_size: int, seed: int) -> Iterator[list[dict]]:
    """Endless shuffled batches of rows, reshuffled every epoch (deterministic under `seed`)."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield [rows[i] for i in order[start:start + batch_size]]


def train_expert(model, tokenizer, rows: list[dict], optim: OptimConfig, seed: int, out_dir: str, dtype: str = "float32") -> dict:
    """Plain CE fine-tune of `model` on `rows` for `optim.steps`; saves a Hugging Face folder to `out_dir`."""
    torch.manual_seed(seed)
    optimizer, scheduler = make_optimizer(model, optim)
    stream = batches(rows, optim.batch_size, seed)
    metrics: dict = {}
    for _ in range(optim.steps):
        batch = collate(next(stream), tokenizer.pad_token_id)
        metrics = ce_train_step(model, batch, optimizer, scheduler, optim.grad_clip, dtype)
    merge_adapters(model).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return metrics


def score_soft_targets(expert_dir: str, rows: list[dict], top_k: int, path: str, batch_size: int = 256) -> None:
    """The expert's top-k soft targets for its group's rows, as one Parquet file (the pipeline's schema)."""
    scorer = TeacherScorer(expert_dir, top_k)
    tables = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        columns = {key: np.array([r[key] for r in chunk], dtype=object) for key in ("example_id", "task", "group")}
        columns["input_ids"] = np.array([np.asarray(r["input_ids"]) for r in chunk] + [None], dtype=object)[:-1]
        columns["response_start"] = np.array([r["response_start"] for r in chunk])
        tables.append(scorer(columns))
    pq.write_table(pa.concat_tables(tables), path)


def read_soft_targets(path: str) -> list[dict]:
    return pq.read_table(path).to_pylist()


def soft_batch(rows: list[dict], pad_id: int, top_k: int) -> dict[str, torch.Tensor]:
    """Soft-target rows -> padded LM batch + flattened teacher targets (order of `response_positions`)."""
    out = collate(rows, pad_id)
    out["topk_ids"] = torch.tensor([t for r in rows for t in r["topk_ids"]], dtype=torch.long).view(-1, top_k)  # [n, k]
    out["topk_logprobs"] = torch.tensor([t for r in rows for t in r["topk_logprobs"]], dtype=torch.float32).view(-1, top_k)
    out["tail_logmass"] = torch.tensor([t for r in rows for t in r["tail_logmass"]], dtype=torch.float32)  # [n]
    return out


def proxy_distill(model, tokenizer, rows: list[dict], optim: OptimConfig, top_k: int, alpha: float, temperature: float,
                  divergence: str, jsd_beta: float, anneal: bool, seed: int, start_step: int = 0,
                  optimizer=None, scheduler=None) -> Iterator[tuple[int, dict, object, object]]:
    """The student's KD loop on soft-target rows; yields (step, metrics, optimizer, scheduler) after every step."""
    if optimizer is None:
        optimizer, scheduler = make_optimizer(model, optim)
    stream = batches(rows, optim.batch_size, seed + start_step)
    for step in range(start_step + 1, optim.steps + 1):
        batch = soft_batch(next(stream), tokenizer.pad_token_id, top_k)
        step_alpha = annealed_alpha(alpha, step - 1, optim.steps, anneal)
        metrics = distill_train_step(model, batch, optimizer, scheduler, optim.grad_clip, step_alpha, temperature,
                                     divergence, jsd_beta)
        yield step, metrics, optimizer, scheduler
