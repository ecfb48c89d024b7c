"""Stream cost: student steps on the soft-target stream vs the multitask baseline's plain CE step.

    python benchmarks/stream_cost.py                 # demo model (hidden 64, 2 layers), batch 32, top-k 8
    python benchmarks/stream_cost.py --repeats 7 --steps 40 --threads 1
    python benchmarks/stream_cost.py --tiny          # smoke setting, writes to a temp folder

One process, no Ray. Every expert (one per built-in task; fresh weights, since throughput does not depend
on what they learned) scores its task's training examples with `TeacherScorer`, and the tables are written
as Parquet shards with `write_shard`, as the soft-targets stage does. The shards are read back into numpy
batches of `batch_size` rows (the format Ray Data hands the worker), and on the *same* batches we time:
- `ce`: `collate` + `ce_train_step` (what a multitask trainer without soft targets does per step);
- `stream KD`: `soft_target_batch` + `distill_train_step` (alpha, T from demo.yaml), what `distill` does;
- `naive KD`: `collate` + each batch row's teacher forward (no grad, full vocabulary, top-k taken in the
  loop) + `distill_train_step`: the alternative of running the teachers inside the student's loop.
The three modes are interleaved (ce, stream, naive, ce, ...) for `--repeats` rounds of `--steps` steps after
a warm-up, so machine load hits them alike; we report the median response-token throughput per mode and the
ratios to `ce`. Target: stream / ce >= 0.8.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, command_line, markdown_table, result_path, write_result  # noqa: E402

sys.path.insert(0, REPO)


def write_stream(models_dir: str, shards_dir: str, tasks_cfg, model_cfg, top_k: int) -> tuple[dict, str]:
    """One fresh expert per task scores its task's training rows into one Parquet shard per task."""
    from dume_ray.data.soft_targets import write_shard
    from dume_ray.model import create_initial_model, load_tokenizer
    from dume_ray.soft_targets.teacher_scoring import TeacherScorer
    from dume_ray.tasks import encode_rows, load_tasks

    base = create_initial_model(model_cfg, 0, os.path.join(models_dir, "student"))
    tokenizer = load_tokenizer(base)
    tasks = load_tasks(tasks_cfg, tokenizer, model_cfg.max_seq_len)
    experts = {}
    for i, name in enumerate(tasks):
        experts[name] = create_initial_model(model_cfg, 100 + i, os.path.join(models_dir, f"expert-{name}"))
        rows = encode_rows({name: tasks[name]}, tokenizer, "train", model_cfg.max_seq_len, {name: name})
        scorer = TeacherScorer(experts[name], top_k)
        batch = {k: [r[k] for r in rows] for k in ("example_id", "task", "group", "input_ids", "response_start")}
        batch["input_ids"] = [list(x) for x in batch["input_ids"]]
        write_shard(scorer(batch), os.path.join(shards_dir, f"{name}.parquet"))
    return experts, base


