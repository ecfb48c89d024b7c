"""Resource preflight: each stage's largest job against the live nodes, so a config asking for GPUs (or more
workers than the cluster has) fails with a readable message instead of Ray waiting forever.

    .venv/bin/python -m pytest -q tests/unit/test_resources.py
"""

from __future__ import annotations

import sys

import pytest

from dume_ray.config import ResourcesConfig, load_config
from dume_ray.resources import (explain, peak_rss_mb, reset_peak_rss, resource_problems, stage_jobs,
                                training_job_bundles)

ALL = ["base", "experts", "soft-targets", "distill", "multitask", "eval"]
CPU_BOX = [{"CPU": 2.0, "memory": 1e9}]


def test_default_cpu_config_fits_a_two_core_box():
    assert resource_problems(stage_jobs(load_config(None), ALL), CPU_BOX) == []


def test_local_mode_job_is_one_task_of_cpus_per_worker():
    assert training_job_bundles(ResourcesConfig(num_workers=0, cpus_per_worker=2)) == [{"CPU": 2.0}]


def test_gpu_workers_ask_one_gpu_each():
    bundles = training_job_bundles(ResourcesConfig(num_workers=3, use_gpu=True, cpus_per_worker=4))
    assert bundles == [{"CPU": 4.0, "GPU": 1.0}] * 3


def test_use_gpu_on_a_cpu_cluster_names_stage_and_gpu():
    cfg = load_config(None, ["experts.resources.use_gpu=true", "experts.resources.num_workers=1"])
    problems = resource_problems(stage_jobs(cfg, ALL), CPU_BOX)
    assert len(problems) == 2 and all(p.startswith("experts:") for p in problems)
    assert "1 CPU, 1 GPU" in problems[0] and "no node has that much" in problems[0]
    assert "the cluster has 2 CPU, 0 GPU" in problems[1]


def test_more_gpus_per_job_than_the_cluster_has_is_reported_even_if_each_worker_fits():
    cfg = load_config(None, ["distill.resources.use_gpu=true", "distill.resources.num_workers=4"])
    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    problems = resource_problems(stage_jobs(cfg, ["distill"]), nodes)
    assert problems == ["distill: one job needs 4 CPU, 4 GPU in all (4 worker(s)) but the cluster has 16 CPU, 2 GPU"]


def test_fractional_scoring_gpus_fit_on_one_gpu():
    cfg = load_config(None, ["soft_targets.gpus_per_actor=0.25", "soft_targets.num_actors=4"])
    assert resource_problems(stage_jobs(cfg, ["soft-targets"]), [{"CPU": 4.0, "GPU": 1.0}]) == []
    assert resource_problems(stage_jobs(cfg, ["soft-targets"]), [{"CPU": 4.0}]) != []


def test_only_the_stages_about_to_run_are_checked():
    cfg = load_config(None, ["experts.resources.use_gpu=true", "experts.resources.num_workers=1"])
    assert resource_problems(stage_jobs(cfg, ["distill", "eval"]), CPU_BOX) == []


def test_explain_says_what_to_change():
    text = explain(["experts: one worker asks for 1 GPU"], 3.2)
    assert "waited 3 s" in text and "use_gpu=false" in text and "resource_wait_s" in text


def test_memory_requests_grow_with_the_model_and_have_a_floor(tmp_path):
    from dume_ray.resources import MIN_MEMORY_BYTES, TRAIN_MEMORY_FACTOR, job_memory_bytes, weights_bytes

    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir(), big.mkdir()
    (small / "model.safetensors").write_bytes(b"\0" * 1000)
    (big / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 2**20)
    (big / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 2**20)
    (big / "tokenizer.json").write_bytes(b"\0" * 2**20)  # not weights
    assert weights_bytes(str(small)) == 1000 and weights_bytes(str(big)) == 2 * 2**20
    assert job_memory_bytes(str(small), TRAIN_MEMORY_FACTOR) == MIN_MEMORY_BYTES  # tiny models: the floor
    assert job_memory_bytes(str(big), 200.0) == 400 * 2**20  # weights x factor
    # never more than the largest node offers: a request no node meets would queue the job forever
    assert job_memory_bytes(str(big), 200.0, largest_node=300 * 2**20) == 300 * 2**20
    assert job_memory_bytes(str(big), 200.0, largest_node=0) == 400 * 2**20  # unknown: uncapped


def test_idle_core_share_gives_a_lone_job_the_free_cores_within_one_node():
    from dume_ray.resources import idle_core_share
    assert idle_core_share(1, jobs=1, free_cpus=2, largest_node_cpus=2) == 2  # one added expert on 2 cores
    assert idle_core_share(1, jobs=6, free_cpus=2, largest_node_cpus=2) == 1  # six experts fill the machine
    assert idle_core_share(1, jobs=2, free_cpus=8, largest_node_cpus=8) == 4
    assert idle_core_share(1, jobs=1, free_cpus=2, largest_node_cpus=1) == 1  # two 1-CPU nodes: no 2-CPU task fits
    assert idle_core_share(2, jobs=1, free_cpus=3, largest_node_cpus=4) == 1  # whole multiples of the request only
    assert idle_core_share(1, jobs=0, free_cpus=4, largest_node_cpus=4) == 1
    assert idle_core_share(1, jobs=1, free_cpus=2, largest_node_cpus=2, enabled=False) == 1  # share_idle_cores=false


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reset needs Linux's /proc/self/clear_refs")
def test_peak_rss_counts_from_the_last_reset():
    block = bytearray(200 * 2**20)  # 200 MiB, every page touched
    block[::4096] = b"1" * len(block[::4096])
    with_block = peak_rss_mb()
    del block
    reset_peak_rss()
    after_reset = peak_rss_mb()
    assert with_block - after_reset > 150  # the freed block's peak is forgotten...
    small = bytearray(50 * 2**20)
    small[::4096] = b"1" * len(small[::4096])
    assert peak_rss_mb() - after_reset > 40  # ...and a new allocation counts again
