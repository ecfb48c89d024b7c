"""Driver side of the `distill` (student) and `multitask` (baseline) stages.

    python -m dume_ray distill --config configs/demo.yaml distill.temperature=4 distill.anneal=true
    python -m dume_ray multitask --config configs/demo.yaml

Both read the soft-target shards as one Ray Data stream (passed to the TorchTrainer as `datasets={"train": ...}`
and consumed with `get_dataset_shard`) holding exactly the rows each reads (`data.student_rows.rows_read`:
steps x batch size rows, the draw the scorers scored; every row when that covers them all), start from the same init, and use `distill.optim` and
`distill.resources`; the multitask baseline sets alpha = 0 (plain mixed CE). `python -m dume_ray run` trains
the two side by side (`run_distill_and_multitask`), each in its own TorchTrainer, each with its own manifest.

After `add-task` / `remove-task` with `distill.after_edit=continue`, each continues instead from the run's
finished model (`distill.continue_from`) for `distill.continue_steps` steps: the parent's files are hard-linked
into `<stage>/parent-<hash>/` first, so the parent's weights survive until the new model and manifest are in
place (a crash in between reruns from the same parent), and the folder is removed once the new one is done.
"""

from __future__ import annotations

import glob
import os
import shutil
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
from ray.data.datasource import FileShuffleConfig

from dume_ray import manifest, storage
from dume_ray.config import PipelineConfig
from dume_ray.data.encode import stream_order
from dume_ray.data.soft_targets import int32_ids
from dume_ray.data.student_rows import every_group_train_ids, rows_read
from dume_ray.distill.on_policy import ExpertTeacher
from dume_ray.distill.worker import train_fn_per_worker
from dume_ray.experts.launch import finished_experts
from dume_ray.model import build_embedded_model, check_same_vocab, load_tokenizer
from dume_ray.soft_targets.launch import checked_soft_targets
from dume_ray.run_edit import parent_folder, parent_model
from dume_ray.stage_hashes import parent_hash, pipeline_hashes, read_budget, student_hash, student_optim
from dume_ray.tasks import load_tasks
from dume_ray.training_jobs import fit_concurrently, job_config, validation_pairs


def run_distill(cfg: PipelineConfig) -> dict:
    return run_students(cfg, ["student"])["student"]


def run_multitask(cfg: PipelineConfig) -> dict:
    return run_students(cfg, ["multitask"])["multitask"]


def run_distill_and_multitask(cfg: PipelineConfig) -> dict[str, dict]:
    """Both at once (what `run` does): independent jobs on the same stream, so the cluster trains them side by side."""
    return run_students(cfg, ["student", "multitask"] if cfg.multitask.enabled else ["student"])


def run_students(cfg: PipelineConfig, stages: list[str]) -> dict[str, dict]:
    """Train the given stages ("student": alpha = distill.alpha; "multitask": alpha = 0) concurrently, skipping
    those already done; {stage: manifest}."""
    hashes = pipeline_hashes(cfg)
    base_dir = manifest.require(f"{cfg.run_dir}/base", "base", hashes["base"])["outputs"]["model"]
    soft_targets = manifest.require(f"{cfg.run_dir}/soft_targets", "soft-targets", hashes["soft_targets"])
    stage_hashes = {stage: student_hash(cfg, stage, soft_targets["config_hash"]) for stage in stages}
    done = {}
    for stage in stages:
        if manifest.is_done(f"{cfg.run_dir}/{stage}", stage_hashes[stage]):
            print(f"[{stage}] done already ({cfg.run_dir}/{stage}), skipping", flush=True)
            done[stage] = manifest.read_manifest(f"{cfg.run_dir}/{stage}")
    todo = [stage for stage in stages if stage not in done]
    if not todo:
        return done
    start = time.time()
    soft_targets = checked_soft_targets(cfg)  # every shard validated (regenerated if bad) before it is trained on
    tokenizer = load_tokenizer(base_dir)
    tasks = load_tasks(cfg.tasks, tokenizer, cfg.model.max_seq_len)
    all_ids = every_group_train_ids(tasks, cfg.groups)
    reads = {stage: rows_read(all_ids, read_budget(cfg, stage), cfg.seed) for stage in todo}  # the scorers' draw
    streams = {}  # one per (rows read, schedule): the student and baseline share it when both agree
    pending, inits = {}, {}
    for stage in todo:
        inits[stage] = continued_init(cfg, stage) or student_init(cfg, base_dir, f"{cfg.run_dir}/{stage}/init")
        check_same_vocab(base_dir, inits[stage])
        schedule = "interleaved" if stage == "multitask" else cfg.distill.teacher_schedule
        length = read_budget(cfg, stage) if schedule == "annealed" else None  # it anneals over the whole budget
        key = (frozenset(reads[stage]), schedule, length)
        if key not in streams:
            streams[key] = soft_target_stream(soft_targets, cfg.soft_targets.cache_max_mb, cfg.seed, schedule, reads[stage],
                                              length)
        stage_stream = streams[key]
        pending[stage] = (_loop_config(cfg, stage, stage_hashes[stage], inits[stage], tasks, len(tokenizer), schedule),
                          stage_stream)
    teachers = start_teachers(cfg, tokenizer, pending) if "student" in pending and cfg.distill.on_policy_ratio > 0 else {}

    def finish(stage: str, result: dict) -> None:  # each job's manifest as soon as it finishes
        if stage == "student" and teachers:  # the experts' scoring throughput, for the record
            result = {**result, "on_policy_teachers": {g: ray.get(t.throughput.remote()) for g, t in teachers.items()}}
            print(f"[student] on-policy teachers: {result['on_policy_teachers']}", flush=True)
        inputs = {"soft_targets": soft_targets["outputs"]["shards"], "init": inits[stage]}
        if parent_hash(cfg, stage):
            inputs["continues"] = parent_hash(cfg, stage)
        done[stage] = manifest.mark_done(f"{cfg.run_dir}/{stage}", stage_hashes[stage], {"model": f"{cfg.run_dir}/{stage}/model"},
                                         metrics=result, inputs=inputs, seconds=time.time() - start)
        if parent_hash(cfg, stage):  # the new model and its manifest are in place: the parent's weights may go
            shutil.rmtree(parent_folder(cfg, stage), ignore_errors=True)
            storage.remove_path(parent_folder(cfg, stage))

    try:
        fit_concurrently(train_fn_per_worker, pending, cfg.distill.resources,
                         os.path.abspath(f"{cfg.run_dir}/ray_train"), stage=" + ".join(todo), on_finish=finish)
    finally:
        for actor in teachers.values():
            ray.kill(actor)
    return {stage: done[stage] for stage in stages}


