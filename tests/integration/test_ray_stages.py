"""Ray integration tests on one session-scoped local Ray (2 CPUs): the TeacherScorer on a Ray Data actor
pool. The real training workers under 2-worker TorchTrainers are in test_worker_failures.py.

    .venv/bin/python -m pytest -q -m integration
"""

import glob
import os

import pyarrow.parquet as pq
import pytest

from dume_ray.data.soft_targets import soft_target_schema, validate_shard
from dume_ray.data.tokenizer import build_char_tokenizer
from dume_ray.tasks import encode_rows
from dume_ray.tasks.builtin import make_builtin_task

pytestmark = pytest.mark.integration


def _rows(n=32):
    task = make_builtin_task("copy", 0, n, 4, 4)
    return encode_rows({"copy": task}, build_char_tokenizer(), "train", 32, {"copy": "copy"}), task


def test_teacher_scorer_on_a_ray_data_actor_pool_writes_valid_shards(ray_session, tiny_model_dir, tmp_path):
    import ray.data
    from dume_ray.soft_targets.teacher_scoring import TeacherScorer

    rows, _ = _rows(8)
    scored = ray.data.from_items(rows).map_batches(
        TeacherScorer, fn_constructor_kwargs={"model_dir": tiny_model_dir, "top_k": 4},
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=4, batch_format="numpy", num_cpus=1)
    scored.write_parquet(str(tmp_path / "shards"))
    paths = glob.glob(str(tmp_path / "shards" / "*.parquet"))
    vocab = len(build_char_tokenizer())
    assert sum(validate_shard(p, vocab, 4) for p in paths) == 8
    assert pq.read_schema(paths[0]).remove_metadata() == soft_target_schema(4, vocab_size=vocab).remove_metadata()  # uint16 ids
    # soft_targets.logprob_bits=8: the pool's tables keep their uint8 columns through write_parquet
    ray.data.from_items(rows).map_batches(
        TeacherScorer, fn_constructor_kwargs={"model_dir": tiny_model_dir, "top_k": 4, "logprob_bits": 8},
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=4, batch_format="numpy", num_cpus=1,
    ).write_parquet(str(tmp_path / "shards8"))
    paths = glob.glob(str(tmp_path / "shards8" / "*.parquet"))
    assert sum(validate_shard(p, vocab, 4, logprob_bits=8) for p in paths) == 8
    assert pq.read_schema(paths[0]).remove_metadata() == soft_target_schema(4, vocab_size=vocab, logprob_bits=8).remove_metadata()


def test_soft_target_stream_mixes_the_groups_in_memory_and_streams_large_shards(ray_session, tiny_model_dir, tmp_path):
    """Shards hold one expert group each. Within `cache_max_mb` the stream is one seeded order mixing them
    (in-memory blocks); beyond it, `read_parquet` with the files shuffled. Both carry every row once, also when
    one group's shard is in the older format (int32 ids) and the others have uint16 ids."""
    from dume_ray.data.soft_targets import int32_ids, write_shard
    from dume_ray.distill.launch import soft_target_stream
    from dume_ray.soft_targets.teacher_scoring import TeacherScorer

    tokenizer, scorer = build_char_tokenizer(), TeacherScorer(tiny_model_dir, top_k=4)
    for name in ("copy", "reverse", "sort"):
        rows = encode_rows({name: make_builtin_task(name, 0, 40, 4, 4)}, tokenizer, "train", 32, {name: name})
        table = scorer({k: [r[k] for r in rows] for k in rows[0]})
        write_shard(int32_ids(table) if name == "sort" else table, str(tmp_path / f"{name}.parquet"))  # sort: an old shard
    for name in ("copy", "reverse", "sort"):  # each group's shards in their own folder, as the stage writes them
        os.makedirs(tmp_path / name)
        os.replace(tmp_path / f"{name}.parquet", tmp_path / name / "part-0.parquet")
    manifest = {"outputs": {"shards": {name: str(tmp_path / name) for name in ("copy", "reverse", "sort")}},
                "metrics": {"bytes": sum(os.path.getsize(p) for p in glob.glob(str(tmp_path / "*" / "*.parquet")))}}

    in_memory = soft_target_stream(manifest, cache_max_mb=1.0, seed=0).take_all()
    streamed = soft_target_stream(manifest, cache_max_mb=0.0, seed=0).take_all()
    for rows in (in_memory, streamed):
        assert sorted(r["example_id"] for r in rows) == sorted(f"{n}/train/{i}" for n in ("copy", "reverse", "sort") for i in range(40))
    assert len({r["group"] for r in in_memory[:16]}) == 3  # the first two batches of 8 already mix every group
    assert [r["example_id"] for r in soft_target_stream(manifest, 1.0, seed=0).take_all()] == [r["example_id"] for r in in_memory]
    # A stage reading a subset (a continued student: data.student_rows.rows_read) gets exactly it, either way;
    # one reading a row the shards lack stops before training, naming it.
    from dume_ray.data.student_rows import rows_read
    from dume_ray.manifest import StageInputError
    reads = rows_read([f"{n}/train/{i}" for n in ("copy", "reverse", "sort") for i in range(40)], 30, seed=0)
    for cache in (1.0, 0.0):
        assert sorted(r["example_id"] for r in soft_target_stream(manifest, cache, 0, reads=reads).take_all()) == sorted(reads)
    with pytest.raises(StageInputError, match="1 of the 31 rows this stage reads have no soft targets.*'add/train/0'"):
        soft_target_stream(manifest, 1.0, seed=0, reads=reads | {"add/train/0"})
    # An annealed stream holds every pass over its rows (4 here): the in-memory cap counts them all.
    one_pass_mb = manifest["metrics"]["bytes"] / 2**20
    assert len(soft_target_stream(manifest, 5 * one_pass_mb, 0, "annealed", length=480).take_all()) == 480
    with pytest.raises(StageInputError, match="for 4 passes > soft_targets.cache_max_mb"):
        soft_target_stream(manifest, 2 * one_pass_mb, 0, "annealed", length=480)


