"""On-policy distillation (GKD, Agarwal et al. 2024): the student answers training prompts itself, the prompt's
expert scores the student's own tokens, and the student is trained on a divergence between the two there.

Off-policy distillation (the stored soft targets) trains the student on the gold responses only, so it never
sees its own mistakes; on-policy steps train it where it will actually be at inference. The two are mixed by a
ratio lambda of steps (`distill.on_policy_ratio`), placed by `distill.on_policy_schedule`: "interleaved" (step s
is on-policy when floor((s+1)·λ) > floor(s·λ), spread evenly from step 0) or "end" (the last floor(N·λ) of the N
steps: off-policy first, then on-policy from a student that already answers, as GKD and MOPD start after SFT).
Either way exactly a λ share of the steps is, deterministically (a resumed run makes the same choice at the same step).

    rows = student_rollouts(student, prompt_rows, pad_id, eos_id, max_new_tokens, sample=True, seed=step)
    batch = collate(rows, pad_id)                     # prompt + the student's own response, labels on the response
    teacher = teacher_logprobs(expert, batch)         # [n, V], the expert's full distribution at those tokens
    loss = on_policy_loss(student_logits, teacher, "reverse_kl")

The loss is over the full vocabulary (the expert scores live, nothing is stored), at temperature 1, with the
divergences of `losses.py` (reverse KL, mode-seeking, GKD's default for on-policy data; or generalized JSD with
β). `on_policy_step` wraps the off-policy step (`training.kd_step`) into the mixed one; `ExpertTeacher` is an
expert ready to score rows (a Ray actor per group in `distill/launch.py`, called from `distill/worker.py`).
Pure torch, no Ray here.
Tested in tests/unit/test_on_policy.py.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import Tensor

from dume_ray.config import ON_POLICY_SCHEDULES
from dume_ray.data.encode import batch_rows, collate
from dume_ray.losses import generalized_jsd, reverse_kl
from dume_ray.model import load_model
from dume_ray.training import TrainStep, autocast, left_padded, optimizer_step, response_logits

ON_POLICY_DIVERGENCES = ("reverse_kl", "generalized_jsd")


def is_on_policy_step(step: int, ratio: float, schedule: str = "interleaved", total_steps: int = 0) -> bool:
    """Step `step` (0-based) of `total_steps` is on-policy. "interleaved": exactly floor(n·λ) of the first n steps
    are, spread evenly; "end": the last floor(total_steps·λ) steps are (total_steps is only read there)."""
    if schedule == "end":
        if total_steps <= 0:
            raise ValueError(f"on-policy schedule 'end' needs the job's total steps, got total_steps={total_steps}")
        return step >= total_steps - math.floor(total_steps * ratio + 1e-9)
    if schedule != "interleaved":
        raise ValueError(f"on-policy schedule must be one of {ON_POLICY_SCHEDULES}, got {schedule!r}")
    return math.floor((step + 1) * ratio + 1e-9) > math.floor(step * ratio + 1e-9)


@torch.no_grad()
def student_rollouts(model, rows: list[dict], pad_id: int, eos_id: int, max_new_tokens: int, sample: bool = True,
                     seed: int = 0) -> list[dict]:
    """The student's own responses to the rows' prompts (`input_ids[:response_start]`), as encoded rows.

    Each response ends at the student's first eos (kept, as gold responses keep theirs) or after
    `max_new_tokens`; an answer that is eos at once is one token long, never empty. Sampling uses a
    generator seeded with `seed` (the step), so a resumed run draws the same responses.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompts = [list(map(int, row["input_ids"][: int(row["response_start"])])) for row in rows]
    input_ids, attention_mask = left_padded(prompts, pad_id)
    width = input_ids.shape[1]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=sample, top_k=0, top_p=1.0,
                                   temperature=1.0, pad_token_id=pad_id, eos_token_id=eos_id)
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    out = []
    for prompt, new in zip(prompts, generated[:, width:].tolist()):
        response = new[: new.index(eos_id) + 1] if eos_id in new else new
        out.append({"input_ids": prompt + (response or [eos_id]), "response_start": len(prompt)})
    return out


@torch.no_grad()
def teacher_logprobs(teacher, batch: dict) -> Tensor:
    """The teacher's log-probabilities over the whole vocabulary at the batch's response tokens, [n, V]."""
    teacher.eval()
    logits, _ = response_logits(teacher, batch)
    return torch.log_softmax(logits.float(), dim=-1)