def start_teachers(cfg: PipelineConfig, tokenizer, pending: dict) -> dict:
    """On-policy distillation: one `ExpertTeacher` actor per group, their handles added to the student's loop
    config. They ask for no CPU of their own: the student waits while they score, so they run in its time (on
    a GPU cluster they take `soft_targets.gpus_per_actor`)."""
    experts = finished_experts(cfg)
    device = "cuda" if cfg.soft_targets.gpus_per_actor > 0 else "cpu"
    serve = ray.remote(num_cpus=0, num_gpus=cfg.soft_targets.gpus_per_actor)(ExpertTeacher)
    teachers = {g: serve.remote(experts[g]["outputs"]["model"], cfg.model.dtype, device) for g in cfg.groups}
    d = cfg.distill
    pending["student"][0]["on_policy"] = {
        "teachers": teachers, "ratio": d.on_policy_ratio, "divergence": d.on_policy_divergence,
        "schedule": d.on_policy_schedule, "sample": d.on_policy_sample, "max_new_tokens": cfg.eval.max_new_tokens,
        "pad_id": tokenizer.pad_token_id, "eos_id": tokenizer.eos_token_id}
    print(f"[student] on-policy on {d.on_policy_ratio:.0%} of the steps ({d.on_policy_schedule}, {d.on_policy_divergence}), "
          f"{len(teachers)} expert actors", flush=True)
    return teachers


def _loop_config(cfg: PipelineConfig, stage: str, stage_hash: str, init_dir: str, tasks: dict, vocab_size: int,
                 schedule: str) -> dict:
    """What `distill/worker.py` needs, as plain data; the baseline is the same loop with alpha = 0. `schedule`:
    the teacher schedule of the stage's stream (always "interleaved" for the baseline)."""
    alpha = cfg.distill.alpha if stage == "student" else 0.0
    return {
        **job_config(cfg, stage, init_dir, f"{cfg.run_dir}/{stage}/model", student_optim(cfg, stage), cfg.distill.resources,
                     stage_hash, validation_pairs(tasks), stage),
        "alpha": alpha, "temperature": cfg.distill.temperature, "divergence": cfg.distill.divergence,
        "jsd_beta": cfg.distill.jsd_beta, "anneal": cfg.distill.anneal and alpha > 0,
        "top_k": min(cfg.soft_targets.top_k, vocab_size),
        "ordered_stream": schedule != "interleaved",  # the order is the schedule: a resume skips, not reseeds
    }


