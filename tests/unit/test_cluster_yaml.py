"""The cluster launcher YAMLs in cluster/ pass the validation `ray up` runs before it contacts a cloud
(Ray's own `prepare_config` + `validate_config` against its ray-schema.json), and hold what dume_ray needs:
a head node, GPU worker types, setup commands that install this package from the mounted working copy.

    .venv/bin/python -m pytest -q tests/unit/test_cluster_yaml.py
"""

from __future__ import annotations

import copy
import os

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

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
    assert config["docker"]["image"].endswith("-gpu") and "2.60.0" in config["docker"]["image"]  # = pyproject pin


@pytest.mark.parametrize("path", [CLUSTER, LOCAL], ids=os.path.basename)
def test_cluster_yaml_mounts_this_working_copy_and_installs_it(path):
    config = _load(path)
    assert config["file_mounts"]["~/dume_ray"] == "."
    assert any("pip install" in c and "dume_ray" in c for c in config["setup_commands"])
    assert ".venv" in config["rsync_exclude"] and "runs" in config["rsync_exclude"]


def test_local_cluster_lists_head_and_worker_hosts():
    provider = _load(LOCAL)["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]


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
