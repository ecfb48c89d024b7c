"""End-to-end smoke run of the CLI on configs/smoke/tiny.yaml, as a user would run it (a subprocess, then reruns).

    .venv/bin/python -m pytest -q -m smoke

Checks the artifacts of every stage, finite losses, the printed report (with the DUME rows), that a killed
driver loses only the steps since the last checkpoint, that a rerun skips finished stages and redoes exactly
those a change invalidates, that a corrupted shard is regenerated, and that the student and the upcycled MoE
load with plain transformers (no dume_ray import).
"""

import contextlib
import glob
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from dume_ray.config import ROUTING_GRANULARITIES

pytestmark = pytest.mark.smoke
# The killed run: the second expert is killed past its second checkpoint, with 100 steps of margin.
EXPERT_STEPS, CHECKPOINT_EVERY = 120, 10
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "dume_ray", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _cli_in_process(*args) -> subprocess.CompletedProcess:
    """`python -m dume_ray ...` in this process, on the session's Ray (a command that finds Ray up uses it and
    leaves it up): the same stages, minus a Ray start-up and cold workers per command. Errors go to stderr,
    which pytest captures; the assertions read the exit status, stdout and the run folder."""
    from dume_ray.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(list(args))
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), "")


def test_cli_survives_a_killed_driver_then_reruns_only_what_a_change_invalidates(tmp_path, ray_session):
    """Kill `python -m dume_ray run` (SIGKILL, its whole process group, local Ray included) while the second
    expert trains; the same command again skips the base and the finished expert, resumes the interrupted
    one from its checkpoint and finishes. Then a corrupted shard plus a new temperature: the shard is
    rejected by name and regenerated, and only the student and the report are redone. The killed run and
    its rerun are subprocesses, as a user runs them; the later commands (the change, add-task, remove-task)
    run in this process on the session's Ray, which saves a Ray start-up and cold workers each."""
    config = os.path.join(ROOT, "configs", "smoke", "tiny.yaml")
    args = ["run", "--config", config, f"runs_dir={tmp_path}",
            f"experts.optim.steps={EXPERT_STEPS}", f"experts.optim.checkpoint_every={CHECKPOINT_EVERY}"]
    run_dir = tmp_path / "smoke"
    # One expert at a time only while the kill needs it (the first done, the second training); the rerun trains
    # the two left side by side (resources never change a stage's hash, so it is the same run).
    killed_history = _kill_while_second_expert_trains([*args, "experts.resources.max_concurrent_jobs=1"], run_dir, tmp_path)

    resumed = _cli(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "[base] done already" in resumed.stdout and "[experts] copy: done already" in resumed.stdout
    # Quiet by default: Ray's own output is in the run folder, the terminal has each stage's wall time.
    assert "Started a local Ray instance" not in resumed.stdout + resumed.stderr
    assert "Started a local Ray instance" in (run_dir / "logs" / "driver.log").read_text()
    assert "] step " in (run_dir / "logs" / "workers.log").read_text()  # the experts' step lines
    stage_lines = re.findall(r"^=== \[\d/6\] \S+ done, wall time \d+ s", resumed.stdout, re.M)
    assert len(stage_lines) == 6 and "[ray] started a local Ray" in resumed.stdout and resumed.stderr == ""
    starts = [json.loads(line)["start"] for line in open(killed_history) if '"start"' in line]
    assert len(starts) == 2 and starts[1] > 0 and starts[1] % CHECKPOINT_EVERY == 0, starts  # resumed from a checkpoint
    for stage in ("base", "experts/copy", "experts/reverse", "experts/add", "upcycle", "soft_targets", "student", "multitask", "eval"):
        assert (run_dir / stage / "DONE.json").exists(), stage
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert set(report["models"]) == {"base", "experts", "student", "multitask", "dume", "dume+", "oracle", "weight_average",
                                 "random"}
    assert len(report["upcycle"]["variants"]) == 2 * len(ROUTING_GRANULARITIES) and report["upcycle"]["moe_active_parameters_per_token"] > 0
    assert "## DUME upcycling" in resumed.stdout
    assert all(0.0 <= v <= 1.0 for v in report["means"].values())
    for label, scored in report["scored_models"].items():  # the report scored exactly the finished artifacts
        stage_dir = os.path.dirname(scored["model"])
        assert json.loads(open(os.path.join(stage_dir, "DONE.json")).read())["config_hash"] == scored["config_hash"], label
    assert "experts/reverse" in report["faults"] and "1 restart(s)" in report["faults"]["experts/reverse"]
    assert (run_dir / "eval" / "report.png").stat().st_size > 1000
    assert "| **mean** |" in resumed.stdout and "student − multitask" in resumed.stdout
    for stage in ("student", "multitask"):
        assert math.isfinite(json.loads((run_dir / stage / "DONE.json").read_text())["metrics"]["final_loss"])

    shard = sorted((run_dir / "soft_targets" / "groups" / "copy" / "shards").glob("*.parquet"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    changed = _cli_in_process(*args, "distill.temperature=3.0")
    assert changed.returncode == 0, changed.stdout[-3000:] + changed.stderr[-3000:]
    assert f"rejected: {shard}" in changed.stdout and "regenerating the soft targets of ['copy']" in changed.stdout
    assert "(1 scored now)" in changed.stdout  # only the corrupted group is scored again
    # Skipped: base, 3 experts, upcycle, soft_targets (its manifest), multitask (does not use T).
    # Redone: student, eval.
    assert changed.stdout.count("done already") == 7, changed.stdout
    assert "[student] done already" not in changed.stdout and "[eval] done already" not in changed.stdout

    # Add a fourth task to the finished run: exactly one expert trains and one soft-target group is scored.
    kept = ["base", "experts/copy", "experts/reverse", "experts/add", *(f"soft_targets/groups/{g}" for g in ("copy", "reverse", "add"))]
    before = {stage: (run_dir / stage / "DONE.json").read_text() for stage in kept}
    parents = {stage: json.loads((run_dir / stage / "DONE.json").read_text())["config_hash"] for stage in ("student", "multitask")}
    added = _cli_in_process("add-task", "--run", str(run_dir), "--task", "sort")
    assert added.returncode == 0, added.stdout[-3000:] + added.stderr[-3000:]
    assert {stage: (run_dir / stage / "DONE.json").read_text() for stage in kept} == before  # untouched manifests
    soft = json.loads((run_dir / "soft_targets" / "DONE.json").read_text())["metrics"]
    assert soft["scored"] == ["sort"] and soft["reused"] == ["copy", "reverse", "add"]
    assert json.loads((run_dir / "experts" / "sort" / "DONE.json").read_text())["metrics"]["steps"] == EXPERT_STEPS
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert "sort" in report["tasks"] and "sort" in report["scores"]["student"]
    # distill.after_edit=continue (the default): student and baseline continue from their finished models for
    # distill.optim.steps / 4 groups = 1 step; the parents' hard-linked copies are gone once they are done.
    for stage in ("student", "multitask"):
        found = json.loads((run_dir / stage / "DONE.json").read_text())
        assert found["inputs"]["continues"] == parents[stage] and found["metrics"]["steps"] == 1, stage
        assert not list((run_dir / stage).glob("parent-*")), stage
    status = {stage: p["status"] for stage, p in report["provenance"].items()}
    assert {status[s] for s in kept} == {"reused"} and status["upcycle"] == "trained in this run"
    assert {status[s] for s in ("experts/sort", "soft_targets/groups/sort", "student", "multitask")} == {"trained in this run"}
    assert report["provenance"]["student"]["continues"] == parents["student"]
    assert "## Reused or trained in this run" in (run_dir / "eval" / "report.md").read_text()
    # ... and remove it again, retraining the students: nothing else is trained, nothing is scored.
    removed = _cli_in_process("remove-task", "--run", str(run_dir), "--task", "sort", "distill.after_edit=retrain")
    assert removed.returncode == 0, removed.stdout[-3000:] + removed.stderr[-3000:]
    assert json.loads((run_dir / "soft_targets" / "DONE.json").read_text())["metrics"]["scored"] == []
    assert "sort" not in json.loads((run_dir / "eval" / "report.json").read_text())["tasks"]
    assert {stage: (run_dir / stage / "DONE.json").read_text() for stage in kept} == before
    student = json.loads((run_dir / "student" / "DONE.json").read_text())
    assert "continues" not in student["inputs"] and student["metrics"]["steps"] == 4

    # The student and the MoE load with plain transformers, in one fresh process (one transformers import).
    load = subprocess.run([sys.executable, "-c", (
        "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        f"m = AutoModelForCausalLM.from_pretrained({str(run_dir / 'student' / 'model')!r});"
        f"t = AutoTokenizer.from_pretrained({str(run_dir / 'student' / 'model')!r});"
        "print('dume_ray' in sys.modules, m.config.vocab_size == len(t));"
        f"m = AutoModelForCausalLM.from_pretrained({str(run_dir / 'upcycle' / 'moe')!r}, trust_remote_code=True);"
        "print('dume_ray' in sys.modules, type(m).__name__, m.config.num_local_experts)")], capture_output=True, text=True)
    assert load.stdout.splitlines() == ["False True", "False DumeMoEForCausalLM 3"], load.stdout + load.stderr[-2000:]


def _kill_while_second_expert_trains(args, run_dir, cwd, timeout=400):
    """Start the run, SIGKILL its process group once the first expert is done and the second is past two
    checkpoints; returns the second expert's step log."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "dume_ray", *args], cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            histories = glob.glob(str(run_dir / "experts" / "reverse" / "history-*.jsonl"))
            if (run_dir / "experts" / "copy" / "DONE.json").exists() and histories:
                steps = [json.loads(line).get("step", 0) for line in open(histories[0]) if line.endswith("\n")]
                if steps and max(steps) > 2 * CHECKPOINT_EVERY:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    assert not (run_dir / "experts" / "reverse" / "DONE.json").exists()
                    return histories[0]
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"the run ended (rc={proc.returncode}) or timed out before the second expert passed step "
                         f"{2 * CHECKPOINT_EVERY}")


def test_cli_rejects_bad_input_before_training(tmp_path):
    bad = _cli("run", f"runs_dir={tmp_path}", "distill.alpha=1.5", cwd=tmp_path)
    assert bad.returncode == 2 and "distill.alpha must be in [0, 1], got 1.5" in bad.stderr
    typo = _cli("run", f"runs_dir={tmp_path}", "distill.tempreature=2", cwd=tmp_path)
    assert typo.returncode == 2 and "distill.tempreature" in typo.stderr
    too_long = _cli("run", f"runs_dir={tmp_path}", "model.max_seq_len=8", cwd=tmp_path)
    assert too_long.returncode == 2 and "exceeds the limit max_seq_len=8" in too_long.stderr
