"""Built-in synthetic tasks, generated deterministically from a seed.

The tasks come in two families whose members deliberately CONFLICT: they see
the same kind of input but require different outputs, so one set of weights
trained on all of them has to rely on the short task tag in the prompt. That
is what makes per-task experts (and distilling them) worthwhile.

* String family, words over the letters ``a``..``h`` of length 3..6:
  ``copy`` (``"cp abcd="`` -> ``"abcd"``), ``reverse`` (``"rv abcd="`` ->
  ``"dcba"``), ``sort`` (``"so dbca="`` -> ``"abcd"``) and ``shift`` (each
  letter moves one step along the alphabet, wrapping ``h`` to ``a``:
  ``"sh abh="`` -> ``"bca"``).
* Number family, operands 0..99: ``add`` (``"ad 37,25="`` -> ``"62"``) and
  ``sub`` (``"sb 37,25="`` -> ``"12"``; the first operand is never smaller, so
  results are non-negative).

Sizes are kept small so a tiny 2-layer model can learn them.

:func:`make_builtin_task` also builds the word-level tasks for pretrained
models (``reverse_words``, ``sort_words``, ``upper_words``, ``rotate_words``,
``initials``, ``reverse_upper``); they live in :mod:`dume_ray.tasks.words`
and are not in :data:`BUILTIN_TASKS`, which stays the character family.

Test with::

    .venv/bin/python -m pytest tests/unit/test_tasks.py -q
"""

from __future__ import annotations

import random
from typing import Callable

from dume_ray.tasks.base import Example, Task, draw_distinct
from dume_ray.tasks.words import WORD_TASKS, make_word_task
from dume_ray.tasks.words import input_space_size as word_input_space_size

LETTERS = "abcdefgh"
MIN_STRING_LEN = 3
MAX_STRING_LEN = 6
MAX_OPERAND = 99

#: Short tag put at the start of each prompt so the task is identifiable.
TASK_TAGS: dict[str, str] = {
    "copy": "cp",
    "reverse": "rv",
    "sort": "so",
    "shift": "sh",
    "add": "ad",
    "sub": "sb",
}

#: Tasks whose generator takes a ``max_len`` keyword (the string family).
STRING_TASKS = frozenset({"copy", "reverse", "sort", "shift"})


def _random_word(rng: random.Random, max_len: int) -> str:
    """Draws a word over :data:`LETTERS`; shared by the whole string family.

    Sharing this one function is what guarantees the conflicting string tasks
    have identical input distributions.
    """
    length = rng.randint(MIN_STRING_LEN, max_len)
    return "".join(rng.choice(LETTERS) for _ in range(length))


def _shift_letter(ch: str) -> str:
    return LETTERS[(LETTERS.index(ch) + 1) % len(LETTERS)]


def copy_example(rng: random.Random, max_len: int = MAX_STRING_LEN) -> Example:
    """``"cp abcd="`` -> ``"abcd"``."""
    word = _random_word(rng, max_len)
    return Example(f"{TASK_TAGS['copy']} {word}=", word)


def reverse_example(rng: random.Random, max_len: int = MAX_STRING_LEN) -> Example:
    """``"rv abcd="`` -> ``"dcba"``."""
    word = _random_word(rng, max_len)
    return Example(f"{TASK_TAGS['reverse']} {word}=", word[::-1])


def sort_example(rng: random.Random, max_len: int = MAX_STRING_LEN) -> Example:
    """``"so dbca="`` -> ``"abcd"``."""
    word = _random_word(rng, max_len)
    return Example(f"{TASK_TAGS['sort']} {word}=", "".join(sorted(word)))


def shift_example(rng: random.Random, max_len: int = MAX_STRING_LEN) -> Example:
    """``"sh abh="`` -> ``"bca"`` (``h`` wraps around to ``a``)."""
    word = _random_word(rng, max_len)
    return Example(f"{TASK_TAGS['shift']} {word}=", "".join(_shift_letter(c) for c in word))


def add_example(rng: random.Random) -> Example:
    """``"ad 37,25="`` -> ``"62"``."""
    a = rng.randint(0, MAX_OPERAND)
    b = rng.randint(0, MAX_OPERAND)
    return Example(f"{TASK_TAGS['add']} {a},{b}=", str(a + b))


