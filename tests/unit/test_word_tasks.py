"""Unit tests for the word-level built-in tasks (dume_ray.tasks.words) and their registration.

Run with::

    cd /work/main && .venv/bin/python -m pytest tests/unit/test_word_tasks.py -q -p no:xdist
"""

from __future__ import annotations

import random

import pytest

from dume_ray.config import BUILTIN_TASK_NAMES, TasksConfig
from dume_ray.tasks import load_tasks
from dume_ray.tasks.base import SPLITS
from dume_ray.tasks.builtin import BUILTIN_TASKS, input_space_size, make_builtin_task
from dume_ray.tasks.words import (
    MAX_WORDS,
    MIN_WORDS,
    WORD_TASK_NAMES,
    WORD_TASKS,
    WORDS,
    make_word_task,
)
from dume_ray.tasks.words import input_space_size as word_input_space_size

EXPECTED_NAMES = ("reverse_words", "sort_words", "upper_words", "rotate_words", "initials", "reverse_upper")

#: Instruction of each task, written out here so the tests do not trust words.py's table.
INSTRUCTION = {
    "reverse_words": "Reverse the words:",
    "sort_words": "Sort the words alphabetically:",
    "upper_words": "Upper case the words:",
    "rotate_words": "Move the first word to the end:",
    "initials": "First letters of the words:",
    "reverse_upper": "Reverse and upper case the words:",
}


def _words_of(name: str, prompt: str) -> list[str]:
    """The input words of a prompt, parsed from its text alone."""
    prefix = INSTRUCTION[name] + " "
    assert prompt.startswith(prefix) and prompt.endswith("\n"), prompt
    return prompt[len(prefix) : -1].split(" ")


def _expected(name: str, words: list[str]) -> str:
    """Independent re-implementation of each task's answer."""
    if name == "reverse_words":
        return " ".join(words[::-1])
    if name == "sort_words":
        out = list(words)
        out.sort()
        return " ".join(out)
    if name == "upper_words":
        return " ".join(w.upper() for w in words)
    if name == "rotate_words":
        return " ".join(words[1:] + words[:1])
    if name == "initials":
        return "".join(w[:1] for w in words)
    if name == "reverse_upper":
        return " ".join(w.upper() for w in words[::-1])
    raise AssertionError(name)


def _task(name: str, seed: int = 0, n_train: int = 200, n_val: int = 30, n_test: int = 40):
    return make_builtin_task(name, seed, n_train, n_val, n_test)


# ---------------------------------------------------------------- names and registration


def test_word_task_names_are_the_six_documented_tasks_in_order():
    assert WORD_TASK_NAMES == EXPECTED_NAMES
    assert isinstance(WORD_TASK_NAMES, tuple)
    assert list(WORD_TASKS) == list(EXPECTED_NAMES)


def test_word_tasks_are_in_config_builtin_names_and_character_tasks_unchanged():
    assert BUILTIN_TASK_NAMES[:6] == ["copy", "reverse", "sort", "shift", "add", "sub"]
    assert set(EXPECTED_NAMES) <= set(BUILTIN_TASK_NAMES)
    # BUILTIN_TASKS stays the character family (tests/unit/test_tasks.py parametrizes over it).
    assert set(BUILTIN_TASKS) == {"copy", "reverse", "sort", "shift", "add", "sub"}


def test_every_word_task_loads_through_load_tasks():
    cfg = TasksConfig(builtin=list(EXPECTED_NAMES), num_train=20, num_validation=5, num_test=7)
    tasks = load_tasks(cfg)
    assert list(tasks) == list(EXPECTED_NAMES)
    for name, task in tasks.items():
        assert task.name == name and task.metric == "exact_match"
        assert [len(task.examples(s)) for s in SPLITS] == [20, 5, 7]


def test_make_builtin_task_and_make_word_task_build_the_same_task():
    for name in EXPECTED_NAMES:
        assert make_builtin_task(name, 4, 30, 5, 5).splits == make_word_task(name, 4, 30, 5, 5).splits


def test_unknown_task_error_lists_word_tasks_too():
    with pytest.raises(ValueError) as info:
        make_builtin_task("shuffle_words", 0, 1, 1, 1)
    for name in EXPECTED_NAMES:
        assert name in str(info.value)


# ---------------------------------------------------------------- word list


