"""`worker_utils.batch_stream` with `keep_in_memory`: the first epoch streams from the Ray Data shard, later
epochs are seeded permutations of the same rows in the worker (no new Ray Data execution per epoch). A fake
shard stands in for `ray.train.get_dataset_shard`, so no Ray cluster is needed.

Run: .venv/bin/python -m pytest tests/unit/test_batch_stream.py -q
"""

import itertools

import numpy as np

from dume_ray import worker_utils
from dume_ray.data.encode import batch_rows, collate


class FakeShard:
    def __init__(self, rows):
        self.rows, self.executions = rows, 0

    def iter_batches(self, batch_size, **_):
        self.executions += 1
        for start in range(0, len(self.rows), batch_size):
            chunk = self.rows[start:start + batch_size]
            ids = np.empty(len(chunk), dtype=object)
            ids[:] = [np.asarray(r["input_ids"]) for r in chunk]
            yield {"example_id": np.array([r["example_id"] for r in chunk], dtype=object), "input_ids": ids,
                   "response_start": np.array([r["response_start"] for r in chunk])}


def _rows(n):
    return [{"example_id": f"t/train/{i}", "input_ids": list(range(3 + i % 4)), "response_start": 2} for i in range(n)]


def test_later_epochs_come_from_memory_with_every_row_once_per_epoch(monkeypatch):
    shard = FakeShard(_rows(10))
    monkeypatch.setattr(worker_utils.ray.train, "get_dataset_shard", lambda name: shard)
    stream = worker_utils.batch_stream("train", 4, seed=0, keep_in_memory=True)
    first = list(itertools.islice(stream, 3))  # epoch 1: 4 + 4 + 2 rows, from the shard
    later = list(itertools.islice(stream, 6))  # epochs 2 and 3, from memory
    assert shard.executions == 1
    for epoch in (later[:3], later[3:]):
        assert sorted(i for b in epoch for i in b["example_id"]) == sorted(r["example_id"] for r in _rows(10))
    assert [list(b["example_id"]) for b in later[:3]] != [list(b["example_id"]) for b in later[3:]]  # reshuffled
    for batch in first + later:  # both shapes collate the same way for the training step
        collate(batch_rows(batch), pad_id=0)


def test_without_keep_in_memory_every_epoch_reads_the_shard(monkeypatch):
    shard = FakeShard(_rows(10))
    monkeypatch.setattr(worker_utils.ray.train, "get_dataset_shard", lambda name: shard)
    list(itertools.islice(worker_utils.batch_stream("train", 4, seed=0), 9))
    assert shard.executions == 3


def _ids(batches):
    return [list(b["example_id"]) for b in batches]


def test_a_resumed_ordered_stream_continues_the_schedule_where_the_checkpoint_left_it(monkeypatch):
    # sequential/annealed teachers: the stream's order is the schedule, so a job resumed at step 3 must train on
    # the batches an uninterrupted job trains on from step 3, not restart the schedule's opening
    monkeypatch.setattr(worker_utils.ray.train, "get_dataset_shard", lambda name: FakeShard(_rows(20)))

    def make(seed):
        return worker_utils.batch_stream("train", 4, seed=seed, keep_in_memory=True)

    whole = list(itertools.islice(worker_utils.resumed_stream(make, 7, 0, ordered=True), 8))
    resumed = list(itertools.islice(worker_utils.resumed_stream(make, 7, 3, ordered=True), 5))
    assert _ids(resumed) == _ids(whole[3:])
    restarted = list(itertools.islice(make(7), 5))
    assert _ids(restarted) != _ids(whole[3:])  # what resuming did before: the schedule's opening again


def test_a_resumed_mixed_stream_is_reseeded_by_the_step():
    seeds = []
    worker_utils.resumed_stream(lambda seed: seeds.append(seed) or iter(()), 7, 3, ordered=False)
    assert seeds == [10]
