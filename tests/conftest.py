"""Shared fixtures. One local Ray per test session (starting Ray costs ~10 s here), started only by tests
that ask for `ray_session`; unit tests never start Ray. `bash scripts/test.sh` runs two pytest-xdist workers,
so a full run may start two such local Rays side by side (each its own instance, 2 CPUs).

    .venv/bin/python -m pytest -q                     # everything
    .venv/bin/python -m pytest -q -m "not integration and not smoke"   # unit tests only
"""

import os

import pytest

from dume_ray.cli import QUIET_ENV

os.environ.update(QUIET_ENV)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_session():
    import ray
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": QUIET_ENV}, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny embedded Llama + character tokenizer saved as a Hugging Face folder."""
    from dume_ray.config import ModelConfig
    from dume_ray.model import create_initial_model

    out = tmp_path_factory.mktemp("tiny_model")
    return create_initial_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64), 0, str(out))
