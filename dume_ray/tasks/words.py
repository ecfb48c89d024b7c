"""Built-in word-level tasks for PRETRAINED language models, generated deterministically from a seed.

The character puzzles in :mod:`dume_ray.tasks.builtin` suit the tiny char-level model; these suit a real
BPE model. Each input is 3 to 5 DISTINCT words from :data:`WORDS` (common lowercase English words that
GPT-2's and Qwen's BPE vocabularies both encode as one token, with or without a leading space), so a
prompt costs about one token per word plus a short instruction. Every task draws its inputs from the
same stream, so the tasks CONFLICT: the same words need a different answer per task and only the
instruction tells them apart.

Every prompt is ``"<instruction> <words>\\n"``; for the words ``apple tree house``:

* ``reverse_words``: ``"Reverse the words: apple tree house\\n"`` -> ``"house tree apple"``
* ``sort_words``: ``"Sort the words alphabetically: apple tree house\\n"`` -> ``"apple house tree"``
* ``upper_words``: ``"Upper case the words: apple tree house\\n"`` -> ``"APPLE TREE HOUSE"``
* ``rotate_words``: ``"Move the first word to the end: apple tree house\\n"`` -> ``"tree house apple"``
* ``initials``: ``"First letters of the words: apple tree house\\n"`` -> ``"ath"``
* ``reverse_upper``: ``"Reverse and upper case the words: apple tree house\\n"`` -> ``"HOUSE TREE APPLE"``

``reverse_upper`` needs two skills at once (``reverse_words`` and ``upper_words``; its instruction joins
theirs), to see whether a consolidated model can combine two experts' skills.

The prompt ends with a newline because :mod:`dume_ray.data.encode` tokenizes the response on its own:
its first word is the bare token (``"house"``, not ``" house"``), which reads naturally after a line
break and would otherwise be glued to the last input word.

Inputs already in alphabetical order, or in reverse alphabetical order, are never drawn (for every
task alike, so the input distribution stays shared). With distinct words that makes every answer
differ from its input words, so copying the input never scores, and ``reverse_words`` and
``sort_words`` disagree on every input.

All tasks of one seed use the same inputs in the same order (the stream is seeded with
``f"{seed}:words"``, not with the task name), and every task splits them the same way: test first,
then validation, then train. So a test input of one word task is never a training input of another,
and a task's data never depends on which other tasks are configured.

Test with::

    .venv/bin/python -m pytest tests/unit/test_word_tasks.py -q
"""

from __future__ import annotations

import functools
import math
import random
from typing import Callable, Sequence

from dume_ray.tasks.base import Example, Task, draw_distinct

#: Common lowercase English words, each one BPE token in GPT-2 and Qwen, with or without a leading space.
WORDS: tuple[str, ...] = (
    "air", "apple", "arm", "art", "baby", "bag", "ball", "band", "bank", "bar",
    "bear", "bed", "bell", "bike", "bird", "black", "blue", "boat", "body", "bone",
    "book", "boot", "box", "boy", "bread", "bus", "cake", "cap", "car", "card",
    "cat", "chain", "chair", "city", "clock", "cloud", "club", "coat", "coin", "color",
    "cook", "corn", "cow", "cross", "cup", "day", "dog", "door", "dream", "dress",
    "ear", "earth", "egg", "eye", "face", "fan", "farm", "field", "film", "fire",
    "fish", "flag", "floor", "flower", "food", "foot", "fork", "friend", "frog", "fruit",
    "game", "gas", "gate", "girl", "glass", "gold", "grass", "green", "hair", "hall",
    "hand", "hat", "head", "heart", "hill", "hole", "home", "hook", "horse", "house",
    "ice", "iron", "jar", "job", "key", "kid", "king", "knife", "lake", "land",
    "leaf", "leg", "letter", "light", "line", "lock", "mail", "map", "metal", "money",
    "moon", "mother", "mouse", "music", "name", "net", "night", "note", "oil", "orange",
    "owl", "page", "pair", "pan", "paper", "park", "party", "path", "peace", "pen",
    "phone", "photo", "pie", "pipe", "plane", "plant", "plate", "pool", "radio", "rain",
    "red", "rice", "ring", "river", "road", "rock", "room", "rose", "sand", "school",
    "sea", "seed", "ship", "shirt", "shop", "sky", "song", "spring", "square", "stone",
    "story", "street", "sun", "table", "tail", "team", "time", "tool", "top", "tower",
    "town", "train", "tree", "voice", "wall", "watch", "water", "wave", "week", "wheel",
    "white", "wind", "window", "wine", "wing", "winter", "wire", "wolf", "wood", "world",
    "yard", "year", "yellow", "young", "zero",
)

MIN_WORDS = 3
MAX_WORDS = 5

#: Config names (``tasks.builtin``) of the word tasks, in documentation order.
WORD_TASK_NAMES: tuple[str, ...] = (
    "reverse_words", "sort_words", "upper_words", "rotate_words", "initials", "reverse_upper",
)

#: Instruction that starts each task's prompt; the words follow after one space.
INSTRUCTIONS: dict[str, str] = {
    "reverse_words": "Reverse the words:",
    "sort_words": "Sort the words alphabetically:",
    "upper_words": "Upper case the words:",
    "rotate_words": "Move the first word to the end:",
    "initials": "First letters of the words:",
    "reverse_upper": "Reverse and upper case the words:",
}

