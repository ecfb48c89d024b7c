"""Ray Train worker of the `distill` and `multitask` stages: one student loop, two objectives.

The student and the multitask baseline run this same function on the same soft-target stream (Ray Data
shard "train"), from the same init, with the same optimiser, batch size and steps; only `alpha` differs
(the baseline has alpha = 0: plain CE on the gold responses, the teacher columns are ignored). That makes
the comparison the project exists to win a fair one by construction. The step is `training.kd_step`,
the one the search proxy runs too.
"""

from __future__ import annotations

import ray

from dume_ray.config import OptimConfig, from_dict
from dume_ray.data.encode import soft_target_batch  # noqa: F401  (benchmarks/stream_cost.py imports it from here)
from dume_ray.distill.on_policy import on_policy_step, score_by_group
from dume_ray.training import kd_step
from dume_ray.worker_utils import training_run


def train_fn_per_worker(config: dict) -> dict:
    optim = from_dict(OptimConfig, config["optim"])
    step = kd_step(optim.grad_clip, config["top_k"], config["alpha"], optim.steps, config["anneal"],
                   config["temperature"], config["divergence"], config["jsd_beta"], config["dtype"])
    on_policy = config.get("on_policy")
    if on_policy:  # a share of the steps on the student's own answers, scored by the experts' actors
        teachers = on_policy["teachers"]  # {group: Ray actor handle of an ExpertTeacher}

        def score(rows: list[dict], groups: list[str]):
            def score_groups(by_group: dict) -> dict:
                refs = {g: teachers[g].logprobs.remote(group_rows, on_policy["pad_id"]) for g, group_rows in by_group.items()}
                return {g: ray.get(ref) for g, ref in refs.items()}
            return score_by_group(rows, groups, score_groups)

        step = on_policy_step(step, score, on_policy["ratio"], on_policy["divergence"], config["jsd_beta"],
                              on_policy["sample"], on_policy["max_new_tokens"], on_policy["eos_id"], optim.grad_clip,
                              config["dtype"], on_policy.get("schedule", "interleaved"), optim.steps)
    return training_run(config, step)
