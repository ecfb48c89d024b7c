"""The one training loop and its batch builders (`training.train_loop`, `ce_step`, `kd_step`,
`data.encode.shuffled_batches`, `soft_target_batch`): the workers, the search proxy and the benchmarks all
run these, so their contract is pinned here, without Ray.

Run: .venv/bin/python -m pytest tests/unit/test_train_loop.py -q
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from dume_ray.config import OptimConfig  # noqa: E402
from dume_ray.data.encode import collate, shuffled_batches, soft_target_batch, to_columns  # noqa: E402
from dume_ray.losses import annealed_alpha  # noqa: E402
from dume_ray.model import load_model, load_tokenizer  # noqa: E402
from dume_ray.soft_targets.teacher_scoring import score_rows  # noqa: E402
from dume_ray.tasks import encode_rows  # noqa: E402
from dume_ray.tasks.builtin import make_builtin_task  # noqa: E402
from dume_ray.training import (ce_step, ce_train_step, distill_train_step, kd_step, make_optimizer,  # noqa: E402
                               train_loop)

MAX_SEQ_LEN = 32
OPTIM = OptimConfig(lr=1e-2, warmup_steps=1, steps=5, batch_size=4, checkpoint_every=2)
TOP_K = 4

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return tiny_model_dir  # tests/conftest.py: the tiny embedded Llama (32 wide, 2 layers)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def rows(tokenizer) -> list[dict]:
    task = make_builtin_task("copy", 0, 16, 4, 4)
    return encode_rows({"copy": task}, tokenizer, "train", MAX_SEQ_LEN, {"copy": "copy"})


@pytest.fixture(scope="module")
def soft_rows(model_dir, rows) -> list[dict]:
    return score_rows(model_dir, rows, TOP_K, batch_size=5).to_pylist()


def _counting_step(model, batch, optimizer, scheduler, step, pad_id, device) -> dict:
    return {"loss": float(step), "rows": len(batch["input_ids"])}


def test_train_loop_calls_on_step_every_step_and_on_checkpoint_every_k_and_last(model_dir, rows, tokenizer):
    model = load_model(model_dir)
    steps, checkpoints = [], []
    last, metrics = train_loop(model, None, None, shuffled_batches(rows, 4, seed=0), _counting_step,
                               tokenizer.pad_token_id, start_step=0, total_steps=5, checkpoint_every=2,
                               on_step=lambda s, m: steps.append((s, m["loss"])),
                               on_checkpoint=lambda s, m: checkpoints.append(s))
    assert steps == [(1, 0.0), (2, 1.0), (3, 2.0), (4, 3.0), (5, 4.0)]  # the step sees steps taken before it
    assert checkpoints == [2, 4, 5]
    assert (last, metrics) == (5, {"loss": 4.0, "rows": 4})


def test_train_loop_resumes_from_start_step_and_does_nothing_when_done(model_dir, rows, tokenizer):
    model = load_model(model_dir)
    seen = []
    train_loop(model, None, None, shuffled_batches(rows, 4, 0), _counting_step, tokenizer.pad_token_id,
               start_step=3, total_steps=5, on_step=lambda s, m: seen.append(s))
    assert seen == [4, 5]
    assert train_loop(model, None, None, iter(()), _counting_step, tokenizer.pad_token_id,
                      start_step=5, total_steps=5) == (5, {})


def test_shuffled_batches_are_columnar_deterministic_and_cover_each_epoch(rows):
    first = [b["example_id"] for _, b in zip(range(8), shuffled_batches(rows, 4, seed=7))]
    again = [b["example_id"] for _, b in zip(range(8), shuffled_batches(rows, 4, seed=7))]
    assert first == again
    assert first != [b["example_id"] for _, b in zip(range(8), shuffled_batches(rows, 4, seed=8))]
    assert sorted(sum(first[:4], [])) == sorted(r["example_id"] for r in rows)  # 16 rows: one epoch in 4 batches
    small = next(shuffled_batches(rows[:3], 4, seed=0))
    assert sorted(small["example_id"]) == sorted(r["example_id"] for r in rows[:3])


def test_soft_target_batch_is_the_same_from_lists_and_from_ray_data_numpy_batches(soft_rows, tokenizer):
    lists = to_columns(soft_rows[:4])
    numpy = {}
    for key, values in lists.items():
        if isinstance(values[0], list):
            column = np.empty(len(values), dtype=object)
            column[:] = [np.asarray(v) for v in values]
        else:
            column = np.asarray(values, dtype=object if isinstance(values[0], str) else None)
        numpy[key] = column
    a, b = (soft_target_batch(cols, tokenizer.pad_token_id, TOP_K) for cols in (lists, numpy))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_ce_step_in_the_loop_equals_ce_train_step_on_the_same_batches(model_dir, rows, tokenizer):
    looped, by_hand = load_model(model_dir), load_model(model_dir)
    opt_a, sch_a = make_optimizer(looped, OPTIM)
    train_loop(looped, opt_a, sch_a, shuffled_batches(rows, 4, 1), ce_step(1.0), tokenizer.pad_token_id,
               start_step=0, total_steps=3)
    opt_b, sch_b = make_optimizer(by_hand, OPTIM)
    for _, batch in zip(range(3), shuffled_batches(rows, 4, 1)):
        rows_of_batch = [{"input_ids": i, "response_start": s} for i, s in zip(batch["input_ids"], batch["response_start"])]
        ce_train_step(by_hand, collate(rows_of_batch, tokenizer.pad_token_id), opt_b, sch_b, 1.0)
    assert all(torch.equal(x, y) for x, y in zip(_params(looped), _params(by_hand)))


def test_kd_step_anneals_alpha_by_the_steps_taken_and_matches_distill_train_step(model_dir, soft_rows, tokenizer):
    looped, by_hand = load_model(model_dir), load_model(model_dir)
    opt_a, sch_a = make_optimizer(looped, OPTIM)
    alphas = []
    step = kd_step(1.0, TOP_K, 0.8, total_steps=3, anneal=True, temperature=2.0, divergence="forward_kl", jsd_beta=0.5)
    train_loop(looped, opt_a, sch_a, shuffled_batches(soft_rows, 4, 2), step, tokenizer.pad_token_id,
               start_step=0, total_steps=3, on_step=lambda s, m: alphas.append(m["alpha"]))
    assert alphas == pytest.approx([0.8, 0.4, 0.0])
    opt_b, sch_b = make_optimizer(by_hand, OPTIM)
    for i, batch in zip(range(3), shuffled_batches(soft_rows, 4, 2)):
        distill_train_step(by_hand, soft_target_batch(batch, tokenizer.pad_token_id, TOP_K), opt_b, sch_b, 1.0,
                           annealed_alpha(0.8, i, 3, True), 2.0, "forward_kl", 0.5)
    assert all(torch.equal(x, y) for x, y in zip(_params(looped), _params(by_hand)))
