"""`ray job submit` of the tiny pipeline on two loopback nodes that share no run folder: the default relative
`runs_dir` puts each node's working copy inside that node's own unpacked copy of the job's working directory,
and `storage=s3://...` (moto's server on loopback, `s3_server` in tests/conftest.py) is the only place they
meet. The outputs are then read back from the bucket with plain pyarrow.fs.

    .venv/bin/python -m pytest -q tests/cluster/test_storage_job.py
"""

from __future__ import annotations

import glob
import json

import pyarrow.fs as pafs
import pytest

pytestmark = pytest.mark.cluster


def test_two_nodes_share_only_an_s3_run_folder(ray_cluster, worker_node, s3_env, new_bucket):
    runtime_env = json.dumps({"excludes": [".venv", "runs", ".git"], "env_vars": {"HF_HUB_OFFLINE": "1", **s3_env}})
    run = ray_cluster.job("submit", "--working-dir", ".", "--runtime-env-json", runtime_env, "--",
                          "python", "-m", "dume_ray", "run", "--config", "configs/smoke/tiny.yaml", "name=job",
                          f"storage=s3://{new_bucket}/prefix", "tasks.builtin=[copy,add]",
                          # long enough that both experts train at once, one per node (see test_job_submit.py)
                          "experts.optim.steps=300", "experts.optim.checkpoint_every=100", "upcycle.enabled=false")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "succeeded" in run.stdout and f"[storage] s3://{new_bucket}/prefix/job: a new run there" in run.stdout

    fs = pafs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL"], scheme="http", region="us-east-1")
    root = f"{new_bucket}/prefix/job"

    def read(rel: str) -> dict:
        with fs.open_input_stream(f"{root}/{rel}") as f:
            return json.loads(f.read())

    for stage in ("base", "experts/copy", "experts/add", "soft_targets", "student", "multitask", "eval"):
        assert read(f"{stage}/DONE.json")["config_hash"], stage
    report = read("eval/report.json")
    assert set(report["models"]) == {"base", "experts", "student", "multitask"}
    nodes = {g: read(f"experts/{g}/DONE.json")["metrics"]["node_id"] for g in ("copy", "add")}
    assert set(nodes.values()) == {ray_cluster.head.node_id(), worker_node.node_id()}, nodes  # one expert per node
    # The second node worked from its own copy: the base it trained from, fetched from the bucket.
    fetched = glob.glob(f"{worker_node.temp_dir}/**/runs/job/base/model/config.json", recursive=True)
    assert fetched, f"no working copy of the base under {worker_node.temp_dir}"
