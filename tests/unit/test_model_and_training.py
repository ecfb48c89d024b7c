"""Embedded model, teacher scoring and the pure training/eval steps, on a tiny Llama on CPU (no Ray started).

Run: cd /work/main && .venv/bin/python -m pytest tests/unit/test_model_and_training.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from dume_ray.config import ModelConfig, OptimConfig  # noqa: E402
from dume_ray.cli import answers_cut_by_generation_cap  # noqa: E402
from dume_ray.data.encode import (answer_tokens, collate, encode_example, encode_prompt,  # noqa: E402
                                  response_positions, soft_target_batch)
from dume_ray.data.soft_targets import soft_target_schema, validate_shard, write_shard  # noqa: E402
from dume_ray.data.tokenizer import build_char_tokenizer  # noqa: E402
from dume_ray.losses import cross_entropy  # noqa: E402
from dume_ray.model import (  # noqa: E402
    check_model_path,
    check_same_vocab,
    count_parameters,
    create_initial_model,
    freeze_non_mlp,
    load_model,
    load_tokenizer,
)
from dume_ray.soft_targets.teacher_scoring import TeacherScorer  # noqa: E402
from dume_ray.tasks import Example, Task, encode_rows  # noqa: E402
from dume_ray.tasks.builtin import make_builtin_task  # noqa: E402
from dume_ray.training import (  # noqa: E402
    ce_train_step,
    distill_train_step,
    evaluate_tasks,
    greedy_generate,
    load_training_state,
    make_optimizer,
    response_logits,
    save_training_state,
)

TOP_K = 8
TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_seq_len=32)
OPTIM = OptimConfig(lr=1e-2, warmup_steps=1, steps=20, batch_size=8)

torch.set_num_threads(1)  # tiny model; keep off the cores other jobs use


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return create_initial_model(TINY, seed=0, out_dir=str(tmp_path_factory.mktemp("base")))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def copy_task():
    return make_builtin_task("copy", 0, 64, 8, 8)


@pytest.fixture(scope="module")
def rows(copy_task, tokenizer) -> list[dict]:
    return encode_rows({"copy": copy_task}, tokenizer, "train", TINY.max_seq_len, {"copy": "copy"})[:8]


@pytest.fixture(scope="module")
def batch(rows, tokenizer) -> dict:
    return collate(rows, tokenizer.pad_token_id)


def _numpy_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """The shape Ray Data hands to map_batches: strings and int arrays as object arrays, one entry per row."""
    input_ids = np.empty(len(rows), dtype=object)
    input_ids[:] = [np.asarray(r["input_ids"], dtype=np.int64) for r in rows]
    return {
        "example_id": np.array([r["example_id"] for r in rows], dtype=object),
        "task": np.array([r["task"] for r in rows], dtype=object),
        "group": np.array([r["group"] for r in rows], dtype=object),
        "input_ids": input_ids,
        "response_start": np.array([r["response_start"] for r in rows], dtype=np.int64),
    }


@pytest.fixture(scope="module")
def teacher_dir(model_dir, batch, tmp_path_factory) -> str:
    """A teacher that differs from the student: the base after a few CE steps on the batch."""
    model = load_model(model_dir)
    optimizer, scheduler = make_optimizer(model, OPTIM)
    for _ in range(6):
        ce_train_step(model, batch, optimizer, scheduler, grad_clip=1.0)
    out = str(tmp_path_factory.mktemp("teacher"))
    model.save_pretrained(out)
    load_tokenizer(model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def soft_table(teacher_dir, rows):
    return TeacherScorer(teacher_dir, top_k=TOP_K)(_numpy_batch(rows))


def _table_columns(table, as_row_arrays: bool) -> dict[str, np.ndarray]:
    """Numpy columns of a soft-target table, list columns as object arrays (of lists or of ndarrays)."""
    columns = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        if isinstance(values[0], list):
            if as_row_arrays:
                col = np.empty(len(values), dtype=object)
                col[:] = [np.asarray(v) for v in values]
            else:
                col = np.array(values, dtype=object)
            columns[name] = col
        else:
            columns[name] = np.array(values)
    return columns


@torch.no_grad()
def _ce_loss(model, batch) -> float:
    model.eval()
    logits, targets = response_logits(model, batch)
    return float(cross_entropy(logits, targets))


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- the saved model is a plain Hugging Face checkpoint --------------------------------------------------

def test_saved_model_loads_with_plain_transformers_without_dume_ray(model_dir, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["dume_ray"] = None  # any import of dume_ray now fails
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({model_dir!r})
        model = AutoModelForCausalLM.from_pretrained({model_dir!r})
        ids = tok("cp abc=", add_special_tokens=False)["input_ids"]
        print(len(tok), model.config.vocab_size, model.get_output_embeddings().weight.shape[0],
              tok.decode(ids), type(model).__name__)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    vocab = len(build_char_tokenizer())
    assert result.stdout.split() == [str(vocab), str(vocab), str(vocab), "cp", "abc=", "LlamaForCausalLM"]


def test_embedded_model_matches_config_and_tokenizer(model_dir, tokenizer):
    model = load_model(model_dir)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (32, 2, 4, 64)
    assert c.max_position_embeddings >= TINY.max_seq_len
    assert c.vocab_size == len(tokenizer) == model.get_input_embeddings().weight.shape[0]
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None


def test_same_seed_gives_same_initial_weights(model_dir, tmp_path):
    again = load_model(create_initial_model(TINY, seed=0, out_dir=str(tmp_path / "a")))
    other = load_model(create_initial_model(TINY, seed=1, out_dir=str(tmp_path / "b")))
    base = load_model(model_dir)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in base.state_dict().items())  # every weight
    random_weights = [k for k, v in base.state_dict().items() if v.std() > 0]  # not the all-ones norms
    assert random_weights and all(not torch.equal(base.state_dict()[k], other.state_dict()[k]) for k in random_weights)


# ---- training steps --------------------------------------------------------------------------------------

def test_ce_train_steps_lower_loss_on_a_fixed_batch(model_dir, batch):
    model = load_model(model_dir)
    optimizer, scheduler = make_optimizer(model, OPTIM)
    before = _ce_loss(model, batch)
    metrics = [ce_train_step(model, batch, optimizer, scheduler, grad_clip=1.0) for _ in range(5)]
    after = _ce_loss(model, batch)
    assert metrics[0]["loss"] == pytest.approx(before, rel=1e-4)
    assert metrics[0]["tokens"] == int((batch["labels"] != -100).sum())
    assert after < 0.8 * before, (before, after)


def test_teacher_scorer_table_has_soft_target_schema_and_lengths(soft_table, rows, teacher_dir, tmp_path):
    vocab = load_model(teacher_dir).config.vocab_size
    assert soft_table.schema.equals(soft_target_schema(TOP_K, vocab_size=vocab), check_metadata=False)  # uint16 ids
    assert soft_table.num_rows == len(rows)
    assert soft_table.column("example_id").to_pylist() == [r["example_id"] for r in rows]
    for i, row in enumerate(rows):
        n_resp = len(row["input_ids"]) - row["response_start"]
        assert len(soft_table.column("topk_ids")[i].as_py()) == n_resp * TOP_K
        assert len(soft_table.column("topk_logprobs")[i].as_py()) == n_resp * TOP_K
        assert len(soft_table.column("tail_logmass")[i].as_py()) == n_resp
        assert soft_table.column("input_ids")[i].as_py() == list(row["input_ids"])
    path = str(tmp_path / "shard.parquet")
    write_shard(soft_table, path)
    assert validate_shard(path, vocab_size=load_model(teacher_dir).config.vocab_size, top_k=TOP_K) == len(rows)


def test_teacher_top1_is_the_teacher_argmax(soft_table, teacher_dir, batch):
    teacher = load_model(teacher_dir).eval()
    with torch.no_grad():
        logits, _ = response_logits(teacher, batch)
    top1 = np.concatenate([np.asarray(v).reshape(-1, TOP_K)[:, 0] for v in soft_table.column("topk_ids").to_pylist()])
    assert np.array_equal(top1, logits.argmax(-1).numpy())


@pytest.mark.parametrize("as_row_arrays", [False, True], ids=["pylist-object", "ndarray-per-row"])
def test_soft_target_batch_has_one_teacher_row_per_response_position(soft_table, tokenizer, as_row_arrays):
    out = soft_target_batch(_table_columns(soft_table, as_row_arrays), tokenizer.pad_token_id, TOP_K)
    b_idx, _ = response_positions(out["labels"])
    n_positions = sum(len(ids) - rs for ids, rs in zip(soft_table.column("input_ids").to_pylist(),
                                                       soft_table.column("response_start").to_pylist()))
    assert b_idx.numel() == n_positions
    assert out["topk_ids"].shape == (n_positions, TOP_K) and out["topk_ids"].dtype == torch.int64
    assert out["topk_logprobs"].shape == (n_positions, TOP_K) and out["topk_logprobs"].dtype == torch.float32
    assert out["tail_logmass"].shape == (n_positions,)
    flat_ids = np.concatenate([np.asarray(v) for v in soft_table.column("topk_ids").to_pylist()])
    assert np.array_equal(out["topk_ids"].reshape(-1).numpy(), flat_ids)


def test_distill_steps_with_alpha_one_lower_the_kd_loss(model_dir, soft_table, tokenizer):
    student = load_model(model_dir)
    optimizer, scheduler = make_optimizer(student, OPTIM)
    batch = soft_target_batch(_table_columns(soft_table, True), tokenizer.pad_token_id, TOP_K)
    kwargs = dict(grad_clip=1.0, alpha=1.0, temperature=2.0, divergence="forward_kl", jsd_beta=0.5)
    losses = [distill_train_step(student, batch, optimizer, scheduler, **kwargs)["loss"] for _ in range(6)]
    assert all(np.isfinite(losses))
    assert losses[0] > 0
    assert losses[-1] < 0.8 * losses[0], losses


def test_adaptive_teacher_scorer_keeps_fewer_tokens_and_the_student_trains_on_them(model_dir, teacher_dir, rows, soft_table,
                                                                                   tokenizer, tmp_path):
    """soft_targets.kl_max > 0: a valid adaptive shard (topk_counts, at most top_k per position, fewer bytes of
    top-k values than fixed k) whose padded batches train the student like the fixed-k ones."""
    table = TeacherScorer(teacher_dir, top_k=TOP_K, kl_max=0.3)(_numpy_batch(rows))  # a 6-step teacher is flat
    assert table.schema.equals(soft_target_schema(TOP_K, adaptive=True, vocab_size=len(tokenizer)), check_metadata=False)
    path = str(tmp_path / "adaptive.parquet")
    write_shard(table, path)
    assert validate_shard(path, vocab_size=load_model(teacher_dir).config.vocab_size, top_k=TOP_K, adaptive=True) == len(rows)
    counts = np.concatenate([np.asarray(c) for c in table.column("topk_counts").to_pylist()])
    assert counts.max() <= TOP_K and len(counts) == sum(len(r["input_ids"]) - r["response_start"] for r in rows)
    assert len(table.column("topk_ids").combine_chunks().flatten()) == counts.sum() < len(counts) * TOP_K
    # the kept tokens are the fixed-k shard's first ones, position by position
    fixed = np.concatenate([np.asarray(v) for v in soft_table.column("topk_ids").to_pylist()]).reshape(-1, TOP_K)
    kept = np.concatenate([np.asarray(v) for v in table.column("topk_ids").to_pylist()])
    assert np.array_equal(kept, fixed[np.arange(TOP_K)[None, :] < counts[:, None]])
    student = load_model(model_dir)
    optimizer, scheduler = make_optimizer(student, OPTIM)
    batch = soft_target_batch(_table_columns(table, True), tokenizer.pad_token_id, TOP_K)
    kwargs = dict(grad_clip=1.0, alpha=1.0, temperature=1.0, divergence="forward_kl", jsd_beta=0.5)
    losses = [distill_train_step(student, batch, optimizer, scheduler, **kwargs)["loss"] for _ in range(6)]
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


def test_distill_step_rejects_soft_targets_of_wrong_length(model_dir, soft_table, tokenizer):
    student = load_model(model_dir)
    optimizer, scheduler = make_optimizer(student, OPTIM)
    batch = soft_target_batch(_table_columns(soft_table, True), tokenizer.pad_token_id, TOP_K)
    batch = {**batch, "topk_ids": batch["topk_ids"][1:], "topk_logprobs": batch["topk_logprobs"][1:],
             "tail_logmass": batch["tail_logmass"][1:]}
    with pytest.raises(ValueError, match="soft targets cover"):
        distill_train_step(student, batch, optimizer, scheduler, 1.0, 1.0, 2.0, "forward_kl", 0.5)


# ---- generation and evaluation ---------------------------------------------------------------------------

@torch.no_grad()
def _argmax_decode(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding by hand: the whole sequence recomputed each step, no cache, no padding; stops at eos."""
    ids = encode_prompt(tokenizer, prompt)
    new = []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_greedy_generate_returns_each_prompts_argmax_continuation(teacher_dir, tokenizer, copy_task):
    prompts = [e.prompt for e in copy_task.examples("test")][:5]
    model = load_model(teacher_dir).eval()
    outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    assert outputs == [_argmax_decode(model, tokenizer, p, 6) for p in prompts]


