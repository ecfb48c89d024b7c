"""The cluster launcher YAMLs in cluster/ pass the validation `ray up` runs before it contacts a cloud
(Ray's own `prepare_config` + `validate_config` against its ray-schema.json), and hold what dume_ray needs:
a head node, GPU worker types, the Ray version pinned in pyproject.toml, setup commands that install this
package from the folder the working copy is mounted at, start commands that join the head; and the node
types can hold every job of every shipped config (`resources.stage_jobs` against the nodes' CPUs and GPUs).

    .venv/bin/python -m pytest -q tests/unit/test_cluster_yaml.py
"""

from __future__ import annotations

import copy
import glob
import os
import re
import tomllib

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from dume_ray.config import load_config
from dume_ray.resources import resource_problems, stage_jobs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER = os.path.join(REPO, "cluster", "cluster.yaml")
LOCAL = os.path.join(REPO, "cluster", "local.yaml")


def _load(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def ray_up_validate(config: dict) -> dict:
    """What `ray up` does to a YAML before it touches a provider (commands._bootstrap_config)."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("path", [CLUSTER, LOCAL], ids=os.path.basename)
def test_cluster_yaml_passes_ray_up_validation(path):
    prepared = ray_up_validate(_load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_cloud_cluster_has_cpu_head_and_autoscaling_gpu_workers():
    config = _load(CLUSTER)
    types = config["available_node_types"]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu_instances = ("g4dn", "g5", "g6", "p3", "p4", "p5")
    assert workers and all(t["node_config"]["InstanceType"].startswith(gpu_instances) for t in workers.values())
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers.values())  # scale from zero
    ray_pin = re.search(r'"ray\[[^]]*\]==([0-9.]+)"', open(os.path.join(REPO, "pyproject.toml")).read()).group(1)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray_pin)}-py3\d+-gpu", config["docker"]["image"])
    python = re.search(r"-py3(\d+)-", config["docker"]["image"]).group(1)
    required = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["project"]["requires-python"]
    assert int(python) >= int(re.search(r">=3\.(\d+)", required).group(1))  # the image's Python can install us
    assert "GPU" not in types[config["head_node_type"]]["resources"]  # the head drives; training goes to workers
    assert config["max_workers"] >= max(t["max_workers"] for t in workers.values())  # the global cap hides no type


@pytest.mark.parametrize("path", [CLUSTER, LOCAL], ids=os.path.basename)
def test_cluster_yaml_mounts_this_working_copy_and_installs_it(path):
    config = _load(path)
    assert config["file_mounts"]["~/dume_ray"] == "."
    installs = [c for c in config["setup_commands"] if "pip install" in c]
    # pip installs the mounted folder itself (editable), not a PyPI package of the same name
    assert installs and all(re.search(r'-e "\$HOME/dume_ray(\[[a-z,]+\])?"', c) for c in installs), installs
    assert ".venv" in config["rsync_exclude"] and "runs" in config["rsync_exclude"]
    head, workers = " ".join(config["head_start_ray_commands"]), " ".join(config["worker_start_ray_commands"])
    port = re.search(r"ray start --head --port=(\d+)", head).group(1)
    assert f"ray start --address=$RAY_HEAD_IP:{port}" in workers  # workers join the head the head started


def test_local_cluster_lists_head_and_worker_hosts():
    provider = _load(LOCAL)["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]
    assert provider["head_ip"] not in provider["worker_ips"] and len(set(provider["worker_ips"])) == len(provider["worker_ips"])


# What the cloud provider reports for the instance types in cluster.yaml (AWS: vCPUs, NVIDIA GPUs); Ray fills
# `resources: {}` in from the same numbers when it starts the node.
INSTANCES = {"m5.2xlarge": {"CPU": 8.0}, "g5.2xlarge": {"CPU": 8.0, "GPU": 1.0}, "g5.12xlarge": {"CPU": 48.0, "GPU": 4.0}}
STAGES = ["base", "experts", "distill+multitask", "soft-targets", "eval"]
SHIPPED = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


def _cluster_nodes() -> list[dict]:
    """Every node the cluster can have at once: the head, and each worker type at its max_workers."""
    config = _load(CLUSTER)
    nodes = []
    for name, node_type in config["available_node_types"].items():
        resources = node_type["resources"] or INSTANCES[node_type["node_config"]["InstanceType"]]
        count = 1 if name == config["head_node_type"] else node_type["max_workers"]
        nodes += [dict(resources)] * count
    return nodes


def test_instance_table_covers_every_node_type():
    types = _load(CLUSTER)["available_node_types"].values()
    assert {t["node_config"]["InstanceType"] for t in types} <= set(INSTANCES)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.relpath(p, REPO))
def test_cloud_cluster_can_hold_every_job_of_every_shipped_config(path):
    cfg = load_config(path)
    assert resource_problems(stage_jobs(cfg, STAGES), _cluster_nodes()) == []
    trial = {"CPU": cfg.search.cpus_per_trial, **({"GPU": cfg.search.gpus_per_trial} if cfg.search.gpus_per_trial else {})}
    assert resource_problems({"search": [trial]}, _cluster_nodes()) == []


def test_the_real_config_needs_the_cluster_s_gpu_workers():
    """The check above can fail: on the head alone, every GPU stage of the real config is reported."""
    cfg = load_config(os.path.join(REPO, "configs", "real", "qwen2.5-0.5b.yaml"))
    head_only = [n for n in _cluster_nodes() if "GPU" not in n]
    problems = resource_problems(stage_jobs(cfg, STAGES), head_only)
    assert {p.split(":")[0] for p in problems} == {"experts", "distill+multitask", "soft-targets", "eval"}, problems


@pytest.mark.parametrize("field", ["cluster_name", "provider"])
def test_cluster_yaml_missing_required_field_is_rejected_naming_it(field):
    config = _load(CLUSTER)
    del config[field]
    with pytest.raises(jsonschema.ValidationError, match=f"'{field}' is a required property"):
        validate_config(config)


def test_cluster_yaml_with_misspelled_field_is_rejected_naming_it():
    config = _load(CLUSTER)
    config["max_worker"] = config.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="'max_worker' was unexpected"):
        ray_up_validate(config)


def test_local_cluster_without_worker_ips_is_rejected():
    config = _load(LOCAL)
    del config["provider"]["worker_ips"]
    with pytest.raises(Exception, match="worker_ips"):
        ray_up_validate(config)
