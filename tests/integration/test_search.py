"""The `search` stage end to end on a tiny config: a 2-trial Ray Tune run (ASHA, seeded points), experts
shared through the cache, best.yaml + report + affinity heatmap written, and `Tuner.restore` of the finished
experiment repeating no trial.

    .venv/bin/python -m pytest -q tests/integration/test_search.py
"""

import glob
import os

import pytest
import yaml

from dume_ray import manifest
from dume_ray.config import load_config

pytestmark = pytest.mark.integration


def test_tiny_search_runs_two_trials_reuses_experts_and_writes_best(ray_session, tmp_path):
    from dume_ray.search.launch import run_search

    cfg = load_config("configs/smoke/tiny.yaml", [
        f"runs_dir={tmp_path}", "name=search", "base.enabled=false", "search.num_samples=2", "search.compare_random=false",
        "search.groupings=['copy | reverse | add', 'copy+reverse | add']", "search.num_affinity_seeds=1",
        "search.proxy_steps=4", "search.report_every=2", "search.affinity_batches=1", "search.affinity_batch_size=8",
        "search.max_concurrent_trials=2", "search.temperature=[1.0,4.0]", "search.alpha=[0.5,1.0]"])
    done = run_search(cfg)
    stage = f"{tmp_path}/search/search"

    best = yaml.safe_load(open(f"{stage}/best.yaml"))
    assert best["grouping"] in ("copy | reverse | add", "copy+reverse | add")
    assert 0.0 <= best["val_mean"] <= 1.0 and best["default_val_mean"] is not None
    assert done["metrics"]["grouping"] == best["grouping"]
    report = open(f"{stage}/report.md").read()
    assert "Gradient affinity" in report and "default (one expert per task)" in report
    assert open(f"{stage}/affinity.png", "rb").read(4) == b"\x89PNG"

    # Two trials, both with a full set of reports; the 'add' expert was trained once and reused.
    trials = glob.glob(f"{stage}/tune/seeded-*/trial_*/result.json")
    assert len(trials) == 2
    lines = [yaml.safe_load(open(p).read().splitlines()[-1]) for p in trials]
    assert sum(r["cache_hits"] for r in lines) == 1 and sum(r["cache_misses"] for r in lines) == 4
    assert len([d for d in os.listdir(f"{stage}/expert_cache") if not d.startswith(".")]) == 4
    assert {r["grouping"] for r in lines} == {"copy | reverse | add", "copy+reverse | add"}

    # Restore: with the manifest gone, the same config resumes the Tune experiment and repeats nothing.
    manifest.clear(stage)
    again = run_search(cfg)
    assert glob.glob(f"{stage}/tune/seeded-*/trial_*/result.json") == trials
    assert again["metrics"]["val_mean"] == done["metrics"]["val_mean"]
