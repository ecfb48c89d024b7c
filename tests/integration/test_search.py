"""The `search` stage end to end on a tiny config: a 3-trial Ray Tune run (ASHA, seeded points) interrupted
(Ctrl-C) after its first trial, then resumed by rerunning it (`Tuner.restore`) without rerunning the finished
trial; experts shared through the cache, best.yaml + report + affinity heatmap written, and `Tuner.restore` of
the finished experiment repeating no trial.

    .venv/bin/python -m pytest -q tests/integration/test_search.py
"""

import glob
import os
import signal
import threading

import pytest
import yaml

from dume_ray import manifest
from dume_ray.config import load_config

pytestmark = pytest.mark.integration


def test_interrupted_search_resumes_with_tuner_restore_reuses_experts_and_writes_best(ray_session, tmp_path):
    """Ctrl-C (Tune's SIGINT/SIGUSR1 handler) after the first trial: no best.yaml, no manifest, an error saying
    to rerun; the rerun restores the experiment, keeps the finished trial as it was, and completes the rest,
    with experts shared through the cache, best.yaml, the report and the affinity heatmap. Then, with the
    manifest gone, the finished experiment is restored again and repeats nothing. (One search for what were
    two tests, each running its own: a 2-trial search restored once finished, and this interrupted one.)"""
    from dume_ray.search.launch import run_search

    cfg = load_config("configs/smoke/tiny.yaml", [
        f"runs_dir={tmp_path}", "name=search", "base.enabled=false", "search.num_samples=3", "search.compare_random=false",
        "search.groupings=['copy | reverse | add', 'copy+reverse | add', 'copy | reverse+add']",
        "search.num_affinity_seeds=1", "search.proxy_steps=4", "search.report_every=2", "search.affinity_batches=1",
        "search.affinity_batch_size=8", "search.max_concurrent_trials=1", "search.temperature=[1.0,4.0]",
        "search.alpha=[0.5,1.0]", "search.grace_period=2",  # no ASHA rung before the last report: all finish
        "search.default_margin=0"])  # the plain best trial wins: best.yaml's val_mean is the best trial's
    stage = f"{tmp_path}/search/search"
    pattern = f"{stage}/tune/seeded-*/trial_*/result.json"

    def started():
        return [p for p in glob.glob(pattern) if os.path.getsize(p) > 0]

    stop = threading.Event()

    def interrupt_once_a_trial_has_finished():  # trials run one at a time: two more are to come
        while not stop.wait(0.1):
            try:
                finished = any(_records(p)[-1]["done"] for p in started())
            except Exception:  # noqa: BLE001 - a line being written: look again
                continue
            if finished:
                os.kill(os.getpid(), signal.SIGUSR1)  # what Tune's Ctrl-C handler also listens to
                return

    previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # should the signal come after fit(): ignored
    watcher = threading.Thread(target=interrupt_once_a_trial_has_finished, daemon=True)
    watcher.start()
    try:
        with pytest.raises(RuntimeError, match="rerun the same command to resume it"):
            run_search(cfg)
    finally:
        stop.set()
        watcher.join()
        signal.signal(signal.SIGUSR1, previous)
    assert not os.path.exists(f"{stage}/best.yaml") and not os.path.exists(f"{stage}/DONE.json")
    first_runs = started()
    assert 1 <= len(first_runs) < 3
    finished = {path: records for path, records in ((p, _records(p)) for p in first_runs) if records[-1]["done"]}
    assert len(finished) >= 1, {p: _records(p) for p in first_runs}

    again = run_search(cfg)  # the same command: Tuner.restore of the interrupted experiment
    results = glob.glob(pattern)
    assert len(results) == 3 and set(first_runs) <= set(results)  # no trial created twice, none lost
    for path, records in finished.items():  # finished trials were not run again: no report added or redone
        assert _records(path) == records
    lines = [yaml.safe_load(open(p).read().splitlines()[-1]) for p in results]
    assert all(r["step"] == 4 for r in lines)  # every trial ran to the end: the result is complete
    assert len({r["trial_id"] for r in lines}) == 3
    best = yaml.safe_load(open(f"{stage}/best.yaml"))
    assert best["val_mean"] == max(r["val_mean"] for r in lines) == again["metrics"]["val_mean"]
    assert best["grouping"] in ("copy | reverse | add", "copy+reverse | add", "copy | reverse+add")
    assert 0.0 <= best["val_mean"] <= 1.0 and best["default_val_mean"] is not None
    assert again["metrics"]["grouping"] == best["grouping"]
    report = open(f"{stage}/report.md").read()
    assert "Gradient affinity" in report and "default (one expert per task)" in report
    assert open(f"{stage}/affinity.png", "rb").read(4) == b"\x89PNG"
    # 7 expert look-ups (3 + 2 + 2), 5 distinct experts, each trained once into the cache: 'add' and 'copy' were
    # reused (a trial rerun after the interrupt may also find the experts its first attempt cached).
    assert {r["grouping"] for r in lines} == {"copy | reverse | add", "copy+reverse | add", "copy | reverse+add"}
    assert sum(r["cache_hits"] + r["cache_misses"] for r in lines) == 7 and sum(r["cache_hits"] for r in lines) >= 2
    assert len([d for d in os.listdir(f"{stage}/expert_cache") if not d.startswith(".")]) == 5

    # Restore: with the manifest gone, the same config resumes the finished Tune experiment and repeats nothing.
    reports = {p: _records(p) for p in results}
    manifest.clear(stage)
    restored = run_search(cfg)
    assert sorted(glob.glob(pattern)) == sorted(results) and {p: _records(p) for p in results} == reports
    assert restored["metrics"]["val_mean"] == again["metrics"]["val_mean"]


def _records(result_json: str) -> list[dict]:
    """A trial's reports: which step, when (a rerun would report again, at other times), and since which restore."""
    keys = ("trial_id", "step", "done", "timestamp", "iterations_since_restore", "val_mean")
    return [{k: r.get(k) for k in keys} for r in map(yaml.safe_load, open(result_json).read().splitlines())]
