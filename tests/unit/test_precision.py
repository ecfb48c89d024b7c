"""Mixed precision and device placement from the config: `model.dtype: bfloat16` runs forward passes in
bf16 (autocast: the layers compute in bf16, logits within 5% of fp32's range of the fp32 ones) while weights,
gradients and optimizer state stay fp32 (one step's loss within 1% and update direction within cos 0.95 of
fp32's); `model.dtype` reaches every training stage's worker config; the soft-target scorer goes to the
device its Ray actor was given (bf16 weights only on CUDA); each stage asks Ray for the GPUs its section
says. Checked on CPU (torch's CPU autocast supports bf16); CUDA checks sit behind `gpu`.

    .venv/bin/python -m pytest -q tests/unit/test_precision.py
"""

from __future__ import annotations

import math

import pytest
import torch

from dume_ray.config import OptimConfig, load_config
from dume_ray.data.encode import collate
from dume_ray.distill.launch import _loop_config
from dume_ray.model import load_model, load_tokenizer
from dume_ray.resources import stage_jobs
from dume_ray.soft_targets.teacher_scoring import TeacherScorer
from dume_ray.tasks import encode_rows
from dume_ray.tasks.builtin import make_builtin_task
from dume_ray.training import autocast, ce_train_step, make_optimizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def rows(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    return encode_rows({"copy": make_builtin_task("copy", 0, 16, 4, 4)}, tokenizer, "train", 32, {"copy": "copy"})[:8]


@pytest.fixture(scope="module")
def batch(tiny_model_dir, rows):
    return collate(rows, load_tokenizer(tiny_model_dir).pad_token_id)


@torch.no_grad()
def _forward(model, batch, dtype: str) -> tuple[torch.Tensor, set]:
    """Logits, and the dtypes the decoder's linear layers computed in."""
    seen = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype)) for m in model.modules()
             if isinstance(m, torch.nn.Linear)]
    try:
        with autocast(torch.device("cpu"), dtype):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, seen
    finally:
        for hook in hooks:
            hook.remove()


def test_bf16_autocast_runs_the_forward_in_bf16_within_tolerance_of_fp32(tiny_model_dir, batch):
    model = load_model(tiny_model_dir)
    reference, _ = _forward(model, batch, "float32")
    logits, layer_dtypes = _forward(model, batch, "bfloat16")
    assert logits.dtype == torch.bfloat16 and layer_dtypes == {torch.bfloat16}  # every projection in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast casts on the fly, weights stay
    error = (logits.float() - reference).abs().max()
    assert 0 < error <= 0.05 * reference.abs().max(), error  # bf16 rounding: not identical, but close


def test_float32_autocast_is_a_no_op(tiny_model_dir, batch):
    model = load_model(tiny_model_dir)
    logits, layer_dtypes = _forward(model, batch, "float32")
    assert logits.dtype == torch.float32 and layer_dtypes == {torch.float32}
    assert torch.equal(logits, model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)


def test_bf16_train_step_keeps_fp32_weights_and_optimizer_state_and_stays_close_to_fp32(tiny_model_dir, batch):
    initial = {n: p.detach().clone() for n, p in load_model(tiny_model_dir).named_parameters()}
    losses, updates = {}, {}
    for dtype in ("float32", "bfloat16"):
        model = load_model(tiny_model_dir)
        optimizer, scheduler = make_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=1, steps=4))
        losses[dtype] = ce_train_step(model, batch, optimizer, scheduler, 1.0, dtype)["loss"]
        assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
                   for p in model.parameters())
        state = [v for per_param in optimizer.state.values() for v in per_param.values() if torch.is_tensor(v)]
        assert state and {v.dtype for v in state} == {torch.float32}  # Adam moments (and step) in fp32
        updates[dtype] = torch.cat([(p.detach() - initial[n]).flatten() for n, p in model.named_parameters()])
    assert math.isfinite(losses["bfloat16"]) and abs(losses["bfloat16"] - losses["float32"]) < 0.01 * losses["float32"]
    assert torch.nn.functional.cosine_similarity(updates["float32"], updates["bfloat16"], dim=0) > 0.95


def test_teacher_scorer_on_cpu_when_its_actor_has_no_gpu(tiny_model_dir):
    scorer = TeacherScorer(tiny_model_dir, top_k=4, dtype="bfloat16", device="cpu")
    # bf16 teacher weights are a GPU economy; on CPU the teacher scores in fp32
    assert scorer.device.type == "cpu" and next(scorer.model.parameters()).dtype == torch.float32


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
                             "soft_targets.gpus_per_actor=0.5", "soft_targets.num_actors=3", "eval.gpus_per_task=0.25",
                             "distill.resources.num_workers=1"])
    # What each stage asks Ray for: whole GPUs per Train worker where use_gpu, fractions for actors and eval tasks.
    assert stage_jobs(cfg, ["base", "experts", "distill", "soft-targets", "eval"]) == {
        "base": [{"CPU": 1.0}],
        "experts": [{"CPU": 1.0, "GPU": 1.0}] * 2,
        "distill": [{"CPU": 1.0}],
        "soft-targets": [{"CPU": 1.0, "GPU": 0.5}] * 3,
        "eval": [{"CPU": 1.0, "GPU": 0.25}],
    }


def test_model_dtype_reaches_the_training_workers(monkeypatch, rows, tmp_path):
    import ray.data

    from dume_ray.experts import launch as experts_launch

    cfg = load_config(None, ["model.dtype=bfloat16"])
    for stage in ("student", "multitask"):
        assert _loop_config(cfg, stage, "h", "init", {}, 100, "interleaved")["dtype"] == "bfloat16"
    sent = {}  # base and experts: what run_training_jobs hands to each Ray Train job (no Ray started)
    monkeypatch.setattr(ray.data, "from_items", lambda rows, **kwargs: rows)
    monkeypatch.setattr(experts_launch, "fit_concurrently", lambda fn, pending, *a, **k: sent.update(pending) or {})
    job = experts_launch.TrainingJob("copy", "init", f"{tmp_path}/copy/model", rows, {}, "h")
    experts_launch.run_training_jobs(cfg, [job], cfg.experts.optim, cfg.experts.resources, str(tmp_path))
    assert sent["copy"][0]["dtype"] == "bfloat16"
