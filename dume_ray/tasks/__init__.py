"""Tasks: built-in generated ones (builtin.py) and user ones from files or the Hub (files.py).

    from dume_ray.tasks import load_tasks, encode_rows
    tasks = load_tasks(cfg.tasks)                        # {name: Task}
    rows = encode_rows(tasks, tokenizer, "train", 32, {"copy": "copy+sort", ...})

Pure: no Ray here. Tested in tests/unit/test_tasks.py.
"""

from __future__ import annotations

from dume_ray.config import TasksConfig
from dume_ray.data.encode import encode_example
from dume_ray.tasks.base import SPLITS, Example, Task, exact_match
from dume_ray.tasks.builtin import BUILTIN_TASKS, make_builtin_task
from dume_ray.tasks.files import load_task_from_source

__all__ = ["BUILTIN_TASKS", "SPLITS", "Example", "Task", "encode_rows", "exact_match", "load_tasks"]


def load_tasks(cfg: TasksConfig, tokenizer=None, max_seq_len: int | None = None) -> dict[str, Task]:
    """Every configured task, built-in first, in config order.

    With `tokenizer` and `max_seq_len`, examples longer than `max_seq_len` tokens are handled by
    `cfg.too_long`: "drop" (or `cfg.skip_bad_rows`) drops them, counted in `Task.skipped_rows`; "truncate" cuts
    their response to fit, counted in `Task.truncated_rows`; "error" keeps them, and `encode_rows` stops on the
    first one, naming its file and row.
    """
    tasks = {name: make_builtin_task(name, cfg.seed, cfg.num_train, cfg.num_validation, cfg.num_test)
             for name in cfg.builtin}
    for src in cfg.sources:
        tasks[src.name] = load_task_from_source(
            src.name, src.source, dict(src.data_files) or None, src.prompt_column, src.response_column,
            dict(src.hub_splits) or None, skip_bad_rows=cfg.skip_bad_rows, config=src.hub_config)
    policy = "drop" if cfg.skip_bad_rows and cfg.too_long == "error" else cfg.too_long
    if policy != "error" and tokenizer is not None and max_seq_len is not None:
        for task in tasks.values():
            _fit_too_long(task, tokenizer, max_seq_len, truncate=policy == "truncate")
    return tasks


def _fit_too_long(task: Task, tokenizer, max_seq_len: int, truncate: bool) -> None:
    """Drop (or, with `truncate`, cut the response of) every example over `max_seq_len` tokens, counting both."""
    for split, examples in task.splits.items():
        kept, cut = [], 0
        for example in examples:
            fitted = example if _fits(example, tokenizer, max_seq_len) else (
                _truncated(example, tokenizer, max_seq_len) if truncate else None)
            cut += fitted is not None and fitted is not example
            if fitted is not None:
                kept.append(fitted)
        if len(kept) < len(examples):
            if not kept:
                raise ValueError(f"task {task.name!r}: every {split} example is longer than model.max_seq_len={max_seq_len}")
            task.skipped_rows[split] = task.skipped_rows.get(split, 0) + len(examples) - len(kept)
        if cut:
            task.truncated_rows[split] = cut
        task.splits[split] = kept


def _fits(example: Example, tokenizer, max_seq_len: int) -> bool:
    try:
        encode_example(tokenizer, example.prompt, example.response, max_seq_len)
        return True
    except ValueError:
        return False


def _truncated(example: Example, tokenizer, max_seq_len: int) -> Example | None:
    """The example with its response cut to the longest token prefix that fits (re-checked after decoding,
    since text round-trips through a BPE tokenizer only approximately); None when nothing fits."""
    ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    for keep in range(len(ids) - 1, 0, -1):
        response = tokenizer.decode(ids[:keep])
        candidate = Example(example.prompt, response, example.source)
        if response.strip() and _fits(candidate, tokenizer, max_seq_len):
            return candidate
    return None


def encode_rows(tasks: dict[str, Task], tokenizer, split: str, max_seq_len: int,
                group_of: dict[str, str]) -> list[dict]:
    """Token ids of every example of `split`, tagged with its task, group and a stable example id.

    Raises:
        ValueError: naming the task, file and row of an example longer than `max_seq_len`
            (`tasks.skip_bad_rows=true` drops those in `load_tasks` instead).
    """
    rows = []
    for name, task in tasks.items():
        if name not in group_of:
            continue
        for i, example in enumerate(task.examples(split)):
            where = f"task {name!r} {example.source or f'{split} row {i}'}"
            encoded = encode_example(tokenizer, example.prompt, example.response, max_seq_len, where=where)
            rows.append({"example_id": f"{name}/{split}/{i}", "task": name, "group": group_of[name], **encoded})
    return rows
