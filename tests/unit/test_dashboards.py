"""Training curves land where TensorBoard and MLflow read them: tensorboardX event files read back with
TensorBoard's own EventAccumulator, and MLflow metrics read back from a local file store.

    .venv/bin/python -m pytest -q tests/unit/test_dashboards.py
"""

from __future__ import annotations

import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dume_ray.dashboards import ScalarLog, tensorboard_dir


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar TensorBoard finds in `logdir`."""
    acc = EventAccumulator(logdir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_dirs_are_one_run_per_stage_and_expert(tmp_path):
    assert tensorboard_dir(str(tmp_path), "base", "base") == str(tmp_path / "tensorboard" / "base")
    assert tensorboard_dir(str(tmp_path), "experts", "add+sub") == str(tmp_path / "tensorboard" / "experts" / "add+sub")


def test_scalar_log_writes_train_val_and_validation_tags_tensorboard_reads(tmp_path):
    log = ScalarLog(str(tmp_path), fresh=True)
    for step in (1, 2):
        log.log(step, {"loss": 2.0 / step, "kd_loss": 1.0 / step, "tokens": 99}, "train")
    log.log(2, {"copy": 1.5}, "val_loss")
    log.log(2, {"copy": 0.25}, "validation")
    log.close()
    scalars = read_scalars(str(tmp_path))
    assert set(scalars) == {"train/loss", "train/kd_loss", "val_loss/copy", "validation/copy"}  # no token counts
    assert scalars["train/loss"] == [(1, 2.0), (2, 1.0)] and scalars["validation/copy"] == [(2, 0.25)]


def test_fresh_log_replaces_old_curves_and_resumed_log_appends(tmp_path):
    for fresh, step in ((True, 1), (True, 2), (False, 3)):
        log = ScalarLog(str(tmp_path), fresh=fresh)
        log.log(step, {"loss": float(step)}, "train")
        log.close()
    assert [s for s, _ in read_scalars(str(tmp_path))["train/loss"]] == [2, 3]


def test_scalar_log_sends_the_same_metrics_to_mlflow(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local file store; real users point at a server
    # set_tracking_uri also exports $MLFLOW_TRACKING_URI; setting it through monkeypatch first removes it at
    # teardown, so the CLI runs of later tests in this process do not log to this test's store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path / 'mlruns'}")
    mlflow.set_tracking_uri(f"file://{tmp_path / 'mlruns'}")
    mlflow.set_experiment("dume")
    run = mlflow.start_run(run_name="expert-copy")
    log = ScalarLog(str(tmp_path / "tb"), fresh=True, mlflow=mlflow)
    log.log(3, {"loss": 0.5}, "train")
    log.log(3, {"add+sub": 0.75}, "validation")  # '+' is not allowed in MLflow keys
    log.close()
    metrics = mlflow.get_run(run.info.run_id).data.metrics
    assert metrics == {"train/loss": 0.5, "validation/add_sub": 0.75}
    assert os.path.isdir(tmp_path / "tb")