#: The answer of each task as a function of the input words.
ANSWERS: dict[str, Callable[[Sequence[str]], str]] = {
    "reverse_words": lambda w: " ".join(reversed(w)),
    "sort_words": lambda w: " ".join(sorted(w)),
    "upper_words": lambda w: " ".join(x.upper() for x in w),
    "rotate_words": lambda w: " ".join([*w[1:], w[0]]),
    "initials": lambda w: "".join(x[0] for x in w),
    "reverse_upper": lambda w: " ".join(x.upper() for x in reversed(w)),
}


def draw_words(rng: random.Random, vocabulary: Sequence[str] = WORDS) -> tuple[str, ...]:
    """Draws one input: 3 to 5 distinct words, neither in alphabetical nor in reverse alphabetical order.

    Shared by every word task, which is what gives them one input distribution: the same ``rng``
    state yields the same words whatever the task.
    """
    while True:
        words = tuple(rng.sample(list(vocabulary), rng.randint(MIN_WORDS, MAX_WORDS)))
        ordered = sorted(words)
        if list(words) != ordered and list(words) != ordered[::-1]:
            return words


def make_example(name: str, words: Sequence[str]) -> Example:
    """The example of task ``name`` for input ``words``: ``"<instruction> w1 w2 w3\\n"`` -> answer."""
    return Example(f"{INSTRUCTIONS[name]} {' '.join(words)}\n", ANSWERS[name](words))


def word_example(name: str, rng: random.Random) -> Example:
    """Draws one example of task ``name`` (see :func:`draw_words`)."""
    return make_example(name, draw_words(rng))


#: Word task name -> example generator, shaped like :data:`dume_ray.tasks.builtin.BUILTIN_TASKS`.
WORD_TASKS: dict[str, Callable[[random.Random], Example]] = {
    name: functools.partial(word_example, name) for name in WORD_TASK_NAMES
}


def input_space_size(vocabulary: Sequence[str] = WORDS) -> int:
    """Number of distinct inputs :func:`draw_words` can produce (the same for every word task).

    Ordered selections of k distinct words, less the two monotone orders of each k-subset.
    """
    n = len(vocabulary)
    return sum(math.perm(n, k) - 2 * math.comb(n, k) for k in range(MIN_WORDS, MAX_WORDS + 1))


def _check_vocabulary(name: str, vocabulary: Sequence[str]) -> None:
    if len(set(vocabulary)) != len(vocabulary) or len(vocabulary) < MAX_WORDS:
        raise ValueError(
            f"task {name!r}: the vocabulary needs at least {MAX_WORDS} distinct words, "
            f"got {len(vocabulary)} ({len(set(vocabulary))} distinct)"
        )
    bad = [w for w in vocabulary if not (w.isalpha() and w.islower())]
    if bad:
        raise ValueError(f"task {name!r}: vocabulary words must be lowercase letters only, got {bad[:5]}")


def make_word_task(
    name: str,
    seed: int,
    num_train: int,
    num_validation: int,
    num_test: int,
    *,
    vocabulary: Sequence[str] = WORDS,
) -> Task:
    """Generates a word task with disjoint splits (no input appears twice in the task).

    Inputs come from one stream seeded with ``f"{seed}:words"``, shared by all word tasks, and fill
    ``test`` first, then ``validation``, then ``train``, so evaluation sets stay the same when only
    ``num_train`` changes and every word task of a seed sees the same inputs in the same splits.

    Args:
        name: One of :data:`WORD_TASK_NAMES`.
        seed: Base seed; equal seeds give equal tasks.
        num_train: Number of training examples.
        num_validation: Number of validation examples.
        num_test: Number of test examples.
        vocabulary: Words to draw from (default :data:`WORDS`); distinct, lowercase, at least
            :data:`MAX_WORDS` of them.

    Returns:
        The task, scored with exact match.

    Raises:
        ValueError: If ``name`` is unknown, a size is negative, the vocabulary is unusable, or the
            sizes add up to more distinct inputs than the vocabulary allows (the message names the
            task, the three counts and the number of distinct inputs).
    """
    if name not in WORD_TASKS:
        raise ValueError(f"unknown word task {name!r}; known word tasks: {list(WORD_TASK_NAMES)}")
    sizes = {"train": num_train, "validation": num_validation, "test": num_test}
    for split, size in sizes.items():
        if size < 0:
            raise ValueError(f"task {name!r}: num_{split} must be >= 0, got {size}")
    _check_vocabulary(name, vocabulary)

    total = sum(sizes.values())
    space = input_space_size(vocabulary)
    if total > space:
        raise ValueError(
            f"task {name!r}: requested {total} distinct examples "
            f"(train {num_train} + validation {num_validation} + test {num_test}) "
            f"but its input space only has {space} distinct inputs "
            f"({len(vocabulary)} words, {MIN_WORDS} to {MAX_WORDS} per input)"
        )

    rng = random.Random(f"{seed}:words")
    inputs = draw_distinct(lambda: draw_words(rng, vocabulary), lambda words: words, total, name, space, "inputs")

    examples = [make_example(name, words) for words in inputs]
    test = examples[:num_test]
    validation = examples[num_test : num_test + num_validation]
    train = examples[num_test + num_validation :]
    return Task(name=name, splits={"train": train, "validation": validation, "test": test})