def on_policy_loss(student_logits: Tensor, teacher_logp: Tensor, divergence: str = "reverse_kl",
                   jsd_beta: float = 0.5) -> Tensor:
    """Mean over tokens of D(teacher ‖ student) on the student's own tokens, full vocabulary, T = 1.

    student_logits [n, V] (with grad), teacher_logp [n, V] (no grad). "reverse_kl" is KL(student ‖ teacher);
    "generalized_jsd" is GKD's JSD(β). Zero when the student equals the teacher.
    """
    if divergence not in ON_POLICY_DIVERGENCES:
        raise ValueError(f"on-policy divergence must be one of {ON_POLICY_DIVERGENCES}, got {divergence!r}")
    if student_logits.shape != teacher_logp.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher log-probs "
                         f"{tuple(teacher_logp.shape)} must cover the same tokens and vocabulary")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    student_logp = torch.log_softmax(student_logits.float(), dim=-1)
    if divergence == "reverse_kl":
        per_token = reverse_kl(teacher_logp, student_logp)
    else:
        per_token = generalized_jsd(teacher_logp, student_logp, jsd_beta)
    return per_token.mean()


class ExpertTeacher:
    """One expert, loaded once, scoring the student's rollouts: full-vocabulary log-probs at their response
    tokens. `distill/launch.py` serves one per group as a Ray actor for the student's on-policy steps."""

    def __init__(self, model_dir: str, dtype: str = "float32", device: str = "cpu", threads: int = 1):
        torch.set_num_threads(threads)
        self.device, self.dtype = torch.device(device), dtype
        self.model = load_model(model_dir).to(self.device).eval()
        self.tokens, self.seconds = 0, 0.0

    def logprobs(self, rows: list[dict], pad_id: int) -> Tensor:
        """[n, V] float32 on the CPU, n = the rows' response tokens, row-major (as `response_logits`)."""
        start = time.time()
        batch = {k: v.to(self.device) for k, v in collate(rows, pad_id).items()}
        with autocast(self.device, self.dtype):
            out = teacher_logprobs(self.model, batch).float().cpu()
        self.tokens += int(batch["attention_mask"].sum())
        self.seconds += time.time() - start
        return out

    def throughput(self) -> dict:
        """Tokens scored (prompt and response, the forward's work) and seconds spent, since loading."""
        return {"tokens": self.tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else None}


TeacherFn = Callable[[list[dict], list[str]], Tensor]  # (rows, each row's group) -> [n, V] log-probs, row-major


def on_policy_step(off_policy: TrainStep, score: TeacherFn, ratio: float, divergence: str, jsd_beta: float,
                   sample: bool, max_new_tokens: int, eos_id: int, grad_clip: float, dtype: str,
                   schedule: str = "interleaved", total_steps: int = 0) -> TrainStep:
    """The student's step with a `ratio` share of on-policy steps, placed by `schedule` (`is_on_policy_step`,
    `total_steps` the run's steps): on those, the student answers the batch's
    prompts, `score(rows, groups)` returns each row's own expert's log-probs at the answer's tokens ([n, V],
    row-major), and the step descends `on_policy_loss`; the other steps are `off_policy` unchanged."""
    def train_step(model, batch, optimizer, scheduler, step, pad_id, device) -> dict:
        if not is_on_policy_step(step, ratio, schedule, total_steps):
            return {**off_policy(model, batch, optimizer, scheduler, step, pad_id, device), "on_policy": 0.0}
        generator = getattr(model, "module", model)  # generate on the model inside a DDP wrapper
        rows = student_rollouts(generator, batch_rows(batch), pad_id, eos_id, max_new_tokens, sample, seed=step)
        teacher = score(rows, [str(g) for g in batch["group"]]).to(device)
        tensors = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
        model.train()
        with autocast(device, dtype):
            logits, targets = response_logits(model, tensors)
        loss = on_policy_loss(logits, teacher, divergence, jsd_beta)
        grad_norm = optimizer_step(model, loss, optimizer, scheduler, grad_clip)
        return {"loss": loss.item(), "on_policy_loss": loss.item(), "grad_norm": grad_norm,
                "tokens": int(targets.numel()), "on_policy": 1.0}
    return train_step


def score_by_group(rows: list[dict], groups: list[str],
                   score_groups: Callable[[dict[str, list[dict]]], dict[str, Tensor]]) -> Tensor:
    """Each row scored by its own group's teacher, put back in the rows' order: [n, V], n = response tokens,
    row-major. `score_groups({group: its rows})` gets every group at once (the worker sends them to the groups'
    actors together, so the experts score in parallel) and returns {group: [n_g, V]}."""
    index = {group: [i for i, g in enumerate(groups) if g == group] for group in dict.fromkeys(groups)}
    scored = score_groups({group: [rows[i] for i in where] for group, where in index.items()})
    per_row: list[Tensor] = [torch.empty(0)] * len(rows)
    for group, where in index.items():
        counts = [len(rows[i]["input_ids"]) - int(rows[i]["response_start"]) for i in where]
        if scored[group].shape[0] != sum(counts):
            raise ValueError(f"teacher {group!r} scored {scored[group].shape[0]} tokens for {sum(counts)} response tokens")
        for i, part in zip(where, torch.split(scored[group], counts)):
            per_row[i] = part
    return torch.cat(per_row)
