"""Ray Train worker for plain cross-entropy fine-tuning: the `base` and `experts` stages.

`train_fn_per_worker(config)` is what `TorchTrainer` runs on each worker. It gets plain data (a dict from
`experts/launch.py`), reads its Ray Data shard "train" of encoded rows, loops over the pure
`training.ce_train_step`, checkpoints through Ray Train, and on rank 0 saves the final model with
`save_pretrained` and scores it on the validation split. The return value reaches the driver as
`Result.return_value`.
"""

from __future__ import annotations

import time

import ray.train
import ray.train.torch

from dume_ray.config import OptimConfig, from_dict
from dume_ray.data.encode import collate
from dume_ray.model import freeze_non_mlp, load_model, load_tokenizer
from dume_ray.training import ce_train_step, make_optimizer, validation_loss
from dume_ray.worker_utils import (Progress, StepHistory, batch_stream, open_dashboards, per_worker_batch_size, report_checkpoint,
                                   restore_checkpoint, save_and_validate, setup_worker, unwrap)


def train_fn_per_worker(config: dict) -> dict:
    optim = from_dict(OptimConfig, config["optim"])
    device = setup_worker(config["seed"], config["torch_threads"])
    tokenizer = load_tokenizer(config["init_dir"])
    model = load_model(config["init_dir"])
    if config.get("train_mlp_only"):
        freeze_non_mlp(model)
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
        batch = {k: v.to(device) for k, v in collate(_rows(next(batches)), tokenizer.pad_token_id).items()}
        metrics = ce_train_step(model, batch, optimizer, scheduler, optim.grad_clip, config["dtype"])
        step += 1
        history.append(step, metrics)
        progress(step, metrics)
        if dashboards:
            dashboards.log(step, {**metrics, "lr": scheduler.get_last_lr()[0]}, "train")
        if step % optim.checkpoint_every == 0 or step == optim.steps:
            if dashboards:
                dashboards.log(step, validation_loss(unwrap(model), tokenizer, config["validation"]), "val_loss")
            report_checkpoint({**metrics, "step": step}, model, optimizer, scheduler, step,
                              config.get("local_checkpoint_dir"))

    # ---- save the Hugging Face model and score it on validation (rank 0) ---------------------------------
    result = save_and_validate(model, tokenizer, config, step, metrics, start, history)
    if dashboards:
        dashboards.log(step, result["validation"], "validation")
        dashboards.close()
    return result


def _rows(batch: dict) -> list[dict]:
    """Ray Data numpy batch (columns) -> list of rows for `collate`."""
    return [{"input_ids": ids, "response_start": int(rs)} for ids, rs in zip(batch["input_ids"], batch["response_start"])]
