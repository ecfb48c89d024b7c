"""Training curves where TensorBoard (and, when configured, MLflow) reads them.

Ray Train V2 has no logger callbacks (those are Ray Tune's), so the rank-0 worker of each training job
writes its scalars with tensorboardX into `<run>/tensorboard/<stage>[/<group>]` and, when an MLflow
tracking URI is set, also to the MLflow run that Ray's `setup_mlflow` opened (see `worker_utils.py`).
Tags are the same for every stage, so the student and the multitask baseline overlay in one chart:

    train/loss  train/ce_loss  train/kd_loss  train/lr  train/grad_norm      every step
    val_loss/<task>                                                           every checkpoint
    validation/<task>   (exact match, greedy decoding)                       at the last step

    tensorboard --logdir runs/<name>/tensorboard

Pure: no Ray here. Tested in tests/integration/test_dashboards.py.
"""

from __future__ import annotations

import glob
import os
import re
import time
from typing import Any, Optional

from tensorboardX import SummaryWriter

TRAIN_KEYS = ("loss", "ce_loss", "kd_loss", "grad_norm", "lr", "alpha")


def mlflow_tracking_uri(configured: Optional[str]) -> Optional[str]:
    """Where training metrics also go: the config's `mlflow_tracking_uri`, else $MLFLOW_TRACKING_URI, else nowhere."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or None


def tensorboard_dir(run_dir: str, stage: str, label: str) -> str:
    """`<run>/tensorboard/base`, `<run>/tensorboard/experts/<group>`, `<run>/tensorboard/student`, ..."""
    parts = [stage] if stage == label else [stage, label]
    return os.path.abspath(os.path.join(run_dir, "tensorboard", *parts))


class ScalarLog:
    """Scalars of one training job: TensorBoard event files, plus MLflow metrics when `mlflow` is given."""

    def __init__(self, logdir: str, fresh: bool, mlflow: Optional[Any] = None):
        if fresh:  # a job restarted from step 0 replaces its old curves; a resumed one appends to them
            for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
                os.remove(path)
        # tensorboardX names files by the second; the suffix keeps a quick restart from overwriting one
        self.writer = SummaryWriter(logdir, filename_suffix=f".{time.time_ns()}")
        self.mlflow = mlflow

    def log(self, step: int, metrics: dict, prefix: str) -> None:
        scalars = {f"{prefix}/{k}": float(v) for k, v in metrics.items() if prefix != "train" or k in TRAIN_KEYS}
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        if self.mlflow is not None:  # MLflow keys allow letters, digits, _ - . / and spaces only
            self.mlflow.log_metrics({re.sub(r"[^\w\-./ ]", "_", k): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self.writer.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
