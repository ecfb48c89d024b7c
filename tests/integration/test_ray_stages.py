"""Ray integration tests on one session-scoped local Ray (2 CPUs): the real workers under TorchTrainer
with 2 workers (rank, DDP, report and checkpoint paths) and the TeacherScorer on a Ray Data actor pool.

    .venv/bin/python -m pytest -q -m integration
"""

import glob
import os

import pyarrow.parquet as pq
import pytest

from dume_ray.config import OptimConfig, ResourcesConfig, to_dict
from dume_ray.data.soft_targets import soft_target_schema, validate_shard
from dume_ray.data.tokenizer import build_char_tokenizer
from dume_ray.tasks import encode_rows
from dume_ray.tasks.builtin import make_builtin_task

pytestmark = pytest.mark.integration


def _rows(n=32):
    task = make_builtin_task("copy", 0, n, 4, 4)
    return encode_rows({"copy": task}, build_char_tokenizer(), "train", 32, {"copy": "copy"}), task


def test_expert_worker_trains_on_two_ray_train_workers_and_checkpoints(ray_session, tiny_model_dir, tmp_path):
    import ray.data
    from dume_ray.experts.launch import fit_concurrently
    from dume_ray.experts.worker import train_fn_per_worker

    rows, task = _rows()
    out = tmp_path / "expert"
    loop_config = {"label": "copy", "init_dir": tiny_model_dir, "output_dir": str(out),
                   "optim": to_dict(OptimConfig(steps=4, batch_size=8, warmup_steps=1, checkpoint_every=2)),
                   "seed": 0, "torch_threads": 1, "num_workers": 2, "dtype": "float32", "train_mlp_only": False,
                   "validation": {"copy": [(e.prompt, e.response) for e in task.examples("validation")]},
                   "max_new_tokens": 4, "local_checkpoint_dir": None, "run_name": "experts-copy"}
    resources = ResourcesConfig(num_workers=2, cpus_per_worker=1.0)
    results = fit_concurrently(train_fn_per_worker, {"copy": (loop_config, ray.data.from_items(rows))}, resources,
                               str(tmp_path / "ray_train"), stage="experts")
    assert results["copy"]["steps"] == 4
    assert 0.0 <= results["copy"]["validation"]["copy"] <= 1.0
    assert os.path.exists(out / "config.json") and os.path.exists(out / "tokenizer.json")
    # Ray Train persisted rank 0's checkpoints (steps 2 and 4) under the run's storage path.
    checkpoints = glob.glob(str(tmp_path / "ray_train" / "experts-copy" / "checkpoint_*" / "state.pt"))
    assert len(checkpoints) == 2


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