def test_greedy_generate_left_padding_does_not_change_answers(teacher_dir, tokenizer):
    prompts = ["cp ab=", "cp abcdef=", "rv abc=", "ad 1,99="]  # different lengths -> padded batch
    model = load_model(teacher_dir)
    batched = greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=len(prompts))
    single = greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    assert batched == single


def test_evaluate_tasks_returns_each_tasks_exact_match_rate(teacher_dir, tokenizer, copy_task):
    model = load_model(teacher_dir)
    tasks = {"copy": copy_task, "add": make_builtin_task("add", 0, 8, 4, 4)}
    scores = evaluate_tasks(model, tokenizer, tasks, "test", max_new_tokens=6)
    assert set(scores) == {"copy", "add"}
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    # A task whose references are the model's own answers for 3 of 8 prompts (and off by one char for the rest)
    prompts = [e.prompt for e in copy_task.examples("test")]
    answers = greedy_generate(model, tokenizer, prompts, max_new_tokens=6)
    test = [Example(p, a if i < 3 else a + "#") for i, (p, a) in enumerate(zip(prompts, answers))]
    rigged = Task(name="rigged", splits={"train": test, "validation": test, "test": test})
    assert evaluate_tasks(model, tokenizer, {"rigged": rigged}, "test", max_new_tokens=6) == {"rigged": 3 / len(test)}