def sub_example(rng: random.Random) -> Example:
    """``"sb 37,25="`` -> ``"12"``; operands are ordered so the result is >= 0."""
    x = rng.randint(0, MAX_OPERAND)
    y = rng.randint(0, MAX_OPERAND)
    a, b = max(x, y), min(x, y)
    return Example(f"{TASK_TAGS['sub']} {a},{b}=", str(a - b))


BUILTIN_TASKS: dict[str, Callable[[random.Random], Example]] = {
    "copy": copy_example,
    "reverse": reverse_example,
    "sort": sort_example,
    "shift": shift_example,
    "add": add_example,
    "sub": sub_example,
}


def input_space_size(name: str, max_string_len: int = MAX_STRING_LEN) -> int:
    """Number of distinct prompts a built-in task can produce.

    Args:
        name: Built-in task name (a character task or a word task).
        max_string_len: Longest word for the string family (ignored by the
            other tasks).

    Returns:
        The count of distinct prompts.

    Raises:
        ValueError: If ``name`` is not a built-in task.
    """
    _check_name(name)
    if name in WORD_TASKS:
        return word_input_space_size()
    if name in STRING_TASKS:
        return sum(len(LETTERS) ** n for n in range(MIN_STRING_LEN, max_string_len + 1))
    n = MAX_OPERAND + 1
    if name == "sub":
        return n * (n + 1) // 2  # unordered pairs with repetition: a >= b
    return n * n


def _check_name(name: str) -> None:
    if name not in BUILTIN_TASKS and name not in WORD_TASKS:
        raise ValueError(
            f"unknown built-in task {name!r}; known tasks: {sorted(BUILTIN_TASKS)} "
            f"and word tasks: {list(WORD_TASKS)}"
        )


def make_builtin_task(
    name: str,
    seed: int,
    num_train: int,
    num_validation: int,
    num_test: int,
    *,
    max_string_len: int = MAX_STRING_LEN,
) -> Task:
    """Generates a built-in task with disjoint, deduplicated splits.

    Examples are drawn from one stream seeded with ``f"{seed}:{name}"`` so that
    adding or reordering tasks never changes another task's data. The stream
    fills ``test`` first, then ``validation``, then ``train``: evaluation sets
    therefore stay the same when only ``num_train`` changes. Every prompt
    appears at most once across all splits, so no test or validation prompt is
    ever seen in training.

    Args:
        name: Key of :data:`BUILTIN_TASKS`, or of
            :data:`dume_ray.tasks.words.WORD_TASKS` (built by
            :func:`dume_ray.tasks.words.make_word_task`, whose inputs are
            shared by all word tasks of a seed).
        seed: Base seed; equal seeds give equal tasks.
        num_train: Number of training examples.
        num_validation: Number of validation examples.
        num_test: Number of test examples.
        max_string_len: Longest word for the string family (ignored by the
            number family and the word tasks); at least :data:`MIN_STRING_LEN`.

    Returns:
        The task, scored with exact match.

    Raises:
        ValueError: If ``name`` is unknown (the message lists known names), a
            size is negative, ``max_string_len`` is too small, or the task's
            input space cannot supply that many distinct prompts.
    """
    _check_name(name)
    if name in WORD_TASKS:
        return make_word_task(name, seed, num_train, num_validation, num_test)
    sizes = {"train": num_train, "validation": num_validation, "test": num_test}
    for split, size in sizes.items():
        if size < 0:
            raise ValueError(f"task {name!r}: num_{split} must be >= 0, got {size}")
    if max_string_len < MIN_STRING_LEN:
        raise ValueError(
            f"task {name!r}: max_string_len must be >= {MIN_STRING_LEN}, got {max_string_len}"
        )

    total = sum(sizes.values())
    space = input_space_size(name, max_string_len)
    if total > space:
        raise ValueError(
            f"task {name!r}: requested {total} distinct examples "
            f"(train {num_train} + validation {num_validation} + test {num_test}) "
            f"but its input space only has {space} distinct prompts"
        )

    generator = BUILTIN_TASKS[name]
    draw: Callable[[random.Random], Example]
    if name in STRING_TASKS:
        draw = lambda r: generator(r, max_len=max_string_len)  # noqa: E731
    else:
        draw = generator

    rng = random.Random(f"{seed}:{name}")
    unique = draw_distinct(lambda: draw(rng), lambda e: e.prompt, total, name, space, "prompts")
    test = unique[:num_test]
    validation = unique[num_test : num_test + num_validation]
    train = unique[num_test + num_validation :]
    return Task(name=name, splits={"train": train, "validation": validation, "test": test})
