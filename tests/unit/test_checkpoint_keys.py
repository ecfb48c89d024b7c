"""A changed config must never resume another config's checkpoint (regression: a student with a new
temperature resumed the old run's final step and trained nothing).

    .venv/bin/python -m pytest -q tests/unit/test_checkpoint_keys.py
"""

import os

from dume_ray.config import ResourcesConfig
from dume_ray.training_jobs import local_checkpoint_dir


def test_local_checkpoint_dir_is_keyed_by_config_hash_and_drops_other_hashes(tmp_path):
    local = ResourcesConfig(num_workers=0)
    old = local_checkpoint_dir(str(tmp_path), "aaaa", local)
    os.makedirs(old)
    new = local_checkpoint_dir(str(tmp_path), "bbbb", local)
    assert new != old and new.endswith("checkpoint-bbbb")
    assert not os.path.exists(old)


def test_same_hash_keeps_its_checkpoint_for_resume(tmp_path):
    local = ResourcesConfig(num_workers=0)
    first = local_checkpoint_dir(str(tmp_path), "aaaa", local)
    os.makedirs(first)
    assert local_checkpoint_dir(str(tmp_path), "aaaa", local) == first and os.path.exists(first)


def test_ray_train_workers_use_ray_storage_not_a_local_checkpoint(tmp_path):
    assert local_checkpoint_dir(str(tmp_path), "aaaa", ResourcesConfig(num_workers=2)) is None
