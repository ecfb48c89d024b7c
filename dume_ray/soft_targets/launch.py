"""Driver side of the `soft_targets` stage: every expert scores its own group's training examples.

    python -m dume_ray soft-targets --config configs/demo.yaml soft_targets.top_k=16

A Ray Data pipeline per group: `from_items(encoded rows)` -> `map_batches(TeacherScorer, ...)` on an actor
pool of that group's expert (CPUs/GPUs per actor from `soft_targets`), then one `union` written as Parquet
shards. Shards are written into a temporary folder, every shard is validated (schema, ids, log-probs that sum
to one with the tail), and only then is the folder renamed into place: a crash never leaves shards that look
finished, and a bad shard is never trained on.
"""

from __future__ import annotations

import glob
import os
import time

import ray
import ray.data

from dume_ray import manifest
from dume_ray.config import PipelineConfig
from dume_ray.data.soft_targets import SoftTargetError, validate_shard
from dume_ray.experts.launch import finished_experts
from dume_ray.model import check_same_vocab, load_tokenizer
from dume_ray.soft_targets.teacher_scoring import TeacherScorer
from dume_ray.stage_hashes import pipeline_hashes
from dume_ray.tasks import encode_rows, load_tasks


def run_soft_targets(cfg: PipelineConfig) -> dict:
    stage_dir = f"{cfg.run_dir}/soft_targets"
    hashes = pipeline_hashes(cfg)
    experts = finished_experts(cfg)
    stage_hash = hashes["soft_targets"]
    if manifest.is_done(stage_dir, stage_hash):
        print(f"[soft_targets] done already ({stage_dir}), skipping", flush=True)
        return manifest.read_manifest(stage_dir)
    start = time.time()
    base_dir = manifest.require(f"{cfg.run_dir}/base", "base", hashes["base"])["outputs"]["model"]
    tokenizer = load_tokenizer(base_dir)
    tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
    group_of = {t: g for g, names in cfg.groups.items() for t in names}

    # ---- one scoring pipeline per group, each on its own expert's actor pool --------------------------------
    scored = []
    for group, names in cfg.groups.items():
        expert_dir = experts[group]["outputs"]["model"]
        check_same_vocab(expert_dir, base_dir)
        rows = encode_rows({t: tasks[t] for t in names}, tokenizer, "train", cfg.model.max_seq_len, group_of)
        scored.append(ray.data.from_items(rows).map_batches(
            TeacherScorer, fn_constructor_kwargs={"model_dir": expert_dir, "top_k": cfg.soft_targets.top_k,
                                                  "dtype": cfg.model.dtype, "torch_threads": 1,
                                                  "device": "cuda" if cfg.soft_targets.gpus_per_actor > 0 else "cpu"},
            compute=ray.data.ActorPoolStrategy(size=cfg.soft_targets.num_actors), batch_size=cfg.soft_targets.batch_size,
            batch_format="numpy", num_cpus=cfg.soft_targets.cpus_per_actor, num_gpus=cfg.soft_targets.gpus_per_actor))
    dataset = scored[0].union(*scored[1:]) if len(scored) > 1 else scored[0]

    # ---- write into a temp folder, validate every shard, then rename into place ------------------------------
    shards_dir = os.path.abspath(f"{stage_dir}/shards")
    expected = sum(len(tasks[t].examples("train")) for t in group_of)
    with manifest.atomic_dir(shards_dir) as tmp_dir:
        dataset.write_parquet(tmp_dir)
        rows_written = validate_shards(tmp_dir, len(tokenizer), min(cfg.soft_targets.top_k, len(tokenizer)), expected)
    seconds = time.time() - start
    print(f"[soft_targets] {rows_written} examples scored by {len(cfg.groups)} experts in {seconds:.1f} s -> {shards_dir}", flush=True)
    return manifest.mark_done(stage_dir, stage_hash, {"shards": shards_dir}, seconds=seconds,
                              metrics={"rows": rows_written, "top_k": cfg.soft_targets.top_k,
                                       "bytes": sum(os.path.getsize(p) for p in glob.glob(f"{shards_dir}/*.parquet"))})


def checked_soft_targets(cfg: PipelineConfig) -> dict:
    """The soft-target manifest for this config, after validating every shard it lists. A missing,
    truncated or corrupted shard is reported by file name and the shards are regenerated, never trained on."""
    stage_dir = f"{cfg.run_dir}/soft_targets"
    found = manifest.require(stage_dir, "soft-targets", pipeline_hashes(cfg)["soft_targets"])
    vocab_size = len(load_tokenizer(manifest.require(f"{cfg.run_dir}/base", "base")["outputs"]["model"]))
    try:
        validate_shards(found["outputs"]["shards"], vocab_size, min(cfg.soft_targets.top_k, vocab_size),
                        found["metrics"]["rows"])
        return found
    except (SoftTargetError, FileNotFoundError) as exc:
        print(f"[soft_targets] rejected: {exc}\n[soft_targets] regenerating the soft targets", flush=True)
    manifest.clear(stage_dir)
    return run_soft_targets(cfg)


def validate_shards(directory: str, vocab_size: int, top_k: int, expected_rows: int) -> int:
    """Validate every Parquet shard in `directory` and the total row count; raises SoftTargetError naming
    the bad file (or FileNotFoundError when there are no shards)."""
    paths = sorted(glob.glob(os.path.join(directory, "*.parquet")))
    if not paths:
        raise FileNotFoundError(f"no soft-target shards in {directory}")
    rows = sum(validate_shard(p, vocab_size, top_k) for p in paths)
    if rows != expected_rows:
        raise SoftTargetError(f"{directory}: {len(paths)} shards hold {rows} rows, expected {expected_rows} "
                              f"(one per training example): a shard is missing or extra")
    return rows