MEMORISED = [("cp abcde=", "abcde"), ("rv xyz=", "zyx")]


@pytest.fixture(scope="module")
def memorised_dir(model_dir, tokenizer, tmp_path_factory) -> str:
    """The tiny base after 60 CE steps on the two MEMORISED examples alone: it answers them and then stops."""
    model = load_model(model_dir)
    batch = collate([encode_example(tokenizer, p, r, TINY.max_seq_len) for p, r in MEMORISED], tokenizer.pad_token_id)
    optimizer, scheduler = make_optimizer(model, OptimConfig(lr=3e-2, warmup_steps=1, steps=60, batch_size=2))
    for _ in range(60):
        ce_train_step(model, batch, optimizer, scheduler, grad_clip=1.0)
    out = str(tmp_path_factory.mktemp("memorised"))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("prompt, answer", MEMORISED)
def test_an_answer_of_n_tokens_is_scored_correct_with_max_new_tokens_n(memorised_dir, tokenizer, prompt, answer):
    """Decoding stops at eos or at max_new_tokens and the answer is decoded without the eos, so an answer of
    N tokens (`answer_tokens`: eos not counted) is matched at max_new_tokens = N, not only at N + 1: the
    preflight's rule (`answers_cut_by_generation_cap`), which benchmarks/curves.py's `answer_room` now shares."""
    model = load_model(memorised_dir)
    row = encode_example(tokenizer, prompt, answer, TINY.max_seq_len)
    n = answer_tokens(row)
    assert n == len(answer)  # one token a character
    # the model writes the answer and then eos: it does stop
    assert int(model(input_ids=torch.tensor([row["input_ids"][:-1]])).logits[0, -1].argmax()) == tokenizer.eos_token_id
    task = {"memorised": Task(name="memorised", splits={"test": [Example(prompt, answer)]})}
    scores = {cap: evaluate_tasks(model, tokenizer, task, "test", cap)["memorised"] for cap in (n - 1, n, n + 1)}
    assert scores == {n - 1: 0.0, n: 1.0, n + 1: 1.0}
    assert answers_cut_by_generation_cap({"test": [{**row, "task": "memorised"}]}, n) == {}
    assert answers_cut_by_generation_cap({"test": [{**row, "task": "memorised"}]}, n - 1) == {
        "memorised/test": {"rows": 1, "longest": n}}


