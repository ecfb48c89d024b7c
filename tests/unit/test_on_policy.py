"""On-policy distillation pieces (dume_ray/distill/on_policy.py): the step schedule, the student's rollouts and
the full-vocabulary loss on the student's own tokens. Tiny embedded Llama on CPU, no Ray.

Run: .venv/bin/python -m pytest tests/unit/test_on_policy.py -q
"""

from __future__ import annotations

import copy

import pytest
import torch

from dume_ray.config import ModelConfig
from dume_ray.data.encode import collate, encode_example
from dume_ray.data.tokenizer import build_char_tokenizer
from dume_ray.distill.on_policy import (is_on_policy_step, on_policy_loss, on_policy_step, score_by_group,
                                       student_rollouts, teacher_logprobs)
from dume_ray.model import build_embedded_model
from dume_ray.training import greedy_generate, response_logits

TOKENIZER = build_char_tokenizer()
PAIRS = [("cp abc=", "abc"), ("rv abcd=", "dcba"), ("cp a=", "a")]


def tiny(seed: int):
    return build_embedded_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
                                TOKENIZER, seed)


def rows():
    return [encode_example(TOKENIZER, p, r, 32) for p, r in PAIRS]


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 1 / 3, 0.9, 1.0])
def test_on_policy_steps_are_exactly_the_ratio_and_spread_evenly(ratio):
    flags = [is_on_policy_step(s, ratio) for s in range(300)]
    for n in (10, 100, 300):
        assert sum(flags[:n]) == int(n * ratio + 1e-9)  # every prefix holds floor(n * ratio) on-policy steps


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1 / 3, 1.0])
def test_end_schedule_puts_the_same_share_of_on_policy_steps_last(ratio):
    flags = [is_on_policy_step(s, ratio, "end", 60) for s in range(60)]
    n = int(60 * ratio + 1e-9)
    assert sum(flags) == sum(is_on_policy_step(s, ratio) for s in range(60)) == n  # the same share as interleaved
    assert flags == [False] * (60 - n) + [True] * n  # off-policy first, then on-policy to the end
    with pytest.raises(ValueError, match="schedule"):
        is_on_policy_step(0, ratio, "start", 60)
    with pytest.raises(ValueError, match="total steps"):  # without the budget every step would be on-policy
        is_on_policy_step(0, ratio, "end")


def test_rollouts_keep_the_prompt_and_end_at_eos_or_the_budget():
    model = tiny(0)
    out = student_rollouts(model, rows(), TOKENIZER.pad_token_id, TOKENIZER.eos_token_id, max_new_tokens=6, seed=3)
    for row, src in zip(out, rows()):
        start = src["response_start"]
        assert row["response_start"] == start and list(row["input_ids"][:start]) == list(src["input_ids"][:start])
        response = row["input_ids"][start:]
        assert 1 <= len(response) <= 6
        assert TOKENIZER.eos_token_id not in response[:-1]  # nothing after the first eos
        assert response[-1] == TOKENIZER.eos_token_id or len(response) == 6
    again = student_rollouts(model, rows(), TOKENIZER.pad_token_id, TOKENIZER.eos_token_id, max_new_tokens=6, seed=3)
    assert again == out  # seeded: a resumed run draws the same responses
    assert model.training  # the student's mode is restored


def test_greedy_rollouts_are_what_the_student_would_answer():
    model = tiny(1)
    out = student_rollouts(model, rows(), TOKENIZER.pad_token_id, TOKENIZER.eos_token_id, max_new_tokens=5, sample=False)
    answers = greedy_generate(model, TOKENIZER, [p for p, _ in PAIRS], 5)
    decoded = [TOKENIZER.decode(r["input_ids"][r["response_start"]:], skip_special_tokens=True) for r in out]
    assert decoded == answers


@pytest.mark.parametrize("divergence", ["reverse_kl", "generalized_jsd"])
def test_loss_is_zero_for_a_student_equal_to_its_teacher_and_positive_otherwise(divergence):
    student = tiny(0)
    batch = collate(student_rollouts(student, rows(), TOKENIZER.pad_token_id, TOKENIZER.eos_token_id, 6, seed=0),
                    TOKENIZER.pad_token_id)
    logits, _ = response_logits(student, batch)
    same = on_policy_loss(logits, teacher_logprobs(copy.deepcopy(student), batch), divergence)
    assert abs(float(same.detach())) <= 1e-5
    other = on_policy_loss(logits, teacher_logprobs(tiny(7), batch), divergence)
    assert float(other.detach()) > 1e-3
    other.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_reverse_kl_matches_its_definition_on_the_full_vocabulary():
    torch.manual_seed(0)
    student_logits, teacher_logits = torch.randn(5, 11), torch.randn(5, 11)
    q, p = torch.softmax(student_logits, -1), torch.softmax(teacher_logits, -1)
    expected = (q * (q.log() - p.log())).sum(-1).mean()
    got = on_policy_loss(student_logits, torch.log_softmax(teacher_logits, -1), "reverse_kl")
    assert torch.allclose(got, expected, atol=1e-6)


