"""Set partitions as restricted-growth strings: each partition enumerated once, the cap, encode/decode;
and the expert cache's build-once / reuse behaviour.

    .venv/bin/python -m pytest tests/unit/test_partitions.py -q
"""

import os

import pytest

from dume_ray.search.partitions import (bell_number, count_partitions, decode, decode_text, encode, encode_text,
                                        enumerate_rgs, parse_readable, readable)
from dume_ray.search.proxy import cached_expert

BELL = [1, 1, 2, 5, 15, 52, 203]
NAMES = ["copy", "reverse", "sort", "shift", "add", "sub"]


@pytest.mark.parametrize("n", range(7))
def test_enumeration_lists_each_partition_once_bell_numbers(n):
    rgs_list = enumerate_rgs(n, max_groups=max(n, 1))
    assert len(rgs_list) == BELL[n] == bell_number(n)
    partitions = {frozenset(frozenset(g) for g in decode(r, NAMES[:n])) for r in rgs_list}
    assert len(partitions) == len(rgs_list)  # no partition twice


@pytest.mark.parametrize("n, cap, expected", [(4, 1, 1), (4, 2, 8), (5, 3, 41), (6, 2, 32), (6, 6, 203)])
def test_group_cap_keeps_partitions_with_at_most_cap_groups(n, cap, expected):
    rgs_list = enumerate_rgs(n, cap)
    assert len(rgs_list) == expected == count_partitions(n, cap)  # sums of Stirling numbers S(n, k), k <= cap
    assert all(max(r) + 1 <= cap for r in rgs_list)


def test_encode_is_canonical_and_inverts_decode():
    groups = [["add", "sub"], ["copy", "sort"], ["reverse"], ["shift"]]
    rgs = encode(groups, NAMES)
    assert rgs == (0, 1, 0, 2, 3, 3)
    assert decode(rgs, NAMES) == [["copy", "sort"], ["reverse"], ["shift"], ["add", "sub"]]
    assert encode(list(reversed(groups)), NAMES) == rgs  # group order does not matter
    assert decode_text(encode_text(rgs)) == rgs


def test_readable_string_round_trips():
    groups = [["copy", "sort"], ["reverse"], ["add", "sub"]]
    assert readable(groups) == "copy+sort | reverse | add+sub"
    assert parse_readable(readable(groups)) == groups


@pytest.mark.parametrize("groups, message", [
    ([["copy", "upper"], ["reverse", "sort", "shift", "add", "sub"]], "unknown task 'upper'"),
    ([["copy", "reverse"], ["copy", "sort", "shift", "add", "sub"]], "more than one group"),
    ([["copy", "reverse"]], "in no group"),
])
def test_encode_rejects_bad_groupings(groups, message):
    with pytest.raises(ValueError, match=message):
        encode(groups, NAMES)


def test_invalid_restricted_growth_string_is_rejected():
    with pytest.raises(ValueError, match="restricted-growth"):
        decode((0, 2, 1, 0, 0, 0), NAMES)


def test_expert_cache_builds_once_then_hits(tmp_path):
    calls = []

    def build(out_dir):
        calls.append(out_dir)
        with open(os.path.join(out_dir, "weights"), "w") as f:
            f.write("x")

    first, hit1 = cached_expert(str(tmp_path), "abc", build)
    second, hit2 = cached_expert(str(tmp_path), "abc", build)
    assert (hit1, hit2) == (False, True) and first == second and len(calls) == 1
    assert os.path.exists(os.path.join(first, "weights"))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]  # temp folder renamed, none left


def test_failed_build_leaves_no_cache_entry(tmp_path):
    def broken(out_dir):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cached_expert(str(tmp_path), "abc", broken)
    assert not os.path.exists(tmp_path / "abc")


def test_expert_cache_race_keeps_the_first_entry_without_a_lock(tmp_path):
    """Two trials miss the cache at once (no lock): both build, the first rename wins, the loser returns the
    winner's whole entry and leaves no temp folder behind."""
    def build_as(tag):
        def build(out_dir):
            with open(os.path.join(out_dir, "weights"), "w") as f:
                f.write(tag)
            if tag == "loser":  # the winner finishes while the loser is still building
                cached_expert(str(tmp_path), "abc", build_as("winner"))
        return build

    entry, hit = cached_expert(str(tmp_path), "abc", build_as("loser"))
    assert not hit and open(os.path.join(entry, "weights")).read() == "winner"
    assert os.listdir(tmp_path) == ["abc"]
