"""Ray Train worker of the `distill` and `multitask` stages: one student loop, two objectives.

The student and the multitask baseline run this same function on the same soft-target stream (Ray Data
shard "train"), from the same init, with the same optimiser, batch size and steps; only `alpha` differs
(the baseline has alpha = 0: plain CE on the gold responses, the teacher columns are ignored). That makes
the comparison the project exists to win a fair one by construction.
"""

from __future__ import annotations

import time

import numpy as np
import ray.train
import ray.train.torch
import torch

from dume_ray.config import OptimConfig, from_dict
from dume_ray.data.encode import collate
from dume_ray.distill.losses import annealed_alpha
from dume_ray.model import load_model, load_tokenizer
from dume_ray.training import distill_train_step, make_optimizer, validation_loss
from dume_ray.worker_utils import (Progress, StepHistory, batch_stream, open_dashboards, per_worker_batch_size, report_checkpoint,
                                   restore_checkpoint, save_and_validate, setup_worker, unwrap)


def train_fn_per_worker(config: dict) -> dict:
    optim = from_dict(OptimConfig, config["optim"])
    device = setup_worker(config["seed"], config["torch_threads"])
    tokenizer = load_tokenizer(config["init_dir"])
    model = load_model(config["init_dir"])
    model = ray.train.torch.prepare_model(model) if config["num_workers"] > 0 else model.to(device)
    optimizer, scheduler = make_optimizer(model, optim)
    step = restore_checkpoint(model, optimizer, scheduler, config.get("local_checkpoint_dir"))
    history = StepHistory(config["history_path"], step)
    progress = Progress(config["label"], optim.steps, every=max(1, optim.steps // 10))
    batches = batch_stream("train", per_worker_batch_size(optim.batch_size), seed=config["seed"] + step)
    dashboards = open_dashboards(config, step)  # rank 0: TensorBoard (+ MLflow when configured)
    start, metrics = time.time(), {}

    # ---- training loop: pure steps, Ray only for reporting and checkpoints --------------------------------
    while step < optim.steps:
        batch = {k: v.to(device) for k, v in soft_target_batch(next(batches), tokenizer.pad_token_id, config["top_k"]).items()}
        alpha = annealed_alpha(config["alpha"], step, optim.steps, config["anneal"])
        metrics = distill_train_step(model, batch, optimizer, scheduler, optim.grad_clip, alpha, config["temperature"],
                                     config["divergence"], config["jsd_beta"], config["dtype"])
        step += 1
        history.append(step, metrics)
        progress(step, metrics)
        if dashboards:
            dashboards.log(step, {**metrics, "alpha": alpha, "lr": scheduler.get_last_lr()[0]}, "train")
        if step % optim.checkpoint_every == 0 or step == optim.steps:
            if dashboards:
                dashboards.log(step, validation_loss(unwrap(model), tokenizer, config["validation"]), "val_loss")
            report_checkpoint({**metrics, "alpha": alpha, "step": step}, model, optimizer, scheduler, step,
                              config.get("local_checkpoint_dir"))

    # ---- save the Hugging Face model and score it on validation (rank 0) ---------------------------------
    result = save_and_validate(model, tokenizer, config, step, metrics, start, history)
    if dashboards:
        dashboards.log(step, result["validation"], "validation")
        dashboards.close()
    return result


def soft_target_batch(batch: dict, pad_id: int, top_k: int) -> dict[str, torch.Tensor]:
    """Ray Data numpy batch of soft-target rows -> padded LM batch + flattened teacher targets.

    Teacher targets are concatenated row by row, which is the order `response_positions` gathers logits in.
    """
    rows = [{"input_ids": ids, "response_start": int(rs)} for ids, rs in zip(batch["input_ids"], batch["response_start"])]
    out = collate(rows, pad_id)
    out["topk_ids"] = torch.from_numpy(np.concatenate(batch["topk_ids"]).astype(np.int64)).view(-1, top_k)  # [n, k]
    out["topk_logprobs"] = torch.from_numpy(np.concatenate(batch["topk_logprobs"]).astype(np.float32)).view(-1, top_k)
    out["tail_logmass"] = torch.from_numpy(np.concatenate(batch["tail_logmass"]).astype(np.float32))  # [n]
    return out
