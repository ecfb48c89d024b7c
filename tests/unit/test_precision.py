"""Mixed precision and device placement from the config: `model.dtype: bfloat16` runs forward passes in
bf16 (autocast) while weights and optimizer state stay fp32; the soft-target scorer goes to the device its
Ray actor was given. Checked on CPU (torch's CPU autocast supports bf16); CUDA checks sit behind `gpu`.

    .venv/bin/python -m pytest -q tests/unit/test_precision.py
"""

from __future__ import annotations

import math

import pytest
import torch

from dume_ray.config import OptimConfig, load_config
from dume_ray.data.encode import collate
from dume_ray.model import load_model, load_tokenizer
from dume_ray.soft_targets.teacher_scoring import TeacherScorer
from dume_ray.tasks import encode_rows
from dume_ray.tasks.builtin import make_builtin_task
from dume_ray.training import autocast, ce_train_step, make_optimizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    rows = encode_rows({"copy": make_builtin_task("copy", 0, 16, 4, 4)}, tokenizer, "train", 32, {"copy": "copy"})[:8]
    return collate(rows, tokenizer.pad_token_id)


def test_bf16_autocast_runs_the_forward_in_bf16(tiny_model_dir, batch):
    model = load_model(tiny_model_dir)
    with autocast(torch.device("cpu"), "bfloat16"):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.dtype == torch.bfloat16


def test_float32_autocast_is_a_no_op(tiny_model_dir, batch):
    model = load_model(tiny_model_dir)
    with autocast(torch.device("cpu"), "float32"):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.dtype == torch.float32


def test_bf16_train_step_keeps_fp32_weights_and_a_finite_loss_close_to_fp32(tiny_model_dir, batch):
    losses = {}
    for dtype in ("float32", "bfloat16"):
        model = load_model(tiny_model_dir)
        optimizer, scheduler = make_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=1, steps=4))
        losses[dtype] = ce_train_step(model, batch, optimizer, scheduler, 1.0, dtype)["loss"]
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert math.isfinite(losses["bfloat16"]) and abs(losses["bfloat16"] - losses["float32"]) < 0.05 * losses["float32"]


def test_teacher_scorer_on_cpu_when_its_actor_has_no_gpu(tiny_model_dir):
    assert TeacherScorer(tiny_model_dir, top_k=4, device="cpu").device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_teacher_scorer_asked_for_cuda_without_a_gpu_says_so(tiny_model_dir):
    with pytest.raises(RuntimeError, match="gpus_per_actor > 0 but this actor sees no CUDA device"):
        TeacherScorer(tiny_model_dir, top_k=4, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_teacher_scorer_loads_bf16_weights_on_cuda(tiny_model_dir):
    scorer = TeacherScorer(tiny_model_dir, top_k=4, dtype="bfloat16", device="cuda")
    assert next(scorer.model.parameters()).dtype == torch.bfloat16 and scorer.device.type == "cuda"


def test_gpu_keys_are_plumbed_per_stage():
    cfg = load_config(None, ["model.dtype=bfloat16", "experts.resources.num_workers=2", "experts.resources.use_gpu=true",
                             "soft_targets.gpus_per_actor=0.5", "eval.gpus_per_task=0.25"])
    assert cfg.experts.resources.use_gpu and not cfg.distill.resources.use_gpu
    assert (cfg.model.dtype, cfg.soft_targets.gpus_per_actor, cfg.eval.gpus_per_task) == ("bfloat16", 0.5, 0.25)
