"""The way Ray users run dume_ray on a cluster, on loopback: a head plus a second raylet (`ray start`, token
authentication on, as Ray 2.60 does by default once a token exists; fixtures in conftest.py), `ray job submit
--working-dir . -- python -m dume_ray run ...` of the tiny smoke pipeline, then the report, the TensorBoard
curves and the node each expert trained on are checked (each node has 1 CPU, so the two experts run one per
node), and a second job whose config asks for a GPU this cluster lacks fails with a readable message within
`resource_wait_s`.

    .venv/bin/python -m pytest -q -m cluster
"""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.cluster


def _scalar_tags(logdir: str) -> set[str]:
    acc = EventAccumulator(logdir)
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_ray_job_submit_runs_the_pipeline_on_two_nodes_and_reports_a_missing_gpu(ray_cluster, worker_node, tmp_path,
                                                                                   monkeypatch):
    job = ray_cluster.job
    runs_dir = str(tmp_path / "runs")  # absolute: the job's working directory is Ray's unpacked copy of the repo
    mlruns = tmp_path / "mlruns"  # MLflow file store (a server URI on a real cluster), only if mlflow is installed
    env_vars = {"HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"file://{mlruns}", "MLFLOW_ALLOW_FILE_STORE": "true"}
    if importlib.util.find_spec("mlflow") is None:
        env_vars.pop("MLFLOW_TRACKING_URI")
    runtime_env = json.dumps({"excludes": [".venv", "runs", ".git"], "env_vars": env_vars})
    submit = ["submit", "--working-dir", ".", "--runtime-env-json", runtime_env]  # command + its options

    # `run`, not `experts` alone: a stage run alone first needs its earlier stages finished (exit 2, before Ray)
    gpu = job(*submit, "--submission-id", "gpu-ask", "--no-wait", "--", "python", "-m", "dume_ray",
              "run", "--config", "configs/smoke/tiny.yaml", "name=gpu", f"runs_dir={runs_dir}",
              "experts.resources.num_workers=1", "experts.resources.use_gpu=true", "resource_wait_s=3")
    assert gpu.returncode == 0, gpu.stdout[-2000:] + gpu.stderr[-2000:]

    start = time.time()
    run = job(*submit, "--", "python", "-m", "dume_ray", "run", "--config", "configs/smoke/tiny.yaml",
              "name=job", f"runs_dir={runs_dir}", "tasks.builtin=[copy,add]",  # 2 experts, one per node
              # long enough that the first expert still holds its node's CPU while the second node starts a
              # worker (tens of seconds on a loaded machine), so the second expert cannot wait for the first
              "experts.optim.steps=300", "experts.optim.checkpoint_every=100",
              "upcycle.enabled=false")  # the DUME stage is covered by the smoke test; keep this one lean
    seconds = time.time() - start
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "joined" in run.stdout and "succeeded" in run.stdout
    report = json.loads(open(f"{runs_dir}/job/eval/report.json").read())
    assert set(report["models"]) == {"base", "experts", "student", "multitask"}
    assert report["tasks"] == ["copy", "add"] and set(report["scores"]["student"]) == set(report["tasks"])
    tags = _scalar_tags(f"{runs_dir}/job/tensorboard/student")
    assert {"train/loss", "train/kd_loss", "train/ce_loss", "val_loss/copy", "validation/add"} <= tags
    assert {"train/loss", "val_loss/add"} <= _scalar_tags(f"{runs_dir}/job/tensorboard/experts/add")
    print(f"ray job submit of the smoke pipeline on two nodes: {seconds:.0f} s")
    nodes = {group: json.loads(open(f"{runs_dir}/job/experts/{group}/DONE.json").read())["metrics"]["node_id"]
             for group in ("copy", "add")}
    assert set(nodes.values()) == {ray_cluster.head.node_id(), worker_node.node_id()}, nodes  # one expert per node
    if "MLFLOW_TRACKING_URI" in env_vars:  # the same curves through Ray's setup_mlflow, one run per training job
        from mlflow.tracking import MlflowClient
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=env_vars["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([client.get_experiment_by_name("job").experiment_id])
        by_name = {r.info.run_name.split("-")[0]: r.data.metrics for r in runs}
        assert set(by_name) == {"base", "copy", "add", "student", "multitask"}
        assert {"train/loss", "train/kd_loss", "validation/copy"} <= set(by_name["student"])

    status = job("status", "gpu-ask", timeout=60)
    logs = job("logs", "gpu-ask", timeout=60)
    assert "failed with exit code 3" in status.stdout + status.stderr, status.stdout[:3000] + status.stderr[:2000]
    assert "cannot provide the resources" in logs.stdout and "experts: one worker asks for 1 CPU, 1 GPU" in logs.stdout