# ---- checkpoints -----------------------------------------------------------------------------------------

def test_training_state_round_trip_restores_step_extra_parameters_and_optimizer(model_dir, batch, tmp_path):
    model = load_model(model_dir)
    optimizer, scheduler = make_optimizer(model, OPTIM)
    for _ in range(2):
        ce_train_step(model, batch, optimizer, scheduler, grad_clip=1.0)
    ckpt = str(tmp_path / "ckpt")
    save_training_state(ckpt, model, optimizer, scheduler, step=1, extra={"old": True})
    save_training_state(ckpt, model, optimizer, scheduler, step=2, extra={"seed": 7})  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp folder left behind

    fresh = load_model(model_dir)
    fresh_opt, fresh_sched = make_optimizer(fresh, OPTIM)
    assert not torch.equal(fresh.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])
    step, extra = load_training_state(ckpt, fresh, fresh_opt, fresh_sched)
    assert (step, extra) == (2, {"seed": 7})
    expected, restored = _params(model), _params(fresh)
    assert expected.keys() == restored.keys()
    assert all(torch.equal(expected[k], restored[k]) for k in expected)
    assert fresh_sched.last_epoch == scheduler.last_epoch == 2
    p = next(iter(model.parameters()))
    q = next(iter(fresh.parameters()))
    assert torch.equal(optimizer.state[p]["exp_avg"], fresh_opt.state[q]["exp_avg"])


