"""Losing a worker node in the middle of the experts stage costs only the steps since the last checkpoint.

A head and a second node (1 CPU each, conftest.py) run the tiny pipeline through `ray job submit`; its two
experts train one per node. Once the expert on the second node is past its second checkpoint, the test
SIGKILLs that node's raylet and every worker below it by pid (`LocalNode.kill`). Ray retries the lost expert's
task (`experts.resources.max_failures`) on the head, where it resumes from the checkpoint in the shared run
folder. The job must succeed with every stage's output in place, the lost expert must have redone at most one
checkpoint interval of steps, and the expert on the surviving node must not have restarted at all.

    .venv/bin/python -m pytest -q -m cluster tests/cluster/test_node_loss.py
"""

from __future__ import annotations

import glob
import json
import os
import time

import pytest

from dume_ray.worker_utils import read_history

pytestmark = pytest.mark.cluster
STEPS, CHECKPOINT_EVERY = 1200, 20  # the kill comes after step 40: 1,160 steps of margin (a loaded poller can be seconds late)
GROUPS = ("copy", "add")
STAGES = ("base", "experts/copy", "experts/add", "soft_targets", "student", "multitask", "eval")


def _history(run_dir: str, group: str):
    found = glob.glob(f"{run_dir}/experts/{group}/history-*.jsonl")
    return found[0] if found else None


def _first_pid(history: str):
    with open(history) as f:
        line = f.readline()
    return json.loads(line)["pid"] if line.endswith("\n") else None


def _kill_node_mid_expert(ray_cluster, node, run_dir: str, submission_id: str, timeout: float = 600):
    """Wait until the expert training on `node` is past two checkpoints, then kill the node.
    Returns (that expert's group, the last step it logged before the kill)."""
    deadline, next_status, node_id = time.time() + timeout, time.time() + 15, node.node_id()
    while time.time() < deadline:
        for group in GROUPS:
            history = _history(run_dir, group)
            if not history or not node.runs(_first_pid(history)):
                continue
            _, steps = read_history(history)
            if steps and steps[-1] > 2 * CHECKPOINT_EVERY:
                killed = node.kill()
                _, steps = read_history(history)
                print(f"killed node {node_id} ({len(killed)} processes) at step {steps[-1]} of {group}")
                return group, steps[-1]
        if time.time() > next_status:  # `ray job status` takes seconds here: not on every poll
            status = ray_cluster.job("status", submission_id, timeout=60).stdout.lower()
            if "failed" in status or "succeeded" in status:
                raise AssertionError(f"the job ended before the second node's expert passed step {2 * CHECKPOINT_EVERY}:"
                                     "\n" + ray_cluster.job("logs", submission_id, timeout=60).stdout[-4000:])
            next_status = time.time() + 15
        time.sleep(0.05)
    raise AssertionError("no expert on the second node got past two checkpoints in time")


def test_losing_a_node_mid_expert_resumes_that_expert_from_its_checkpoint(ray_cluster, worker_node, tmp_path):
    runs_dir = str(tmp_path / "runs")
    run_dir = f"{runs_dir}/loss"
    head_id, lost_id = ray_cluster.head.node_id(), worker_node.node_id()
    runtime_env = json.dumps({"excludes": [".venv", "runs", ".git"], "env_vars": {"HF_HUB_OFFLINE": "1"}})
    start = time.time()
    submitted = ray_cluster.job(
        "submit", "--working-dir", ".", "--runtime-env-json", runtime_env, "--submission-id", "node-loss", "--no-wait",
        "--", "python", "-m", "dume_ray", "run", "--config", "configs/smoke/tiny.yaml", "name=loss",
        f"runs_dir={runs_dir}", "tasks.builtin=[copy,add]", "upcycle.enabled=false",
        f"experts.optim.steps={STEPS}", f"experts.optim.checkpoint_every={CHECKPOINT_EVERY}")
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]

    lost_group, last_step = _kill_node_mid_expert(ray_cluster, worker_node, run_dir, "node-loss")
    logs = ray_cluster.job("logs", "node-loss", "--follow", timeout=900)  # returns when the job ends
    status = ray_cluster.job("status", "node-loss", timeout=60)
    print(f"node-loss run: {time.time() - start:.0f} s")
    assert "succeeded" in status.stdout, status.stdout[-2000:] + logs.stdout[-6000:]
    # The GCS declares a node dead only after its health checks fail for a while; on a quiet machine the run can
    # finish sooner than that, so wait for it (the raylet's processes are gone already: node.kill waited for them).
    deadline = time.time() + 120
    while lost_id in ray_cluster.alive_nodes() and time.time() < deadline:
        time.sleep(2)
    assert lost_id not in ray_cluster.alive_nodes() and head_id in ray_cluster.alive_nodes()

    # The lost expert: two attempts, the second from a checkpoint, at most one interval of steps redone.
    starts, steps = read_history(_history(run_dir, lost_group))
    assert len(starts) == 2 and starts[0] == 0, starts
    resumed = starts[1]
    assert resumed > 0 and resumed % CHECKPOINT_EVERY == 0, starts
    assert 0 <= last_step - resumed <= CHECKPOINT_EVERY, (last_step, resumed)  # steps lost <= checkpoint interval
    assert steps[-1] == STEPS and sorted(set(steps)) == list(range(1, STEPS + 1))  # none skipped
    lost = json.loads(open(f"{run_dir}/experts/{lost_group}/DONE.json").read())["metrics"]
    assert lost["restarts"] == 1 and lost["resumed_from"] == [resumed] and lost["steps"] == STEPS
    assert lost["node_id"] == head_id  # finished on the surviving node

    # The expert on the surviving node, and every other stage: untouched and complete.
    (kept_group,) = set(GROUPS) - {lost_group}
    starts, steps = read_history(_history(run_dir, kept_group))
    assert starts == [0] and steps == list(range(1, STEPS + 1))
    kept = json.loads(open(f"{run_dir}/experts/{kept_group}/DONE.json").read())["metrics"]
    assert kept["restarts"] == 0 and kept["node_id"] == head_id
    for stage in STAGES:
        assert os.path.exists(f"{run_dir}/{stage}/DONE.json"), stage
    for model in ("base", "experts/copy", "experts/add", "student", "multitask"):
        assert os.path.exists(f"{run_dir}/{model}/model/config.json"), model
    for group in GROUPS:
        assert glob.glob(f"{run_dir}/soft_targets/groups/{group}/shards/*.parquet"), group
    report = json.loads(open(f"{run_dir}/eval/report.json").read())
    assert set(report["models"]) == {"base", "experts", "student", "multitask"}
    assert set(report["scores"]["student"]) == set(GROUPS)
    assert f"experts/{lost_group}" in report["faults"] and "1 restart(s)" in report["faults"][f"experts/{lost_group}"]
