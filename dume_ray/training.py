"""The one training loop, its steps, and the evaluation used by every stage that trains or scores a model.

Nothing here knows about Ray or ranks. `train_loop` runs pure steps and hands each step's metrics and every
checkpoint boundary to callbacks: the Ray Train workers (`worker_utils.training_run`, for base, experts,
student and multitask) report and checkpoint there, the search proxy (`search/proxy.py`) reports to Tune,
and `benchmarks/end_to_end.py` saves plain checkpoints. The steps come from `ce_step` (cross-entropy on the
response tokens) and `kd_step` (top-k distillation + CE), both over columnar batches (a Ray Data numpy batch
or `data.encode.shuffled_batches`' dict of lists).

    optimizer, scheduler = make_optimizer(model, optim)
    step, metrics = train_loop(model, optimizer, scheduler, batches, ce_step(optim.grad_clip, "float32"),
                               pad_id, start_step=0, total_steps=optim.steps, on_step=print)
    predictions = greedy_generate(model, tokenizer, prompts, max_new_tokens=12)

Tested in tests/unit/test_model_and_training.py.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import time
from typing import Callable, Iterator, Optional

import torch

from dume_ray.config import OptimConfig
from dume_ray.data.encode import (batch_rows, collate, encode_example, encode_prompt, response_positions,
                                  soft_target_batch)
from dume_ray.losses import annealed_alpha, cross_entropy, distill_objective

# train_step(model, columnar_batch, optimizer, scheduler, step, pad_id, device) -> metrics (floats, "loss" among them);
# `step` is the number of steps taken before this one.
TrainStep = Callable[..., dict]


def make_optimizer(model: torch.nn.Module, optim: OptimConfig):
    """AdamW with linear warm-up then cosine decay to 10% of the peak rate."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = (step - optim.warmup_steps) / max(1, optim.steps - optim.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def autocast(device: torch.device, dtype: str):
    """Mixed precision when `model.dtype: bfloat16`: forward passes in bf16, weights and optimizer in fp32.

    Works on CUDA (the point: ~2x throughput and half the activation memory) and on CPU (slower than fp32
    for tiny models, which is why the CPU configs keep float32). float32 is a no-op.
    """
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def response_logits(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict response tokens, and those tokens.

    Returns:
        logits [n, V] (n = response tokens in the batch, row-major) and target_ids [n].
    """
    b_idx, t_idx = response_positions(batch["labels"])
    # Only the positions from the first response-predicting one on go through the LM head: with a real
    # vocabulary (49k-150k) the head over every prompt position costs ~20% of the step and most of the memory.
    first = int(t_idx.min()) if t_idx.numel() else 0
    keep = {"logits_to_keep": batch["input_ids"].shape[1] - first} if _takes_logits_to_keep(model) else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **keep).logits  # [b, s', v]
    offset = first if keep else 0
    return logits[b_idx, t_idx - offset].float(), batch["labels"][b_idx, t_idx + 1]


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the Hugging Face model inside the DDP / peft wrappers (which pass keywords through) accepts
    `logits_to_keep`, as Llama, Qwen2 and most current causal LMs do."""
    while hasattr(model, "module") or hasattr(model, "get_base_model"):
        model = model.module if hasattr(model, "module") else model.get_base_model()
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def optimizer_step(model, loss, optimizer, scheduler, grad_clip: float) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    scheduler.step()
    return float(grad_norm)


def ce_train_step(model, batch: dict, optimizer, scheduler, grad_clip: float, dtype: str = "float32") -> dict:
    """One step of plain cross-entropy on response tokens (base, experts, multitask baseline)."""
    model.train()
    with autocast(batch["input_ids"].device, dtype):
        logits, targets = response_logits(model, batch)
    loss = cross_entropy(logits, targets)
    grad_norm = optimizer_step(model, loss, optimizer, scheduler, grad_clip)
    return {"loss": loss.item(), "ce_loss": loss.item(), "grad_norm": grad_norm, "tokens": int(targets.numel())}


def distill_train_step(model, batch: dict, optimizer, scheduler, grad_clip: float, alpha: float,
                       temperature: float, divergence: str, jsd_beta: float, dtype: str = "float32") -> dict:
    """One student step: alpha * T^2 * KD(teacher_T || student_T) on the top-k support + (1 - alpha) * CE.

    `batch` carries the teacher's top-k soft targets for every response token (`topk_ids` [n, k],
    `topk_logprobs` [n, k], `tail_logmass` [n]) in the same row-major order as `response_logits`.
    """
    model.train()
    with autocast(batch["input_ids"].device, dtype):
        logits, targets = response_logits(model, batch)
    if alpha > 0 and batch["topk_ids"].shape[0] != targets.shape[0]:
        raise ValueError(f"soft targets cover {batch['topk_ids'].shape[0]} tokens but the batch has {targets.shape[0]} response tokens")
    out = distill_objective(logits, targets, batch["topk_ids"], batch["topk_logprobs"], batch["tail_logmass"],
                            alpha=alpha, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta)
    grad_norm = optimizer_step(model, out["loss"], optimizer, scheduler, grad_clip)
    return {"loss": out["loss"].item(), "kd_loss": float(out["kd_loss"]), "ce_loss": float(out["ce_loss"]),
            "grad_norm": grad_norm, "tokens": int(targets.numel())}


def ce_step(grad_clip: float, dtype: str = "float32") -> TrainStep:
    """The step of base, experts and the proxy's experts: collate the batch, `ce_train_step`."""
    def train_step(model, batch, optimizer, scheduler, step, pad_id, device) -> dict:
        tensors = {k: v.to(device) for k, v in collate(batch_rows(batch), pad_id).items()}
        return ce_train_step(model, tensors, optimizer, scheduler, grad_clip, dtype)
    return train_step


def kd_step(grad_clip: float, top_k: int, alpha: float, total_steps: int, anneal: bool, temperature: float,
            divergence: str, jsd_beta: float, dtype: str = "float32") -> TrainStep:
    """The step of student, multitask (alpha = 0) and the search proxy: `soft_target_batch`, then
    `distill_train_step` with the KD weight annealed over `total_steps` (BAM!) when `anneal`."""
    def train_step(model, batch, optimizer, scheduler, step, pad_id, device) -> dict:
        tensors = {k: v.to(device) for k, v in soft_target_batch(batch, pad_id, top_k).items()}
        step_alpha = annealed_alpha(alpha, step, total_steps, anneal)
        metrics = distill_train_step(model, tensors, optimizer, scheduler, grad_clip, step_alpha, temperature,
                                     divergence, jsd_beta, dtype)
        return {**metrics, "alpha": step_alpha}
    return train_step


def train_loop(model, optimizer, scheduler, batches: Iterator[dict], train_step: TrainStep, pad_id: int,
               start_step: int, total_steps: int, checkpoint_every: int = 0, device: Optional[torch.device] = None,
               on_step: Optional[Callable[[int, dict], None]] = None,
               on_checkpoint: Optional[Callable[[int, dict], None]] = None) -> tuple[int, dict]:
    """Steps `start_step + 1 .. total_steps`, one batch from `batches` each; returns (last step, its metrics).

    After every step `on_step(step, metrics)`; after every `checkpoint_every`-th step and the last one
    `on_checkpoint(step, metrics)` (where callers save, report or validate). `device` defaults to the
    model's. A run already at `total_steps` takes no step and returns `(start_step, {})`.
    """
    device = device if device is not None else next(model.parameters()).device
    step, metrics = start_step, {}
    while step < total_steps:
        metrics = train_step(model, next(batches), optimizer, scheduler, step, pad_id, device)
        step += 1
        if on_step:
            on_step(step, metrics)
        if on_checkpoint and (step == total_steps or (checkpoint_every and step % checkpoint_every == 0)):
            on_checkpoint(step, metrics)
    return step, metrics


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id prompts as a left-padded batch (every prompt ends where generation starts): input_ids and
    attention_mask, [b, longest prompt]."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 256) -> list[str]:
    """Greedy decoding of each prompt's response (stops at eos); left-padded batches."""
    model.eval()
    device = next(model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        input_ids, attention_mask = left_padded([encode_prompt(tokenizer, p) for p in prompts[start:start + batch_size]],
                                                tokenizer.pad_token_id)
        width = input_ids.shape[1]
        generated = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        outputs += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return outputs


@torch.no_grad()
def validation_loss(model, tokenizer, pairs: dict[str, list[tuple[str, str]]], batch_size: int = 256) -> dict[str, float]:
    """Mean cross-entropy per response token on each task's (prompt, response) pairs: {task name: loss}."""
    model.eval()
    device = next(model.parameters()).device
    losses = {}
    for name, task_pairs in pairs.items():
        total, tokens = 0.0, 0
        for start in range(0, len(task_pairs), batch_size):
            rows = [encode_example(tokenizer, p, r, max_seq_len=1 << 30) for p, r in task_pairs[start:start + batch_size]]
            batch = {k: v.to(device) for k, v in collate(rows, tokenizer.pad_token_id).items()}
            logits, targets = response_logits(model, batch)
            total += float(cross_entropy(logits, targets)) * targets.numel()
            tokens += targets.numel()
        losses[name] = total / max(1, tokens)
    return losses


def evaluate_tasks(model, tokenizer, tasks: dict, split: str, max_new_tokens: int, batch_size: int = 256,
                   label: str = "") -> dict[str, float]:
    """Exact-match (the task's metric) of greedy answers on `split` of each task: {task name: score}.
    With `label`, one progress line per task: `[eval base] reverse_words 0.420 (50 examples, 3.1 s)`."""
    scores = {}
    for name, task in tasks.items():
        start = time.time()
        examples = task.examples(split)
        predictions = greedy_generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens, batch_size)
        scores[name] = task.score(predictions, split)
        if label:
            print(f"[eval {label}] {name} exact match {scores[name]:.3f} ({len(examples)} examples, "
                  f"{time.time() - start:.1f} s)", flush=True)
    return scores


def score_tasks(model, tokenizer, tasks: dict, split: str, max_new_tokens: int, batch_size: int = 256,
                label: str = "", with_loss: bool = True) -> dict[str, dict[str, float]]:
    """The report's two metrics on `split`: {"exact_match": {task: rate}, "loss": {task: mean CE per response
    token}}. `with_loss=False` for a model whose full-sequence forward is not causal (loss left out)."""
    pairs = {name: [(e.prompt, e.response) for e in task.examples(split)] for name, task in tasks.items()}
    losses = validation_loss(model, tokenizer, pairs, batch_size) if with_loss else {}
    return {"exact_match": evaluate_tasks(model, tokenizer, tasks, split, max_new_tokens, batch_size, label),
            "loss": losses}


# ---------------------------------------------------------------------------------------------------------
# Training state on disk: what a Ray Train checkpoint holds. Written to a temp folder and renamed.
# ---------------------------------------------------------------------------------------------------------

def save_training_state(directory: str, model, optimizer, scheduler, step: int, extra: Optional[dict] = None) -> str:
    """Write model/optimizer/scheduler state + step to `directory/state.pt` atomically (temp file, then
    rename): a crash mid-save leaves the previous checkpoint intact, never a truncated one."""
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".state.pt.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step, "extra": extra or {}}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, "state.pt"))
    return directory


def load_training_state(directory: str, model, optimizer, scheduler) -> tuple[int, dict]:
    """Restore what `save_training_state` wrote; returns (step, extra)."""
    state = torch.load(os.path.join(directory, "state.pt"), map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], state["extra"]


