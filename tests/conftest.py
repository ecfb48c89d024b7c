"""Shared fixtures. One local Ray per test session (starting Ray costs ~10 s here), started only by tests
that ask for `ray_session`; unit tests never start Ray. `bash scripts/test.sh` runs two pytest-xdist workers,
so a full run may start two such local Rays side by side (each its own instance, 2 CPUs).

    .venv/bin/python -m pytest -q                     # everything
    .venv/bin/python -m pytest -q -m "not integration and not smoke"   # unit tests only

`s3_server` (session) is an S3-compatible store on loopback (moto's server, in a thread) for the storage-URI
tests; `new_bucket` gives a test its own bucket there and points AWS_ENDPOINT_URL at it.

Hypothesis (property tests, e.g. tests/unit/test_config_fuzz.py) runs under the derandomized "ci" profile by
default, so every run, in CI or not, tries the same examples and a change can only fail on its own merit.
To explore new examples, use the random "dev" profile (which keeps failures in .hypothesis/ to replay):

    .venv/bin/python -m pytest -q tests/unit/test_config_fuzz.py --hypothesis-profile=dev
    .venv/bin/python -m pytest -q tests/unit/test_config_fuzz.py --hypothesis-seed=123   # implies "dev"
    HYPOTHESIS_PROFILE=dev .venv/bin/python -m pytest -q tests/unit/test_config_fuzz.py
"""

import os

import pytest
from hypothesis import settings

from dume_ray.cli import QUIET_ENV

os.environ.update(QUIET_ENV)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# "ci": the same examples on every run (a seed derived from each test), no example database. "dev": random
# examples, and the database replays earlier failures first. --hypothesis-profile=NAME overrides both.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    """--hypothesis-seed means to explore: derandomize (the "ci" profile) would silently ignore the seed."""
    if config.getoption("hypothesis_seed", None) is not None and not config.getoption("hypothesis_profile", None):
        settings.load_profile("dev")


@pytest.fixture(scope="session")
def ray_session():
    import ray
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": QUIET_ENV}, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible object store on loopback (moto in server mode, in a thread): the endpoint URL.
    Tests point at it with `s3_env` and make their own bucket with `new_bucket`."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This test's environment points pyarrow.fs (and the CLI, and Ray workers started from it) at the server."""
    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(key, value)
    return {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}


@pytest.fixture
def new_bucket(s3_env):
    """A fresh, empty bucket on the test server: its name."""
    import uuid

    import pyarrow.fs as pafs

    name = f"test-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL"], scheme="http", region="us-east-1",
                      allow_bucket_creation=True).create_dir(name)
    return name


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny embedded Llama + character tokenizer saved as a Hugging Face folder."""
    from dume_ray.config import ModelConfig
    from dume_ray.model import create_initial_model

    out = tmp_path_factory.mktemp("tiny_model")
    return create_initial_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64), 0, str(out))


@pytest.fixture
def stand_in_expert(tiny_model_dir):
    """`make(out)`: the tiny model with seeded perturbed weights (a stand-in for a trained expert), saved with its
    tokenizer to `out` as an expert job saves its model; returns the model."""
    def make(out: str):
        import torch

        from dume_ray.model import load_model, load_tokenizer
        torch.manual_seed(1)
        model = load_model(tiny_model_dir)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(out)
        load_tokenizer(tiny_model_dir).save_pretrained(out)
        return model
    return make