def test_bad_divergence_or_shapes_are_named():
    with pytest.raises(ValueError, match="forward_kl"):
        on_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), "forward_kl")
    with pytest.raises(ValueError, match="same tokens"):
        on_policy_loss(torch.zeros(2, 3), torch.zeros(3, 3))


@pytest.mark.parametrize("override,key", [("distill.on_policy_ratio=1.5", "distill.on_policy_ratio"),
                                          ("distill.on_policy_ratio=-0.1", "distill.on_policy_ratio"),
                                          ("distill.on_policy_divergence=forward_kl", "distill.on_policy_divergence"),
                                          ("distill.on_policy_schedule=ramp", "distill.on_policy_schedule"),
                                          ("distill.temperature=0", "distill.temperature"),
                                          ("distill.alpha=1.01", "distill.alpha"),
                                          ("distill.divergence=kl", "distill.divergence")])
def test_bad_distillation_settings_are_config_errors_naming_the_key(override, key):
    from dume_ray.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/demo.yaml", [override])


def test_score_by_group_puts_each_rows_teacher_tokens_back_in_row_order():
    rows = [{"input_ids": list(range(5)), "response_start": 3}, {"input_ids": list(range(4)), "response_start": 1},
            {"input_ids": list(range(6)), "response_start": 5}]
    groups = ["a", "b", "a"]
    calls = []

    def score_groups(by_group):  # each group's tokens tagged with the group and the row's own position
        calls.append(sorted(by_group))
        return {g: torch.cat([torch.full((len(r["input_ids"]) - r["response_start"], 2), float(len(r["input_ids"])))
                              for r in group_rows]) + (100.0 if g == "b" else 0.0)
                for g, group_rows in by_group.items()}

    out = score_by_group(rows, groups, score_groups)
    assert calls == [["a", "b"]]  # every group in one call, so the experts score in parallel
    assert out[:, 0].tolist() == [5.0, 5.0, 104.0, 104.0, 104.0, 6.0]


def test_on_policy_step_trains_on_its_rollouts_on_its_share_of_steps_only():
    from dume_ray.training import make_optimizer
    from dume_ray.config import OptimConfig

    student, teacher = tiny(0), tiny(5)
    batch = {"input_ids": [r["input_ids"] for r in rows()], "response_start": [r["response_start"] for r in rows()],
             "group": ["cp", "rv", "cp"]}
    seen = []

    def off_policy(model, batch, optimizer, scheduler, step, pad_id, device):
        seen.append(step)
        return {"loss": 0.0}

    def score(rollouts, groups):
        assert groups == ["cp", "rv", "cp"]
        return teacher_logprobs(teacher, collate(rollouts, TOKENIZER.pad_token_id))

    step_fn = on_policy_step(off_policy, score, 0.5, "reverse_kl", 0.5, True, 4, TOKENIZER.eos_token_id, 1.0, "float32")
    optimizer, scheduler = make_optimizer(student, OptimConfig(steps=4, lr=1e-2, warmup_steps=0))
    before = [p.detach().clone() for p in student.parameters()]
    metrics = [step_fn(student, batch, optimizer, scheduler, s, TOKENIZER.pad_token_id, torch.device("cpu"))
               for s in range(4)]
    assert [m["on_policy"] for m in metrics] == [0.0, 1.0, 0.0, 1.0] and seen == [0, 2]
    assert all(m["on_policy_loss"] > 0 and m["tokens"] > 0 for m in metrics if m["on_policy"])
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))  # the on-policy steps moved it

    seen.clear()
    step_fn = on_policy_step(off_policy, score, 0.5, "reverse_kl", 0.5, True, 4, TOKENIZER.eos_token_id, 1.0, "float32",
                             "end", 4)
    metrics = [step_fn(student, batch, optimizer, scheduler, s, TOKENIZER.pad_token_id, torch.device("cpu"))
               for s in range(4)]
    assert [m["on_policy"] for m in metrics] == [0.0, 0.0, 1.0, 1.0] and seen == [0, 1]  # "end": the last half


def test_teacher_schedules_order_the_students_stream():
    """distill.teacher_schedule: "interleaved" mixes every group; "sequential" gives one group's rows after
    another in config order, each group shuffled within; both are permutations and seeded."""
    from dume_ray.data.encode import stream_order  # pure: no Ray
    row_groups = ["b", "a", "b", "c", "a", "a", "c", "b"]
    sequential = stream_order(row_groups, ["a", "b", "c"], seed=0, schedule="sequential")
    assert sorted(sequential) == list(range(8))
    assert [row_groups[i] for i in sequential] == ["a"] * 3 + ["b"] * 3 + ["c"] * 2
    assert sequential != stream_order(row_groups, ["a", "b", "c"], seed=1, schedule="sequential")  # shuffled within
    interleaved = stream_order(row_groups, ["a", "b", "c"], seed=0, schedule="interleaved")
    assert sorted(interleaved) == list(range(8)) and interleaved == stream_order(row_groups, ["a", "b", "c"], 0, "interleaved")
    assert [row_groups[i] for i in interleaved] != [row_groups[i] for i in sequential]


