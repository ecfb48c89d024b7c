"""Set partitions of the tasks (which tasks share an expert), encoded as restricted-growth strings.

A partition of n tasks into groups is written as a restricted-growth string (RGS) a_0 ... a_{n-1}:
a_i is the group of task i, a_0 = 0 and a_i <= 1 + max(a_0 .. a_{i-1}). Every partition has exactly one
RGS, so enumerating RGSs enumerates each partition once (there are Bell(n) of them: 1, 1, 2, 5, 15, 52,
203, ...). Tune sees a grouping as its RGS text ("0.1.0.2"), people see `copy+sort | reverse | add`.

    rgs_list = enumerate_rgs(6, max_groups=4)       # every grouping of 6 tasks into at most 4 groups
    groups = decode(rgs_list[7], ["copy", "reverse", "sort", "shift", "add", "sub"])
    readable(groups)                                # 'copy+reverse | sort | shift+add+sub' etc.

Pure: no Ray, no torch. Tested in tests/unit/test_partitions.py.
"""

from __future__ import annotations

from typing import Iterator, Sequence

RGS = tuple[int, ...]


def iter_rgs(n: int, max_groups: int) -> Iterator[RGS]:
    """Every restricted-growth string of length n with at most `max_groups` distinct values, lexicographic."""
    if n < 0 or max_groups < 1:
        raise ValueError(f"need n >= 0 and max_groups >= 1, got n={n}, max_groups={max_groups}")

    def extend(prefix: list[int], used: int) -> Iterator[RGS]:
        if len(prefix) == n:
            yield tuple(prefix)
            return
        for value in range(min(used + 1, max_groups)):
            yield from extend(prefix + [value], max(used, value + 1))

    yield from extend([], 0)


def enumerate_rgs(n: int, max_groups: int) -> list[RGS]:
    return list(iter_rgs(n, max_groups))


def decode(rgs: Sequence[int], names: Sequence[str]) -> list[list[str]]:
    """RGS -> groups of task names, groups in order of first appearance, tasks in `names` order."""
    if len(rgs) != len(names):
        raise ValueError(f"grouping {encode_text(rgs)!r} has {len(rgs)} entries for {len(names)} tasks {list(names)}")
    check_rgs(rgs)
    groups: list[list[str]] = [[] for _ in range(max(rgs) + 1 if rgs else 0)]
    for name, group in zip(names, rgs):
        groups[group].append(name)
    return groups


def encode(groups: Sequence[Sequence[str]], names: Sequence[str]) -> RGS:
    """Groups of task names -> the partition's canonical RGS over `names` (group order does not matter).

    Raises:
        ValueError: naming an unknown task, a task in two groups, a task in none, or an empty group.
    """
    known = set(names)
    where: dict[str, int] = {}
    for i, group in enumerate(groups):
        if not group:
            raise ValueError(f"grouping: group {i} is empty")
        for task in group:
            if task not in known:
                raise ValueError(f"grouping names unknown task {task!r}; tasks are {list(names)}")
            if task in where:
                raise ValueError(f"grouping: task {task!r} is in more than one group")
            where[task] = i
    missing = [t for t in names if t not in where]
    if missing:
        raise ValueError(f"grouping: task(s) {missing} are in no group")
    relabel: dict[int, int] = {}
    return tuple(relabel.setdefault(where[t], len(relabel)) for t in names)


def check_rgs(rgs: Sequence[int]) -> None:
    top = -1
    for i, value in enumerate(rgs):
        if not 0 <= value <= top + 1:
            raise ValueError(f"{encode_text(rgs)!r} is not a restricted-growth string (position {i})")
        top = max(top, value)


def encode_text(rgs: Sequence[int]) -> str:
    """RGS as Tune-friendly text: '0.1.0.2' (dots, so 10+ groups stay unambiguous)."""
    return ".".join(str(v) for v in rgs)


def decode_text(text: str) -> RGS:
    rgs = tuple(int(v) for v in text.split(".")) if text else ()
    check_rgs(rgs)
    return rgs


def readable(groups: Sequence[Sequence[str]]) -> str:
    """`copy+upper | reverse | add+sub`: what dashboards and reports show."""
    return " | ".join("+".join(g) for g in groups)


def parse_readable(text: str) -> list[list[str]]:
    """Inverse of `readable` (task names must not contain '+' or '|')."""
    return [[t.strip() for t in part.split("+")] for part in text.split("|")]


def bell_number(n: int) -> int:
    """Number of set partitions of n items (Bell triangle)."""
    row = [1]
    for _ in range(n):
        nxt = [row[-1]]
        for value in row:
            nxt.append(nxt[-1] + value)
        row = nxt
    return row[0]


def count_partitions(n: int, max_groups: int) -> int:
    """Partitions of n items into at most `max_groups` groups: sum of Stirling numbers S(n, k), k <= cap."""
    # S(i, k) = k * S(i-1, k) + S(i-1, k-1), one row at a time.
    stirling = [1] + [0] * max_groups
    for _ in range(n):
        stirling = [0] + [k * stirling[k] + stirling[k - 1] for k in range(1, max_groups + 1)]
    return sum(stirling)