def test_a_moved_run_folder_reuses_the_soft_targets_its_actor_pools_scored(ray_session, stand_in_expert, tiny_model_dir,
                                                                            tmp_path, monkeypatch, capsys):
    """The soft_targets stage's actor pools (`soft_targets.in_expert_jobs=false`) write their shards' folders
    into the manifests under the run folder, as the expert jobs do, not as absolute paths: the run folder copied
    or moved elsewhere (another node's working copy) validates and reads its own shards, nothing rescored. A
    manifest written before, with absolute paths, still reads."""
    import json
    import shutil

    from dume_ray import manifest
    from dume_ray.config import load_config
    from dume_ray.distill.launch import soft_target_stream
    from dume_ray.soft_targets.launch import checked_soft_targets, run_soft_targets
    from dume_ray.stage_hashes import pipeline_hashes

    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    cfg = load_config(None, ["runs_dir=runs", "tasks.builtin=[copy,reverse]", "tasks.num_train=12", "model.max_seq_len=32",
                             "soft_targets.in_expert_jobs=false", "soft_targets.top_k=4", "soft_targets.batch_size=8"])
    hashes = pipeline_hashes(cfg)
    manifest.mark_done(f"{cfg.run_dir}/base", hashes["base"], {"model": tiny_model_dir})  # stand-ins outside the run
    for g in cfg.groups:
        stand_in_expert(str(tmp_path / "experts" / g))
        manifest.mark_done(f"{cfg.run_dir}/experts/{g}", hashes[f"experts/{g}"], {"model": str(tmp_path / "experts" / g)})
    scored = run_soft_targets(cfg)
    assert scored["metrics"]["scored"] == list(cfg.groups) and scored["metrics"]["scored_in_expert_jobs"] == []
    assert all(not os.path.isabs(p) for p in scored["outputs"]["shards"].values()), scored["outputs"]["shards"]

    shutil.copytree(tmp_path / "a" / "runs", tmp_path / "b" / "runs")  # the run moved: the old folder is gone
    shutil.rmtree(tmp_path / "a" / "runs")
    monkeypatch.chdir(tmp_path / "b")
    capsys.readouterr()
    assert checked_soft_targets(cfg) == scored and run_soft_targets(cfg) == scored
    out = capsys.readouterr().out
    assert "rejected" not in out and "regenerating" not in out and "done already" in out, out
    assert len(soft_target_stream(scored, 1.0, seed=0).take_all()) == 24  # every row, from the moved shards

    stage = f"{cfg.run_dir}/soft_targets/DONE.json"  # an older manifest: absolute shard paths
    old = json.loads(open(stage).read())
    old["outputs"]["shards"] = {g: os.path.abspath(p) for g, p in old["outputs"]["shards"].items()}
    open(stage, "w").write(json.dumps(old))
    assert checked_soft_targets(cfg)["outputs"]["shards"] == old["outputs"]["shards"]
    assert len(soft_target_stream(old, 1.0, seed=0).take_all()) == 24
    assert "regenerating" not in capsys.readouterr().out
