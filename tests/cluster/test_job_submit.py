"""The way Ray users run dume_ray on a cluster, on loopback: `ray start --head` (token authentication on, as
Ray 2.60 does by default once a token exists), `ray job submit --working-dir . -- python -m dume_ray run ...`
of the tiny smoke pipeline, then the report and the TensorBoard curves are checked, and a second job whose
config asks for a GPU this cluster lacks fails with a readable message within `resource_wait_s`.

    .venv/bin/python -m pytest -q -m cluster

The head gets its own temp dir, ports and token, and the test talks to it only through the `ray` CLI in
subprocesses, so it coexists with the in-process `ray_session` fixture and with other Ray instances on the
machine. Teardown stops only this head: its `ray start --block` process group, then any process still
naming its temp dir (never `ray stop`, which stops every Ray on the machine).
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.cluster
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
              "--node-manager-port", "--object-manager-port")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _pids_naming(text: str) -> list[int]:
    """Processes whose command line contains `text` (our head's unique temp dir)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return [p for p in found if p != os.getpid()]


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="dume-head-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS))))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"PATH": f"{BIN}:{env.get('PATH', '')}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                "PYTHONUNBUFFERED": "1"})
    cmd = [f"{BIN}/ray", "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard",
           "true", "--dashboard-host", "127.0.0.1", "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir,
           "--disable-usage-stats"] + [str(x) for kv in ports.items() for x in kv]
    log = open(os.path.join(temp_dir, "ray_start.log"), "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=5)
                break
            except urllib.error.HTTPError:  # 401 without the token: the dashboard is up and enforcing auth
                break
            except OSError:
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray start failed:\n{open(log.name).read()[-3000:]}")
                time.sleep(1)
        yield address, env
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
            try:
                os.killpg(head.pid, sig)  # `ray start --block` and the raylet/GCS/dashboard it started
            except ProcessLookupError:
                pass
            for pid in _pids_naming(temp_dir):  # anything that left the group (workers, agents)
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            end = time.time() + wait
            while time.time() < end and (head.poll() is None or _pids_naming(temp_dir)):
                time.sleep(0.5)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_job(address: str, env: dict, command: str, *args: str, timeout: int = 540) -> subprocess.CompletedProcess:
    """`ray job <command> --address <head> ...` from the repository root, as a user types it. A fresh head's
    dashboard answers before its job agent is up ("No available agent"): retry that for up to two minutes."""
    deadline = time.time() + 120
    while True:
        result = subprocess.run([f"{BIN}/ray", "job", command, "--address", address, *args], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in result.stderr or time.time() > deadline:
            return result
        time.sleep(3)


def _scalar_tags(logdir: str) -> set[str]:
    acc = EventAccumulator(logdir)
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_ray_job_submit_runs_the_pipeline_and_reports_a_missing_gpu(ray_head, tmp_path, monkeypatch):
    address, env = ray_head
    runs_dir = str(tmp_path / "runs")  # absolute: the job's working directory is Ray's unpacked copy of the repo
    mlruns = tmp_path / "mlruns"  # MLflow file store (a server URI on a real cluster), only if mlflow is installed
    env_vars = {"HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"file://{mlruns}", "MLFLOW_ALLOW_FILE_STORE": "true"}
    if importlib.util.find_spec("mlflow") is None:
        env_vars.pop("MLFLOW_TRACKING_URI")
    runtime_env = json.dumps({"excludes": [".venv", "runs", ".git"], "env_vars": env_vars})
    submit = ["submit", "--working-dir", ".", "--runtime-env-json", runtime_env]  # command + its options

    gpu = _ray_job(address, env, *submit, "--submission-id", "gpu-ask", "--no-wait", "--", "python", "-m", "dume_ray",
                   "experts", "--config", "configs/smoke/tiny.yaml", "name=gpu", f"runs_dir={runs_dir}",
                   "experts.resources.num_workers=1", "experts.resources.use_gpu=true", "resource_wait_s=3")
    assert gpu.returncode == 0, gpu.stdout[-2000:] + gpu.stderr[-2000:]

    start = time.time()
    run = _ray_job(address, env, *submit, "--", "python", "-m", "dume_ray", "run", "--config", "configs/smoke/tiny.yaml",
                   "name=job", f"runs_dir={runs_dir}", "tasks.builtin=[copy,add]",  # 2 experts: enough for the path
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
    print(f"ray job submit of the smoke pipeline: {seconds:.0f} s")
    if "MLFLOW_TRACKING_URI" in env_vars:  # the same curves through Ray's setup_mlflow, one run per training job
        from mlflow.tracking import MlflowClient
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=env_vars["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([client.get_experiment_by_name("job").experiment_id])
        by_name = {r.info.run_name.split("-")[0]: r.data.metrics for r in runs}
        assert set(by_name) == {"base", "copy", "add", "student", "multitask"}
        assert {"train/loss", "train/kd_loss", "validation/copy"} <= set(by_name["student"])

    status = _ray_job(address, env, "status", "gpu-ask", timeout=60)
    logs = _ray_job(address, env, "logs", "gpu-ask", timeout=60)
    assert "failed with exit code 3" in status.stdout + status.stderr, status.stdout[:3000] + status.stderr[:2000]
    assert "cannot provide the resources" in logs.stdout and "experts: one worker asks for 1 CPU, 1 GPU" in logs.stdout
