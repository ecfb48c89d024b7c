"""Ray Train worker of the `distill` and `multitask` stages: one student loop, two objectives.

The student and the multitask baseline run this same function on the same soft-target stream (Ray Data
shard "train"), from the same init, with the same optimiser, batch size and steps; only `alpha` differs
(the baseline has alpha = 0: plain CE on the gold responses, the teacher columns are ignored). That makes
the comparison the project exists to win a fair one by construction. The step is `training.kd_step`,
the one the search proxy runs too.
"""

from __future__ import annotations

from dume_ray.config import OptimConfig, from_dict
from dume_ray.data.encode import soft_target_batch  # noqa: F401  (benchmarks/stream_cost.py imports it from here)
from dume_ray.training import kd_step
from dume_ray.worker_utils import training_run


def train_fn_per_worker(config: dict) -> dict:
    optim = from_dict(OptimConfig, config["optim"])
    step = kd_step(optim.grad_clip, config["top_k"], config["alpha"], optim.steps, config["anneal"],
                   config["temperature"], config["divergence"], config["jsd_beta"], config["dtype"])
    return training_run(config, step)
