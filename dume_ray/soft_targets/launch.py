"""Driver side of the `soft_targets` stage: every expert scores its own group's training examples (those the
student will read, `soft_targets.rows=read`, drawn by `data.student_rows.rows_read`; or all of them).

    python -m dume_ray soft-targets --config configs/demo.yaml soft_targets.top_k=16

With `soft_targets.in_expert_jobs` (the default) each expert's training job has already scored its group at
its end, on the model it held (`experts/worker.py`), into `soft_targets/groups/<group>` with that group's
manifest: this stage then only links the groups into the union the student reads. What is left to score
here (experts trained before, a changed top_k, a corrupted shard, `in_expert_jobs=false`) goes through
A Ray Data pipeline per group: `from_items(encoded rows)` -> `map_batches(TeacherScorer, ...)` on an actor
pool of that group's expert (CPUs/GPUs per actor from `soft_targets`), written as that group's Parquet shards
in `soft_targets/groups/<group>/shards` with the group's own manifest. A group whose expert and tasks are
unchanged keeps its shards (a run that gains a task scores only the new group); the stage's own manifest lists
every group's shards, the union the student reads. Shards are written into a temporary folder, every shard is validated (schema, ids, log-probs that sum
to one with the tail), and only then is the folder renamed into place: a crash never leaves shards that look
finished, and a bad shard is never trained on.
"""

from __future__ import annotations

import glob
import os
import tempfile
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq

import ray
import ray.data

from dume_ray import manifest, storage
from dume_ray.config import PipelineConfig
from dume_ray.data.soft_targets import (PARQUET_WRITE_ARGS, SoftTargetError, rows_to_table, validate_shards,
                                         write_shard)
from dume_ray.data.student_rows import keep_rows, train_ids
from dume_ray.experts.launch import finished_experts, scored_rows
from dume_ray.experts.launch import soft_target_group_dir as group_dir
from dume_ray.model import check_same_vocab, load_tokenizer
from dume_ray.teacher_scoring import TeacherScorer
from dume_ray.resources import SCORE_MEMORY_FACTOR, job_memory_bytes
from dume_ray.stage_hashes import pipeline_hashes, score_budget
from dume_ray.tasks import encode_rows, load_tasks
from dume_ray.training_jobs import largest_node


def run_soft_targets(cfg: PipelineConfig, previous: dict | None = None) -> dict:
    """Score the groups whose soft targets are missing or stale, then record the union the student reads.

    With `soft_targets.in_expert_jobs` every expert trained in this run has already scored its group at the
    end of its job: those groups are only linked here. `previous`: {group: soft-target hash} of the union
    this run had before (read from this stage's manifest, stale or not), so the manifest can tell the groups
    new since then ("scored", by their expert job or here) from those kept ("reused")."""
    stage_dir = f"{cfg.run_dir}/soft_targets"
    hashes = pipeline_hashes(cfg)
    stage_hash = hashes["soft_targets"]
    if manifest.is_done(stage_dir, stage_hash):
        print(f"[soft_targets] done already ({stage_dir}), skipping", flush=True)
        return manifest.read_manifest(stage_dir)
    if previous is None:
        previous = (manifest.read_manifest(stage_dir) or {}).get("metrics", {}).get("group_hashes", {})
    start = time.time()
    experts = finished_experts(cfg)
    base_dir = manifest.require(f"{cfg.run_dir}/base", "base", hashes["base"])["outputs"]["model"]
    todo = [g for g in cfg.groups if not manifest.is_done(group_dir(cfg, g), hashes[f"soft_targets/{g}"])]
    todo += short_groups(cfg, [g for g in cfg.groups if g not in todo], base_dir)
    in_jobs = [g for g in cfg.groups if g not in todo and previous.get(g) != hashes[f"soft_targets/{g}"]
               and manifest.read_manifest(group_dir(cfg, g)).get("metrics", {}).get("scored_in") == "expert job"]
    reused = [g for g in cfg.groups if g not in todo and g not in in_jobs]
    if reused:
        print(f"[soft_targets] reusing the soft targets of {reused} (their expert and tasks are unchanged)", flush=True)
    if in_jobs:
        print(f"[soft_targets] {in_jobs}: scored at the end of their expert's training job", flush=True)
    groups = score_groups(cfg, todo, experts, base_dir, hashes) if todo else {}
    groups.update({g: manifest.read_manifest(group_dir(cfg, g)) for g in cfg.groups if g not in todo})
    shards = {g: groups[g]["outputs"]["shards"] for g in cfg.groups}
    rows = sum(groups[g]["metrics"]["rows"] for g in cfg.groups)
    scored = [g for g in cfg.groups if g in todo or g in in_jobs]
    seconds = time.time() - start
    print(f"[soft_targets] {rows} examples from {len(cfg.groups)} experts ({len(scored)} scored now"
          + (f", {len(in_jobs)} in their expert jobs" if in_jobs else "") + f") in {seconds:.1f} s", flush=True)
    return manifest.mark_done(stage_dir, stage_hash, {"shards": shards}, seconds=seconds,
                              metrics={"rows": rows, "top_k": cfg.soft_targets.top_k, "scored": scored, "reused": reused,
                                       "scored_in_expert_jobs": in_jobs,
                                       "group_hashes": {g: hashes[f"soft_targets/{g}"] for g in cfg.groups},
                                       "bytes": sum(groups[g]["metrics"]["bytes"] for g in cfg.groups)})