# ---- freezing and model checks ---------------------------------------------------------------------------

def test_freeze_non_mlp_leaves_only_mlp_params_trainable(model_dir):
    model = load_model(model_dir)
    trainable = freeze_non_mlp(model)
    names = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(names.values()) and not all(names.values())
    assert all(requires_grad == (".mlp." in n) for n, requires_grad in names.items())
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < count_parameters(model)


def test_a_training_step_after_freeze_non_mlp_changes_only_mlp_weights(model_dir, batch):
    model = load_model(model_dir)
    freeze_non_mlp(model)
    before = _params(model)
    optimizer, scheduler = make_optimizer(model, OPTIM)
    ce_train_step(model, batch, optimizer, scheduler, grad_clip=1.0)
    changed = {k for k, v in _params(model).items() if not torch.equal(v, before[k])}
    assert changed and all(".mlp." in k for k in changed)


def test_check_model_path_rejects_missing_local_path_and_passes_hub_name(model_dir):
    with pytest.raises(FileNotFoundError, match="does/not/exist"):
        check_model_path("./does/not/exist")
    with pytest.raises(FileNotFoundError):
        check_model_path("/does/not/exist")
    assert check_model_path("org/name") is None
    assert check_model_path(model_dir) is None


def test_check_same_vocab_accepts_same_and_rejects_different_tokenizer(model_dir, tmp_path):
    check_same_vocab(model_dir, model_dir)
    other = str(tmp_path / "euro")
    load_model(model_dir).save_pretrained(other)
    euro = build_char_tokenizer(extra_chars="€")
    euro.save_pretrained(other)
    assert len(euro) == len(build_char_tokenizer()) + 1
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        check_same_vocab(model_dir, other)
