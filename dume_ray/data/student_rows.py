"""Which training rows the student reads: the one function the soft-target scorers and the student both call.

The student (and the multitask baseline) trains for `steps` steps of `batch_size` rows: it reads
`budget = steps x batch_size` rows. When that is at least every training row of every group, it reads them
all (several epochs, as before). When it is fewer, its epoch is a seeded subset: every row gets a key from
(seed, example id) alone, and the epoch is the `budget` rows with the smallest keys over all groups. That is
the same draw as "the first `budget` rows of one seeded shuffle of every row" (what the student read before
the subset existed), so each group's share of the reads is its share of the rows, in expectation.

Scoring exactly these rows (`soft_targets.rows=read`, the default) instead of every row is what this buys: on
SmolLM2 with 6,000 training rows and a student reading 720, the soft-targets stage took 0.19 of the time it
took for every row (benchmarks/results/soft_rows.json). And since a row's
key never depends on the other rows, the subsets nest:

* a smaller budget reads a subset of a larger one's rows (a continued student after `add-task` reads rows
  its parent's soft targets already hold);
* more rows (a group added) only push rows out of the other groups' subsets, never in; fewer rows (a group
  removed) can pull rows in, so the soft_targets stage rescores a kept group that now holds too few
  (`soft_targets.launch.short_groups`).

    from dume_ray.data.student_rows import rows_read
    keep = rows_read(["copy/train/0", ...], budget=720, seed=0)     # a set of example ids

Pure: no Ray here. Tested in tests/unit/test_student_rows.py.
"""

from __future__ import annotations

import hashlib
import heapq
from typing import Iterable, Optional, Sequence


def row_key(seed: int, example_id: str) -> int:
    """The row's place in the student's seeded draw: a 64-bit hash of (seed, example id), stable across
    processes and Python versions (unlike `hash()`)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{example_id}".encode(), digest_size=8).digest(), "big")


def rows_read(example_ids: Sequence[str], budget: Optional[int], seed: int) -> set[str]:
    """The example ids the student reads out of `example_ids` (every training row of every group it learns):
    all of them when `budget` is None or covers them, else the `budget` with the smallest `row_key`.

    Raises:
        ValueError: an id appears twice (the ids must name rows uniquely) or the budget is negative.
    """
    ids = set(example_ids)
    if len(ids) != len(example_ids):
        seen: set[str] = set()
        twice = next(e for e in example_ids if e in seen or seen.add(e))
        raise ValueError(f"example id {twice!r} appears twice: rows must have unique ids")
    if budget is not None and budget < 0:
        raise ValueError(f"budget must be >= 0 rows, got {budget}")
    if budget is None or budget >= len(ids):
        return ids
    return set(heapq.nsmallest(budget, example_ids, key=lambda e: (row_key(seed, e), e)))


def train_ids(tasks: dict, names: Iterable[str]) -> list[str]:
    """The example ids of the training rows of `names` (tasks as `tasks.load_tasks` returns them), the ids
    `tasks.encode_rows` gives them, without tokenizing anything."""
    return [f"{name}/train/{i}" for name in names for i in range(len(tasks[name].examples("train")))]


def every_group_train_ids(tasks: dict, groups: dict[str, list[str]]) -> list[str]:
    """The example ids of every training row of every task in `groups` (`cfg.groups`: group -> task names): the
    ids the student's draw is made from, for the student and baseline (distill.launch) and both scorers
    (experts.launch.scored_rows) alike."""
    return train_ids(tasks, [name for names in groups.values() for name in names])


def keep_rows(rows: list[dict], keep: set[str]) -> list[dict]:
    """The encoded rows whose example id is in `keep`, in their own order."""
    return [row for row in rows if row["example_id"] in keep]