def short_groups(cfg: PipelineConfig, groups: list[str], base_dir: str) -> list[str]:
    """Of `groups` (soft targets done for this config's hash), those holding fewer rows than are now to be
    scored: a larger student budget, a removed group (the others' shares of the reads grow), or
    `soft_targets.rows` turned from read to all (data/student_rows.py). A group's rows are the first of one
    seeded order, so counts tell."""
    if not groups:
        return []
    tasks = load_tasks(cfg.tasks, load_tokenizer(base_dir), cfg.model.max_seq_len)
    keep = scored_rows(cfg, tasks)
    needed = {g: len(keep.intersection(train_ids(tasks, cfg.groups[g]))) for g in groups}
    short = [g for g in groups if manifest.read_manifest(group_dir(cfg, g))["metrics"]["rows"] < needed[g]]
    if short:
        print(f"[soft_targets] {short}: the student now reads more of their rows than were scored, scoring again", flush=True)
    return short


def score_groups(cfg: PipelineConfig, groups: list[str], experts: dict, base_dir: str, hashes: dict) -> dict[str, dict]:
    """One Ray Data pipeline per group on its own expert's actor pool, unioned so the groups score at once; the
    Parquet files (one group each: union keeps blocks apart) are sorted into each group's shards folder, which is
    validated, renamed into place and given its own manifest."""
    start = time.time()
    tokenizer = load_tokenizer(base_dir)
    tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
    group_of = {t: g for g, names in cfg.groups.items() for t in names}
    top_k = min(cfg.soft_targets.top_k, len(tokenizer))
    keep = scored_rows(cfg, tasks)  # the rows the student reads (soft_targets.rows), as the expert jobs score them
    scored, expected = [], {}
    for group in groups:
        expert_dir = experts[group]["outputs"]["model"]
        check_same_vocab(expert_dir, base_dir)
        rows = keep_rows(encode_rows({t: tasks[t] for t in cfg.groups[group]}, tokenizer, "train", cfg.model.max_seq_len,
                                     group_of), keep)
        expected[group] = len(rows)
        if not rows:  # the student reads none of this group's rows: an empty shard, nothing to score
            continue
        scored.append(ray.data.from_items(rows).map_batches(
            TeacherScorer, fn_constructor_kwargs={"model_dir": expert_dir, "top_k": cfg.soft_targets.top_k,
                                                  "kl_max": cfg.soft_targets.kl_max,
                                                  "logprob_bits": cfg.soft_targets.logprob_bits,
                                                  "dtype": cfg.model.dtype, "torch_threads": 1,
                                                  "device": "cuda" if cfg.soft_targets.gpus_per_actor > 0 else "cpu"},
            compute=ray.data.ActorPoolStrategy(size=cfg.soft_targets.num_actors), batch_size=cfg.soft_targets.batch_size,
            batch_format="numpy", num_cpus=cfg.soft_targets.cpus_per_actor, num_gpus=cfg.soft_targets.gpus_per_actor,
            memory=job_memory_bytes(expert_dir, SCORE_MEMORY_FACTOR, largest_node("memory"))))
    os.makedirs(f"{cfg.run_dir}/soft_targets", exist_ok=True)
    done = {}
    with tempfile.TemporaryDirectory(dir=f"{cfg.run_dir}/soft_targets", prefix=".scoring-") as scratch:
        if scored:
            # absolute: Ray Data's write tasks run in worker processes, whose working folder need not be the driver's
            write_scored(scored[0].union(*scored[1:]) if len(scored) > 1 else scored[0], os.path.abspath(scratch))
        files = {group: [] for group in groups}
        for path in sorted(glob.glob(os.path.join(scratch, "*.parquet"))):
            files[_group_of_file(path)].append(path)
        seconds = time.time() - start
        for group in groups:
            # in the form the expert jobs write (under cfg.run_dir, not absolute): a run folder copied or moved
            # elsewhere (another node's working copy) reads its own shards. Old manifests' absolute paths still read.
            shards_dir = f"{group_dir(cfg, group)}/shards"
            with manifest.atomic_dir(shards_dir) as tmp_dir:
                for path in files[group]:
                    os.replace(path, os.path.join(tmp_dir, os.path.basename(path)))
                if not files[group]:
                    write_shard(rows_to_table([], top_k, cfg.soft_targets.kl_max > 0, len(tokenizer),
                                              cfg.soft_targets.logprob_bits),
                                os.path.join(tmp_dir, "part-00000.parquet"))
                rows_written = validate_shards(tmp_dir, len(tokenizer), top_k, expected[group],
                                               adaptive=cfg.soft_targets.kl_max > 0,
                                               logprob_bits=cfg.soft_targets.logprob_bits)
            print(f"[soft_targets] {group}: {rows_written} examples -> {shards_dir}", flush=True)
            done[group] = manifest.mark_done(
                group_dir(cfg, group), hashes[f"soft_targets/{group}"], {"shards": shards_dir}, seconds=seconds,
                inputs={"expert": experts[group]["outputs"]["model"], "tasks": cfg.groups[group]},
                metrics={"rows": rows_written,
                         "bytes": sum(os.path.getsize(p) for p in glob.glob(f"{shards_dir}/*.parquet"))})
    return done