def test_annealed_schedule_goes_from_one_group_at_a_time_to_mixed():
    """"annealed": a seeded permutation in rounds; each round every group gives half its rows left, so the first
    half of the epoch is one group after another and the end alternates the groups row by row."""
    from dume_ray.data.encode import scheduled_batches, stream_order
    row_groups = [g for g in "abc" for _ in range(600)]
    order = stream_order(row_groups, ["a", "b", "c"], seed=0, schedule="annealed")
    assert sorted(order) == list(range(1800)) and order == stream_order(row_groups, ["a", "b", "c"], 0, "annealed")
    assert order != stream_order(row_groups, ["a", "b", "c"], 1, "annealed")  # shuffled within each group
    seen = "".join(row_groups[i] for i in order)
    assert seen[:900] == "a" * 300 + "b" * 300 + "c" * 300 and seen[900:1350] == "a" * 150 + "b" * 150 + "c" * 150
    assert seen.endswith("aabbcc" + "abc" * 2)  # the last two rounds: one row per group
    for prefix in (900, 1350, 1575):  # balanced after every round
        assert seen[:prefix].count("a") == seen[:prefix].count("b") == seen[:prefix].count("c")
    with pytest.raises(ValueError, match="teacher schedule"):
        stream_order(row_groups, ["a", "b", "c"], 0, "random")
    rows = [{"group": g, "id": i} for i, g in enumerate(row_groups)]
    batches = scheduled_batches(rows, 600, 0, "sequential", ["a", "b", "c"])
    assert [set(next(batches)["group"]) for _ in range(4)] == [{"a"}, {"b"}, {"c"}, {"a"}]  # one group per block, per epoch


def test_annealed_schedule_runs_once_over_the_whole_step_budget_not_once_per_epoch():
    """A student reading 3 epochs (steps x batch size = 3 x the rows): one annealing over all 3, not 3 in a row.
    The first half of the budget is one group after another (blocks of half a group's share: 1.5 epochs of that
    group), the end alternates row by row, every row is read 3 times; a budget that is no whole number of
    epochs is spanned too (each group's share rounded up)."""
    from dume_ray.data.encode import scheduled_batches, stream_order
    row_groups = [g for g in "abc" for _ in range(20)]
    order = stream_order(row_groups, ["a", "b", "c"], seed=0, schedule="annealed", length=180)
    assert len(order) == 180 and all(order.count(i) == 3 for i in range(60))
    seen = "".join(row_groups[i] for i in order)
    assert seen[:90] == "a" * 30 + "b" * 30 + "c" * 30 and seen[90:135] == "a" * 15 + "b" * 15 + "c" * 15
    assert seen.endswith("aabbcc" + "abc")  # mixed at the very end of the budget, not at the end of each epoch
    one_epoch = "".join(row_groups[i] for i in stream_order(row_groups, ["a", "b", "c"], 0, "annealed"))
    assert seen != one_epoch * 3 and one_epoch[:30] == "a" * 10 + "b" * 10 + "c" * 10  # before: this, 3 times
    assert stream_order(row_groups, ["a", "b", "c"], 0, "annealed", length=60) == stream_order(row_groups, ["a", "b", "c"], 0, "annealed")
    first = [i for i in order if row_groups[i] == "a"][:20]
    assert sorted(first) == list(range(20))  # each pass over a group's rows reads each row once
    uneven = stream_order(row_groups, ["a", "b", "c"], 0, "annealed", length=100)  # 1.67 epochs: 34 rows a group
    assert len(uneven) == 102 and max(uneven.count(i) for i in range(60)) == 2
    assert "".join(row_groups[i] for i in uneven)[:51] == "a" * 17 + "b" * 17 + "c" * 17
    # the loop without Ray Data (benchmarks/curves.py) reads the same order, in batches
    rows = [{"group": g, "id": i} for i, g in enumerate(row_groups)]
    batches = scheduled_batches(rows, 30, 0, "annealed", ["a", "b", "c"], length=180)
    assert [set(next(batches)["group"]) for _ in range(3)] == [{"a"}, {"b"}, {"c"}]


def test_teacher_schedule_is_a_config_error_when_unknown():
    from dume_ray.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"distill\.teacher_schedule"):
        load_config("configs/demo.yaml", ["distill.teacher_schedule=random"])
    assert load_config("configs/demo.yaml", ["distill.teacher_schedule=annealed"]).distill.teacher_schedule == "annealed"