def soft_target_stream(soft_targets: dict, cache_max_mb: float, seed: int, schedule: str = "interleaved",
                       reads: set[str] | None = None, length: int | None = None) -> ray.data.Dataset:
    """The shards as one Ray Dataset, its rows mixed across tasks (the shards hold one expert group each), or
    in the order of another `distill.teacher_schedule` ("sequential", "annealed": `data.encode.stream_order`).
    `length`: the rows the stage reads in all (steps x batch size), which an "annealed" stream spans, so its
    annealing runs once over the whole step budget (the stream then holds every pass over the rows it needs,
    `length` rows in memory); None = one epoch, repeated.

    `reads`: the example ids the stage reads (`data.student_rows.rows_read`, the draw the scorers made); the
    stream holds exactly those rows. StageInputError, before any training, when one of them has no soft target
    (the shards were scored for fewer rows); None = every row of the shards.

    Up to `cache_max_mb` on disk, the rows are read once, put in one seeded order and handed to Ray as
    in-memory blocks (Ray Train's advice for data that fits in memory: every epoch iterates blocks already in
    the object store, where `read_parquet` would re-run its read tasks each epoch). Larger streams are read
    from Parquet each epoch with the files in a new random order (`FileShuffleConfig`); rows then mix only
    within the workers' local shuffle buffer, so the other schedules need the stream in memory."""
    groups = list(soft_targets["outputs"]["shards"])
    paths = [p for g in groups for p in sorted(glob.glob(os.path.join(soft_targets["outputs"]["shards"][g], "*.parquet")))]
    scored = {e for path in paths for e in pq.read_table(path, columns=["example_id"]).column("example_id").to_pylist()}
    subset = reads is not None and reads != scored
    if reads is not None and not reads <= scored:
        missing = sorted(reads - scored)
        raise manifest.StageInputError(
            f"{len(missing)} of the {len(reads)} rows this stage reads have no soft targets in the shards of "
            f"{groups} (e.g. {missing[0]!r}): they were scored for fewer rows (soft_targets.rows); rerun the "
            f"soft-targets stage for this config")
    # groups kept from a run before ids were narrowed (int32) beside groups scored since (uint16): one schema
    # (a table without targets, as a plain cross-entropy stream, has no ids to cast)
    schemas = [pq.read_schema(p) for p in paths]
    mixed_ids = len({s.field("topk_ids").type for s in schemas if "topk_ids" in s.names}) > 1
    passes = max(1.0, (length or 0) / max(1, len(reads if reads is not None else scored)))  # annealed: every pass held
    held_bytes = soft_targets["metrics"].get("bytes", float("inf")) * passes
    if held_bytes <= cache_max_mb * 2**20:
        table = pa.concat_tables([int32_ids(pq.read_table(p)) if mixed_ids else pq.read_table(p) for p in paths])
        if subset:
            table = table.filter(pc.is_in(table.column("example_id"), value_set=pa.array(sorted(reads), pa.string())))
        table = table.take(stream_order(table.column("group").to_pylist(), groups, seed, schedule, length))
        block = max(1, -(-table.num_rows // 16))
        return ray.data.from_arrow([table.slice(i, block) for i in range(0, table.num_rows, block)])
    if schedule != "interleaved":
        raise manifest.StageInputError(
            f"distill.teacher_schedule={schedule} needs the soft targets in memory ({held_bytes:.0f} bytes on disk for "
            f"{passes:.2g} passes > soft_targets.cache_max_mb={cache_max_mb}): raise soft_targets.cache_max_mb")
    shuffle = FileShuffleConfig(seed=seed, reseed_after_execution=True)
    store = storage.active()
    if store is not None:  # the read tasks may run on any node: read the stored copies, not this node's
        dataset = ray.data.read_parquet(sorted(store.remote_path(p) for p in paths), filesystem=store.fs, shuffle=shuffle)
    else:
        dataset = ray.data.read_parquet(sorted(os.path.abspath(p) for p in paths), shuffle=shuffle)  # (read by workers)
    if mixed_ids:  # each block on its own (batch_size None), before any two of different schemas meet
        dataset = dataset.map_batches(int32_ids, batch_format="pyarrow", batch_size=None)
    if subset:  # shards scored for more rows than this stage reads (a continued student): keep its rows
        keep = pa.array(sorted(reads), pa.string())
        dataset = dataset.map_batches(lambda t: t.filter(pc.is_in(t.column("example_id"), value_set=keep)),
                                      batch_format="pyarrow")
    return dataset


def continued_init(cfg: PipelineConfig, stage: str) -> str:
    """A continued stage's starting weights: its parent model, hard-linked into `<stage>/parent-<hash>/` (once;
    a rerun finds it there); "" when the stage is not continued."""
    found = parent_model(cfg, stage)
    if not found:
        return ""
    print(f"[{stage}] continuing from {parent_hash(cfg, stage)} for {student_optim(cfg, stage).steps} steps", flush=True)
    folder = parent_folder(cfg, stage)
    if found != folder:
        with manifest.atomic_dir(folder) as tmp:
            shutil.copytree(found, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
    return folder


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


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