def write_scored(dataset: ray.data.Dataset, scratch: str) -> None:
    """The scored rows as Parquet files in `scratch` on this node. Ray Data's write tasks run on any node, so
    with a storage URI they write to storage and the files are then fetched here (and deleted there)."""
    store = storage.active()
    if store is None:
        dataset.write_parquet(scratch, **PARQUET_WRITE_ARGS)
        return
    remote = store.remote_path(scratch)
    dataset.write_parquet(remote, filesystem=store.fs, **PARQUET_WRITE_ARGS)
    pafs.copy_files(remote, scratch, source_filesystem=store.fs, destination_filesystem=pafs.LocalFileSystem())
    store.fs.delete_dir(remote)


def _group_of_file(path: str) -> str:
    groups = pq.read_table(path, columns=["group"]).column("group").unique().to_pylist()
    if len(groups) != 1:
        raise SoftTargetError(f"{path}: a scored file holds rows of {len(groups)} groups {groups}, expected one")
    return groups[0]


def checked_soft_targets(cfg: PipelineConfig) -> dict:
    """The soft-target manifest for this config, after validating every group's shards. A missing, truncated or
    corrupted shard is reported by file name and that group's shards are regenerated, never trained on."""
    stage_dir = f"{cfg.run_dir}/soft_targets"
    found = manifest.require(stage_dir, "soft-targets", pipeline_hashes(cfg)["soft_targets"])
    vocab_size = len(load_tokenizer(manifest.require(f"{cfg.run_dir}/base", "base")["outputs"]["model"]))
    rejected = []
    for group, shards in found["outputs"]["shards"].items():
        try:
            validate_shards(shards, vocab_size, min(cfg.soft_targets.top_k, vocab_size),
                            manifest.read_manifest(group_dir(cfg, group))["metrics"]["rows"],
                            adaptive=cfg.soft_targets.kl_max > 0, logprob_bits=cfg.soft_targets.logprob_bits)
        except (SoftTargetError, FileNotFoundError, TypeError) as exc:
            print(f"[soft_targets] rejected: {exc}", flush=True)
            rejected.append(group)
    if not rejected:
        return found
    print(f"[soft_targets] regenerating the soft targets of {rejected}", flush=True)
    for group in rejected:
        manifest.clear(group_dir(cfg, group))
    manifest.clear(stage_dir)
    return run_soft_targets(cfg, previous=found["metrics"].get("group_hashes", {}))
