"""Fixtures of the `cluster` tests: a real Ray cluster on loopback, started and stopped by process id.

`ray_cluster` (one per test module) is a head started with `ray start --head --block` in its own temp dir,
ports and auth token (Ray 2.60's token authentication on), 1 CPU; `worker_node` (one per test) joins a
second raylet to it with its own temp dir, ports and 1 CPU, so two 1-CPU jobs cannot share a node. Both come
from `cluster/local_cluster.py` (also behind `cluster/two_nodes.sh`). Teardown stops only what they started:
each node's process group, its descendants, then anything still naming its temp dir (never `ray stop`,
which would stop every Ray on the machine). The tests talk to the cluster only through the `ray` CLI and
its dashboard, so they coexist with the in-process `ray_session` fixture and other Ray instances.

    .venv/bin/python -m pytest -q -m cluster
"""

from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from cluster.local_cluster import LocalCluster, LocalNode  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = LocalCluster(head_cpus=1)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def worker_node(ray_cluster) -> LocalNode:
    node = ray_cluster.add_node(num_cpus=1)
    try:
        yield node
    finally:
        node.stop()
        ray_cluster.nodes.remove(node)