def numpy_batches(shards_dir: str, batch_size: int, seed: int) -> list[dict]:
    """All shard rows, shuffled once, cut into numpy batches like Ray Data's `iter_batches(batch_format='numpy')`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(os.path.join(shards_dir, f)) for f in sorted(os.listdir(shards_dir))])
    order = np.random.default_rng(seed).permutation(table.num_rows)
    batches = []
    for start in range(0, len(order) - batch_size + 1, batch_size):
        part = table.take(order[start:start + batch_size])
        batch = {}
        for col in part.column_names:
            values = part.column(col).to_pylist()
            batch[col] = np.array([np.asarray(v) for v in values] + [None], dtype=object)[:-1] \
                if isinstance(values[0], list) else np.asarray(values)
        batches.append(batch)
    return batches


def naive_targets(batch: dict, lm_batch: dict, teachers: dict, top_k: int) -> dict:
    """Teachers inside the loop: each row's expert forwards it (full vocab), top-k of the log-probs."""
    import torch
    from dume_ray.data.encode import response_positions

    b_idx, t_idx = response_positions(lm_batch["labels"])
    logprobs = torch.empty(len(b_idx), next(iter(teachers.values())).config.vocab_size)  # [n, v]
    with torch.no_grad():
        for group, teacher in teachers.items():
            rows = torch.tensor([g == group for g in batch["group"]])
            if not rows.any():
                continue
            logits = teacher(input_ids=lm_batch["input_ids"][rows], attention_mask=lm_batch["attention_mask"][rows]).logits
            full = torch.zeros(len(rows), *logits.shape[1:])
            full[rows] = logits.float()
            keep = rows[b_idx]
            logprobs[keep] = torch.log_softmax(full[b_idx[keep], t_idx[keep]], dim=-1)
    values, ids = torch.topk(logprobs, top_k, dim=-1)  # [n, k]
    in_topk = torch.zeros_like(logprobs, dtype=torch.bool).scatter_(-1, ids, True)
    tail = torch.logsumexp(logprobs.masked_fill(in_topk, float("-inf")), dim=-1)  # [n]
    return {**lm_batch, "topk_ids": ids, "topk_logprobs": values, "tail_logmass": tail}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="model, tasks, batch size, alpha/T, top-k")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode per round")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the workers use 1)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    started = time.time()

    import torch
    from dume_ray.config import load_config
    from dume_ray.data.encode import batch_rows, collate
    from dume_ray.distill.worker import soft_target_batch  # imports ray.train (not started): the real conversion
    from dume_ray.model import load_model
    from dume_ray.training import ce_train_step, distill_train_step, make_optimizer

    overrides = ["tasks.builtin=[copy,reverse]", "tasks.num_train=32", "model.hidden_size=32", "model.intermediate_size=64"] if args.tiny else []
    if args.tiny:
        args.steps, args.repeats, args.warmup = 2, 2, 1
    cfg = load_config(os.path.join(REPO, args.config), overrides)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = tempfile.mkdtemp(prefix="bench-stream-")
    t0 = time.time()
    expert_dirs, student_dir = write_stream(os.path.join(work, "models"), os.path.join(work, "shards"), cfg.tasks, cfg.model,
                                            cfg.soft_targets.top_k)
    scoring_seconds = time.time() - t0
    bs, d = cfg.distill.optim.batch_size, cfg.distill
    batches = numpy_batches(os.path.join(work, "shards"), bs, cfg.seed)
    teachers = {g: load_model(p).eval() for g, p in expert_dirs.items()}
    pad_id, top_k = 0, cfg.soft_targets.top_k
    from dume_ray.model import load_tokenizer
    pad_id = load_tokenizer(student_dir).pad_token_id

    def lm_batch(b):
        return collate(batch_rows(b), pad_id)

    steps = {
        "ce (multitask)": lambda m, o, s, b: ce_train_step(m, lm_batch(b), o, s, d.optim.grad_clip),
        "stream KD (student)": lambda m, o, s, b: distill_train_step(m, soft_target_batch(b, pad_id, top_k), o, s, d.optim.grad_clip,
                                                                      d.alpha, d.temperature, d.divergence, d.jsd_beta),
        "naive KD (teachers in loop)": lambda m, o, s, b: distill_train_step(m, naive_targets(b, lm_batch(b), teachers, top_k), o, s,
                                                                              d.optim.grad_clip, d.alpha, d.temperature, d.divergence, d.jsd_beta),
    }
    state = {}
    for mode in steps:  # one student per mode, same init, same optimiser
        model = load_model(student_dir)
        state[mode] = (model, *make_optimizer(model, d.optim))
    rates = {mode: [] for mode in steps}
    cursor = 0
    for mode, fn in steps.items():  # warm-up
        for i in range(args.warmup):
            fn(*state[mode], batches[i % len(batches)])
    for _ in range(args.repeats):
        round_batches = [batches[(cursor + i) % len(batches)] for i in range(args.steps)]
        cursor += args.steps
        for mode, fn in steps.items():
            tokens, t = 0, time.perf_counter()
            for b in round_batches:
                tokens += fn(*state[mode], b)["tokens"]
            rates[mode].append(tokens / (time.perf_counter() - t))

    ce = statistics.median(rates["ce (multitask)"])
    rows, results = [], {}
    for mode, values in rates.items():
        med = statistics.median(values)
        rows.append([mode, f"{med:,.0f}", f"{min(values):,.0f}–{max(values):,.0f}", f"{med / ce:.2f}"])
        results[mode] = {"median_tokens_per_s": med, "per_round": values, "ratio_to_ce": med / ce}
    ratio = results["stream KD (student)"]["ratio_to_ce"]
    table = markdown_table(["step", "response tokens/s (median)", "range over rounds", "ratio to ce"], rows)
    verdict = f"stream / ce = {ratio:.2f} (target >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'})"
    print(f"\n{table}\n\n{verdict}", flush=True)
    settings = {"model": {"hidden_size": cfg.model.hidden_size, "num_layers": cfg.model.num_layers,
                          "vocab_size": next(iter(teachers.values())).config.vocab_size},
                "batch_size": bs, "top_k": top_k, "alpha": d.alpha, "temperature": d.temperature, "teachers": len(teachers),
                "steps_per_round": args.steps, "rounds": args.repeats, "warmup": args.warmup, "torch_threads": args.threads,
                "batches": len(batches), "scoring_seconds": scoring_seconds}
    write_result(result_path("stream_cost", args.out, args.tiny), "stream_cost", command_line(), started,
                 {"settings": settings, "results": results, "stream_over_ce": ratio, "target_met": ratio >= 0.8}, f"{table}\n\n{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
