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
    assert pq.read_schema(paths[0]).remove_metadata() == soft_target_schema(4).remove_metadata()
