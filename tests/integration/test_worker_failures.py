"""A Ray Train worker process killed in the middle of training (experts and distill): with
`FailureConfig(max_failures=1)` the job restarts from its latest checkpoint and finishes, and the step log
shows no step skipped and no step redone beyond the checkpoint interval.

Both jobs run at once under 2-worker TorchTrainers (DDP on gloo, 0.25 CPU per worker) on the session's
local Ray; the test SIGKILLs each job's rank-0 worker (its pid is in the step log) once Ray Train has
persisted a checkpoint.

    .venv/bin/python -m pytest -q tests/integration/test_worker_failures.py
"""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from dume_ray.config import OptimConfig, ResourcesConfig, to_dict
from dume_ray.data.soft_targets import write_shard
from dume_ray.data.tokenizer import build_char_tokenizer
from dume_ray.soft_targets.teacher_scoring import TeacherScorer
from dume_ray.tasks import encode_rows
from dume_ray.tasks.builtin import make_builtin_task
from dume_ray.worker_utils import read_history

pytestmark = pytest.mark.integration
STEPS, CHECKPOINT_EVERY = 120, 20  # the kills come right after step 40: 80 steps of margin


def _job(tmp_path, label, init_dir, task, **extra):
    job_dir = tmp_path / label
    return {"label": label, "init_dir": init_dir, "output_dir": str(job_dir / "model"),
            "optim": to_dict(OptimConfig(steps=STEPS, batch_size=8, warmup_steps=1, checkpoint_every=CHECKPOINT_EVERY)),
            "seed": 0, "torch_threads": 1, "num_workers": 2, "dtype": "float32", "train_mlp_only": False,
            "validation": {"copy": [(e.prompt, e.response) for e in task.examples("validation")][:4]},
            "max_new_tokens": 4, "local_checkpoint_dir": None, "history_path": str(job_dir / "history.jsonl"),
            "run_name": label, **extra}


def _soft_target_shard(rows, teacher_dir, path, top_k):
    batch = {key: np.array([r[key] for r in rows] if key != "input_ids" else
                           np.array([np.asarray(r[key]) for r in rows], dtype=object), dtype=object)
             for key in rows[0]}
    write_shard(TeacherScorer(teacher_dir, top_k=top_k)(batch), path)


def _kill_rank_zero_after_two_checkpoints(history_path, timeout=300):
    """SIGKILL the job's rank-0 worker (its pid is on the log's first line) once it is past its second
    checkpoint. Ray Train's controller registers a reported checkpoint when it next polls the workers
    (every 2 s), and a worker's report blocks until the previous one was taken, so past the second
    checkpoint the first is registered for sure; the second may or may not be."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        starts, steps = read_history(history_path) if os.path.exists(history_path) else ([], [])
        if steps and steps[-1] > 2 * CHECKPOINT_EVERY:
            os.kill(json.loads(open(history_path).readline())["pid"], signal.SIGKILL)
            return
        time.sleep(0.02)
    raise AssertionError(f"{history_path}: training did not pass step {2 * CHECKPOINT_EVERY} within {timeout} s")


def test_killed_train_workers_resume_from_their_checkpoints(ray_session, tiny_model_dir, tmp_path):
    import ray.data
    from dume_ray.distill.worker import train_fn_per_worker as student_fn
    from dume_ray.training_jobs import fit_concurrently
    from dume_ray.experts.worker import train_fn_per_worker as expert_fn

    task = make_builtin_task("copy", 0, 64, 8, 8)
    rows = encode_rows({"copy": task}, build_char_tokenizer(), "train", 32, {"copy": "copy"})
    os.makedirs(tmp_path / "shards")
    _soft_target_shard(rows, tiny_model_dir, str(tmp_path / "shards" / "part-0.parquet"), top_k=4)

    # 4 workers x 0.25 CPU leave 1 of the 2 CPUs to the Ray Data tasks that feed them (all 2 taken would starve them).
    resources = ResourcesConfig(num_workers=2, cpus_per_worker=0.25, max_failures=1)
    jobs = {
        "expert": (expert_fn, _job(tmp_path, "expert", tiny_model_dir, task), ray.data.from_items(rows)),
        "student": (student_fn, _job(tmp_path, "student", tiny_model_dir, task, alpha=0.5, temperature=2.0,
                                     divergence="forward_kl", jsd_beta=0.5, anneal=False, top_k=4),
                    ray.data.read_parquet(str(tmp_path / "shards"))),
    }
    results, errors = {}, []

    def fit(label):
        train_fn, loop_config, dataset = jobs[label]
        try:
            results.update(fit_concurrently(train_fn, {label: (loop_config, dataset)}, resources,
                                            str(tmp_path / "ray_train"), stage=label))
        except Exception as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=fit, args=(label,)) for label in jobs]
    for thread in threads:
        thread.start()
    for label in jobs:
        _kill_rank_zero_after_two_checkpoints(jobs[label][1]["history_path"])
    for thread in threads:
        thread.join(timeout=400)
    assert not errors, errors

    for label, (_, loop_config, _) in jobs.items():
        result = results[label]
        lines = [json.loads(line) for line in open(loop_config["history_path"])]
        attempts = [i for i, line in enumerate(lines) if "start" in line]
        assert len(attempts) == 2 and result["restarts"] == 1, (label, attempts)
        assert lines[attempts[1]]["pid"] != lines[0]["pid"]  # a new worker process took over
        killed_at = lines[attempts[1] - 1]["step"]  # the last step the killed worker finished
        resumed_from = lines[attempts[1]]["start"]
        # It resumed from a registered checkpoint: the last one, or the one before if the kill came
        # before the controller's next poll.
        assert resumed_from % CHECKPOINT_EVERY == 0
        assert killed_at - 2 * CHECKPOINT_EVERY <= resumed_from < killed_at, (label, resumed_from, killed_at)
        # Nothing lost, nothing else repeated: exactly the steps between that checkpoint and the kill ran twice.
        steps = [line["step"] for line in lines if "step" in line]
        assert sorted(set(steps)) == list(range(1, STEPS + 1)), label
        redone = sorted(s for s in set(steps) if steps.count(s) == 2)
        assert redone == list(range(resumed_from + 1, killed_at + 1)) and max(map(steps.count, steps)) <= 2
        assert result["steps"] == STEPS and result["steps_redone"] == len(redone)
        assert os.path.exists(os.path.join(loop_config["output_dir"], "config.json")), label
        print(f"[{label}] killed after step {killed_at}, resumed from checkpoint {resumed_from}: "
              f"{len(redone)} steps redone, 0 lost")
