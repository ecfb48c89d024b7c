"""Ray Train worker of the `distill` and `multitask` stages: one student loop, two objectives.

The student and the multitask baseline run this same function on the same soft-target stream (Ray Data
shard "train"), from the same init, with the same optimiser, batch size and steps; only `alpha` differs
(the baseline has alpha = 0: plain CE on the gold responses, the teacher columns are ignored). That makes
the comparison the project exists to win a fair one by construction.
"""

from __future__ import annotations

import numpy as np
import torch

from dume_ray.config import OptimConfig, from_dict
from dume_ray.data.encode import batch_rows, collate
from dume_ray.distill.losses import annealed_alpha
from dume_ray.training import distill_train_step
from dume_ray.worker_utils import training_run


def train_fn_per_worker(config: dict) -> dict:
    optim = from_dict(OptimConfig, config["optim"])

    def train_step(model, batch, optimizer, scheduler, step, pad_id, device) -> dict:
        batch = {k: v.to(device) for k, v in soft_target_batch(batch, pad_id, config["top_k"]).items()}
        alpha = annealed_alpha(config["alpha"], step, optim.steps, config["anneal"])
        metrics = distill_train_step(model, batch, optimizer, scheduler, optim.grad_clip, alpha, config["temperature"],
                                     config["divergence"], config["jsd_beta"], config["dtype"])
        return {**metrics, "alpha": alpha}

    return training_run(config, train_step)


def soft_target_batch(batch: dict, pad_id: int, top_k: int) -> dict[str, torch.Tensor]:
    """Ray Data numpy batch of soft-target rows -> padded LM batch + flattened teacher targets.

    Teacher targets are concatenated row by row, which is the order `response_positions` gathers logits in.
    """
    out = collate(batch_rows(batch), pad_id)
    out["topk_ids"] = torch.from_numpy(np.concatenate(batch["topk_ids"]).astype(np.int64)).view(-1, top_k)  # [n, k]
    out["topk_logprobs"] = torch.from_numpy(np.concatenate(batch["topk_logprobs"]).astype(np.float32)).view(-1, top_k)
    out["tail_logmass"] = torch.from_numpy(np.concatenate(batch["tail_logmass"]).astype(np.float32))  # [n]
    return out