def test_word_list_is_150_to_250_distinct_short_lowercase_words():
    assert 150 <= len(WORDS) <= 250
    assert len(set(WORDS)) == len(WORDS)
    assert all(w.isalpha() and w.islower() and w.isascii() and 2 <= len(w) <= 6 for w in WORDS)


# ---------------------------------------------------------------- determinism, sizes, splits


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_word_task_same_seed_gives_identical_task(name):
    assert _task(name, seed=7).splits == _task(name, seed=7).splits


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_word_task_different_seed_gives_different_task(name):
    a, b = _task(name, seed=1), _task(name, seed=2)
    for split in SPLITS:
        assert a.examples(split) != b.examples(split)


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_word_task_splits_have_requested_sizes_and_are_disjoint_by_input(name):
    task = _task(name, n_train=500, n_val=50, n_test=80)
    assert [len(task.examples(s)) for s in SPLITS] == [500, 50, 80]
    inputs = {s: [tuple(_words_of(name, ex.prompt)) for ex in task.examples(s)] for s in SPLITS}
    every = [x for s in SPLITS for x in inputs[s]]
    assert len(every) == len(set(every)), "an input appears twice within or across splits"


def test_word_task_zero_sized_splits_are_empty():
    task = make_builtin_task("sort_words", 0, 10, 0, 0)
    assert [len(task.examples(s)) for s in SPLITS] == [10, 0, 0]


def test_word_task_test_split_unchanged_when_only_num_train_changes():
    small = make_builtin_task("rotate_words", 5, 10, 20, 30)
    large = make_builtin_task("rotate_words", 5, 400, 20, 30)
    assert small.examples("test") == large.examples("test")
    assert small.examples("validation") == large.examples("validation")


def test_word_task_negative_size_is_rejected_naming_task_and_split():
    with pytest.raises(ValueError, match="'initials'.*num_validation"):
        make_builtin_task("initials", 0, 10, -1, 5)


# ---------------------------------------------------------------- inputs and answers


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_word_task_inputs_are_3_to_5_distinct_listed_words(name):
    task = _task(name, n_train=600)
    lengths = set()
    for split in SPLITS:
        for ex in task.examples(split):
            words = _words_of(name, ex.prompt)
            lengths.add(len(words))
            assert len(set(words)) == len(words), ex
            assert all(w in WORDS for w in words), ex
    assert lengths == set(range(MIN_WORDS, MAX_WORDS + 1))


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_word_task_answers_match_independent_reimplementation(name):
    task = _task(name, seed=3)
    for split in SPLITS:
        for ex in task.examples(split):
            assert ex.response == _expected(name, _words_of(name, ex.prompt)), ex


def test_word_task_documented_examples_hold():
    words = ["apple", "tree", "house"]
    assert _expected("reverse_words", words) == "house tree apple"
    assert _expected("sort_words", words) == "apple house tree"
    assert _expected("upper_words", words) == "APPLE TREE HOUSE"
    assert _expected("rotate_words", words) == "tree house apple"
    assert _expected("initials", words) == "ath"
    assert _expected("reverse_upper", words) == "HOUSE TREE APPLE"
    from dume_ray.tasks.words import make_example

    ex = make_example("reverse_words", words)
    assert (ex.prompt, ex.response) == ("Reverse the words: apple tree house\n", "house tree apple")
    ex = make_example("initials", words)
    assert (ex.prompt, ex.response) == ("First letters of the words: apple tree house\n", "ath")


def test_reverse_upper_is_upper_of_reverse_on_the_same_inputs():
    rev = _task("reverse_words", seed=11)
    upper = _task("upper_words", seed=11)
    both = _task("reverse_upper", seed=11)
    for split in SPLITS:
        for r, u, b in zip(rev.examples(split), upper.examples(split), both.examples(split)):
            assert b.response == r.response.upper()
            assert b.response == " ".join(u.response.split(" ")[::-1])


@pytest.mark.parametrize("name", ["sort_words", "rotate_words", "reverse_words", "reverse_upper"])
def test_no_answer_equals_its_input_words(name):
    task = _task(name, seed=0, n_train=2000)
    for split in SPLITS:
        for ex in task.examples(split):
            words = " ".join(_words_of(name, ex.prompt))
            assert ex.response != words and ex.response.lower() != words, ex


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_copying_the_input_never_scores(name):
    task = _task(name)
    copies = [" ".join(_words_of(name, ex.prompt)) for ex in task.examples("test")]
    assert task.score(copies, "test") == 0.0
    assert task.score([ex.response for ex in task.examples("test")], "test") == 1.0


# ---------------------------------------------------------------- conflicts


def test_word_tasks_of_one_seed_share_every_input_split_by_split():
    tasks = {name: _task(name, seed=6) for name in EXPECTED_NAMES}
    for split in SPLITS:
        inputs = {name: [_words_of(name, ex.prompt) for ex in t.examples(split)] for name, t in tasks.items()}
        first = inputs[EXPECTED_NAMES[0]]
        assert all(other == first for other in inputs.values()), split


@pytest.mark.parametrize(
    "a,b",
    [("reverse_words", "sort_words"), ("upper_words", "rotate_words"), ("reverse_words", "rotate_words"),
     ("upper_words", "reverse_upper"), ("initials", "sort_words")],
)
def test_conflicting_pairs_share_inputs_and_always_differ_in_output(a, b):
    ta, tb = _task(a, seed=2, n_train=1000), _task(b, seed=2, n_train=1000)
    shared = 0
    for split in SPLITS:
        for ea, eb in zip(ta.examples(split), tb.examples(split)):
            assert _words_of(a, ea.prompt) == _words_of(b, eb.prompt)
            assert ea.prompt != eb.prompt, "the instruction must tell the tasks apart"
            assert ea.response != eb.response, (ea, eb)
            shared += 1
    assert shared == 1070


def test_every_pair_of_word_tasks_disagrees_on_most_shared_inputs():
    tasks = {name: _task(name, seed=8, n_train=500) for name in EXPECTED_NAMES}
    for i, a in enumerate(EXPECTED_NAMES):
        for b in EXPECTED_NAMES[i + 1 :]:
            pairs = list(zip(tasks[a].examples("train"), tasks[b].examples("train")))
            differ = sum(x.response != y.response for x, y in pairs)
            assert differ >= 0.9 * len(pairs), (a, b, differ)


def test_word_tasks_draw_the_same_input_from_the_same_rng_state():
    inputs = set()
    for name, generator in WORD_TASKS.items():
        ex = generator(random.Random(42))
        inputs.add(tuple(_words_of(name, ex.prompt)))
    assert len(inputs) == 1


# ---------------------------------------------------------------- input space


def test_word_input_space_size_counts_non_monotone_orderings():
    # 5 words: k=3: 60 - 2*10, k=4: 120 - 2*5, k=5: 120 - 2*1.
    assert word_input_space_size(["a", "b", "c", "d", "e"]) == 40 + 110 + 118
    assert input_space_size("sort_words") == word_input_space_size() > 10**11


def test_small_vocabulary_can_be_enumerated_exactly_and_one_more_is_an_error():
    vocab = ["ant", "bee", "cat", "dog", "eel"]
    task = make_word_task("reverse_words", 0, 200, 30, 38, vocabulary=vocab)
    inputs = {tuple(_words_of("reverse_words", ex.prompt)) for s in SPLITS for ex in task.examples(s)}
    assert len(inputs) == 268
    with pytest.raises(ValueError) as info:
        make_word_task("reverse_words", 0, 201, 30, 38, vocabulary=vocab)
    message = str(info.value)
    assert "'reverse_words'" in message and "269" in message and "268" in message
    assert "train 201" in message and "validation 30" in message and "test 38" in message


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_too_many_examples_for_the_word_list_raises_naming_task_and_counts(name):
    space = word_input_space_size()
    with pytest.raises(ValueError) as info:
        make_builtin_task(name, 0, space, 1, 2)
    message = str(info.value)
    assert repr(name) in message and str(space) in message and str(space + 3) in message
    assert "validation 1" in message and "test 2" in message


def test_unusable_vocabulary_is_rejected():
    with pytest.raises(ValueError, match="at least 5 distinct"):
        make_word_task("sort_words", 0, 1, 1, 1, vocabulary=["ant", "bee", "cat", "dog"])
    with pytest.raises(ValueError, match="at least 5 distinct"):
        make_word_task("sort_words", 0, 1, 1, 1, vocabulary=["ant", "ant", "bee", "cat", "dog"])
    with pytest.raises(ValueError, match="lowercase"):
        make_word_task("sort_words", 0, 1, 1, 1, vocabulary=["ant", "Bee", "cat", "dog", "eel"])
