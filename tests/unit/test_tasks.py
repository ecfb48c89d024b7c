"""Unit tests for dume_ray.tasks (base containers, built-in tasks, file-backed tasks).

Run with::

    cd /work/main && .venv/bin/python -m pytest tests/unit/test_tasks.py -q
"""

from __future__ import annotations

import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from dume_ray.tasks.base import METRICS, SPLITS, Example, Task, exact_match  # noqa: E402
from dume_ray.tasks.builtin import (  # noqa: E402
    BUILTIN_TASKS,
    copy_example,
    reverse_example,
    shift_example,
    sort_example,
    make_builtin_task,
)
from dume_ray.tasks.files import load_task_from_source  # noqa: E402

STRING_TAGS = {"cp": "copy", "rv": "reverse", "so": "sort", "sh": "shift"}
NUMBER_TAGS = {"ad": "add", "sb": "sub"}


def _expected_response(prompt: str) -> str:
    """Recomputes the answer from the prompt text alone, independently of builtin.py."""
    tag, rest = prompt.split(" ", 1)
    assert rest.endswith("=")
    body = rest[:-1]
    if tag == "cp":
        return body
    if tag == "rv":
        return "".join(reversed(body))
    if tag == "so":
        return "".join(sorted(body))
    if tag == "sh":
        return body.translate(str.maketrans("abcdefgh", "bcdefgha"))
    a, b = (int(x) for x in body.split(","))
    if tag == "ad":
        return str(a + b)
    if tag == "sb":
        return str(a - b)
    raise AssertionError(f"unknown tag in prompt {prompt!r}")


# ---------------------------------------------------------------- base


def test_exact_match_ignores_surrounding_whitespace_only():
    assert exact_match("abc", "abc") == 1.0
    assert exact_match(" abc\n", "abc") == 1.0
    assert exact_match("abc", "abd") == 0.0
    assert exact_match("a bc", "abc") == 0.0
    assert exact_match("", "abc") == 0.0
    assert METRICS["exact_match"] is exact_match


def test_example_is_frozen():
    ex = Example("p", "r")
    with pytest.raises(AttributeError):
        ex.prompt = "q"  # type: ignore[misc]


def test_task_score_is_mean_exact_match():
    task = Task("t", {"test": [Example("a", "1"), Example("b", "2"), Example("c", "3"), Example("d", "4")]})
    assert task.score(["1", " 2 ", "x", "4"], "test") == pytest.approx(0.75)


def test_task_score_rejects_wrong_number_of_predictions():
    task = Task("t", {"test": [Example("a", "1")]})
    with pytest.raises(ValueError, match="2 predictions"):
        task.score(["1", "2"], "test")


def test_task_examples_missing_split_error_names_task_split_and_available():
    task = Task("mytask", {"train": [Example("a", "b")]})
    with pytest.raises(KeyError) as info:
        task.examples("test")
    message = str(info.value)
    assert "mytask" in message and "'test'" in message and "train" in message


def test_task_rejects_unknown_metric():
    with pytest.raises(ValueError, match="bleu"):
        Task("t", {}, metric="bleu")


def test_task_skipped_rows_defaults_to_independent_empty_dicts():
    a, b = Task("a", {}), Task("b", {})
    a.skipped_rows["train"] = 1
    assert b.skipped_rows == {}


# ---------------------------------------------------------------- built-in tasks


def test_builtin_has_at_least_six_tasks_in_two_conflicting_families():
    assert len(BUILTIN_TASKS) >= 6
    assert {"copy", "reverse", "sort", "shift", "add", "sub"} <= set(BUILTIN_TASKS)


@pytest.mark.parametrize("name", sorted(BUILTIN_TASKS))
def test_builtin_same_seed_gives_identical_task(name):
    a = make_builtin_task(name, seed=7, num_train=50, num_validation=10, num_test=10)
    b = make_builtin_task(name, seed=7, num_train=50, num_validation=10, num_test=10)
    assert a.splits == b.splits


@pytest.mark.parametrize("name", sorted(BUILTIN_TASKS))
def test_builtin_different_seed_gives_different_task(name):
    a = make_builtin_task(name, seed=1, num_train=50, num_validation=10, num_test=10)
    b = make_builtin_task(name, seed=2, num_train=50, num_validation=10, num_test=10)
    assert a.splits["train"] != b.splits["train"]


@pytest.mark.parametrize("name", sorted(BUILTIN_TASKS))
def test_builtin_splits_have_requested_sizes_and_are_disjoint_by_prompt(name):
    task = make_builtin_task(name, seed=0, num_train=300, num_validation=40, num_test=50)
    assert [len(task.examples(s)) for s in SPLITS] == [300, 40, 50]
    prompts = {s: [ex.prompt for ex in task.examples(s)] for s in SPLITS}
    all_prompts = [p for s in SPLITS for p in prompts[s]]
    assert len(all_prompts) == len(set(all_prompts)), "duplicate prompts across or within splits"
    assert not set(prompts["test"]) & set(prompts["train"])
    assert not set(prompts["validation"]) & set(prompts["train"])


@pytest.mark.parametrize("name", sorted(BUILTIN_TASKS))
def test_builtin_responses_are_correct_for_their_prompts(name):
    task = make_builtin_task(name, seed=3, num_train=200, num_validation=20, num_test=20)
    for split in SPLITS:
        for ex in task.examples(split):
            assert ex.response == _expected_response(ex.prompt), ex


@pytest.mark.parametrize("name", sorted(BUILTIN_TASKS))
def test_builtin_prompt_carries_the_task_tag(name):
    task = make_builtin_task(name, seed=0, num_train=20, num_validation=5, num_test=5)
    tags = {v: k for k, v in {**STRING_TAGS, **NUMBER_TAGS}.items()}
    assert all(ex.prompt.startswith(tags[name] + " ") for ex in task.examples("train"))


def test_builtin_docstring_examples_hold():
    assert _expected_response("cp abcd=") == "abcd"
    assert _expected_response("rv abcd=") == "dcba"
    assert _expected_response("so dbca=") == "abcd"
    assert _expected_response("sh abh=") == "bca"
    assert _expected_response("ad 37,25=") == "62"
    assert _expected_response("sb 37,25=") == "12"


def test_builtin_test_split_unchanged_when_only_num_train_changes():
    small = make_builtin_task("add", seed=5, num_train=10, num_validation=20, num_test=30)
    large = make_builtin_task("add", seed=5, num_train=500, num_validation=20, num_test=30)
    assert small.examples("test") == large.examples("test")
    assert small.examples("validation") == large.examples("validation")


def test_builtin_task_data_does_not_depend_on_other_tasks():
    # Seeding is per (seed, name), so generating another task first changes nothing.
    first = make_builtin_task("sort", seed=9, num_train=30, num_validation=5, num_test=5)
    make_builtin_task("copy", seed=9, num_train=30, num_validation=5, num_test=5)
    again = make_builtin_task("sort", seed=9, num_train=30, num_validation=5, num_test=5)
    assert first.splits == again.splits


def test_conflicting_string_tasks_draw_the_same_input_from_the_same_rng_state():
    words = {
        fn(random.Random(42)).prompt.split(" ", 1)[1]
        for fn in (copy_example, reverse_example, sort_example, shift_example)
    }
    assert len(words) == 1


def test_conflicting_string_tasks_share_alphabet_and_length_range():
    for name in STRING_TAGS.values():
        task = make_builtin_task(name, seed=0, num_train=400, num_validation=0, num_test=0)
        words = [ex.prompt.split(" ", 1)[1][:-1] for ex in task.examples("train")]
        assert set("".join(words)) == set("abcdefgh"), name
        assert {len(w) for w in words} == {3, 4, 5, 6}, name


def test_number_tasks_use_operands_0_to_99_and_sub_is_non_negative():
    for name in NUMBER_TAGS.values():
        task = make_builtin_task(name, seed=0, num_train=2000, num_validation=0, num_test=0)
        operands = [
            int(x) for ex in task.examples("train") for x in ex.prompt.split(" ", 1)[1][:-1].split(",")
        ]
        assert min(operands) == 0 and max(operands) == 99, name
        if name == "sub":
            assert all(int(ex.response) >= 0 for ex in task.examples("train"))


def test_builtin_max_string_len_is_configurable():
    task = make_builtin_task("reverse", seed=0, num_train=100, num_validation=0, num_test=0, max_string_len=4)
    assert {len(ex.response) for ex in task.examples("train")} == {3, 4}


def test_builtin_too_many_examples_for_input_space_raises_naming_task():
    # sub has 100*101/2 = 5050 distinct ordered operand pairs.
    with pytest.raises(ValueError, match="'sub'.*5050"):
        make_builtin_task("sub", seed=0, num_train=5000, num_validation=40, num_test=20)
    # Strings of length exactly 3 over 8 letters: 512.
    with pytest.raises(ValueError, match="'copy'"):
        make_builtin_task("copy", seed=0, num_train=600, num_validation=0, num_test=0, max_string_len=3)


def test_builtin_unknown_task_error_lists_known_names():
    with pytest.raises(ValueError) as info:
        make_builtin_task("multiply", seed=0, num_train=1, num_validation=1, num_test=1)
    message = str(info.value)
    assert "multiply" in message
    for name in BUILTIN_TASKS:
        assert name in message


# ---------------------------------------------------------------- file-backed tasks


def _rows(split: str, n: int = 3) -> list[dict]:
    return [{"question": f"{split} q{i}", "answer": f"{split} a{i}", "extra": i} for i in range(n)]


def _write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def _write_csv(path, rows, columns=("question", "answer")) -> str:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _write_parquet(path, rows) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _files(tmp_path, writer, ext, rows_by_split=None):
    rows_by_split = rows_by_split or {s: _rows(s) for s in SPLITS}
    return {s: writer(tmp_path / f"{s}.{ext}", rows_by_split[s]) for s in SPLITS}


def _load(tmp_path, source, data_files, **kwargs):
    return load_task_from_source(
        "user",
        source,
        data_files,
        prompt_column="question",
        response_column="answer",
        cache_dir=str(tmp_path / "hf_cache"),
        **kwargs,
    )


@pytest.mark.parametrize(
    "source,writer,ext",
    [("jsonl", _write_jsonl, "jsonl"), ("json", _write_jsonl, "json"),
     ("parquet", _write_parquet, "parquet"), ("csv", _write_csv, "csv")],
)
def test_file_task_loads_custom_columns_for_every_format(tmp_path, source, writer, ext):
    task = _load(tmp_path, source, _files(tmp_path, writer, ext))
    assert task.name == "user"
    for split in SPLITS:
        assert task.examples(split) == [Example(f"{split} q{i}", f"{split} a{i}") for i in range(3)]
    assert task.skipped_rows == {s: 0 for s in SPLITS}


def test_csv_numeric_looking_answers_stay_strings(tmp_path):
    rows = [{"question": "ad 37,25=", "answer": "62"}, {"question": "ad 1,2=", "answer": "03"}]
    files = _files(tmp_path, _write_csv, "csv", {s: rows for s in SPLITS})
    task = _load(tmp_path, "csv", files)
    assert [ex.response for ex in task.examples("train")] == ["62", "03"]


def test_file_task_missing_column_error_names_column_file_and_existing_columns(tmp_path):
    files = _files(tmp_path, _write_jsonl, "jsonl")
    rows = [{"question": "q", "reply": "a"}]
    files["validation"] = _write_jsonl(tmp_path / "bad_validation.jsonl", rows)
    with pytest.raises(ValueError) as info:
        _load(tmp_path, "jsonl", files)
    message = str(info.value)
    assert "'answer'" in message and "bad_validation.jsonl" in message
    assert "'user'" in message and "reply" in message


def test_file_task_missing_file_raises_file_not_found_naming_path_and_task(tmp_path):
    files = _files(tmp_path, _write_jsonl, "jsonl")
    files["test"] = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError) as info:
        _load(tmp_path, "jsonl", files)
    assert "nope.jsonl" in str(info.value) and "'user'" in str(info.value)


def _write_empty(path, source: str, content: str) -> str:
    if source == "parquet":
        schema = pa.schema([("question", pa.string()), ("answer", pa.string())])
        pq.write_table(schema.empty_table(), path)
    else:
        path.write_text(content)
    return str(path)


@pytest.mark.parametrize(
    "source,content",
    [("jsonl", ""), ("jsonl", "\n\n"), ("csv", "question,answer\n"), ("parquet", "")],
    ids=["jsonl-zero-bytes", "jsonl-blank-lines", "csv-header-only", "parquet-zero-rows"],
)
def test_file_task_empty_split_error_names_task_and_split(tmp_path, source, content):
    writer = {"jsonl": _write_jsonl, "csv": _write_csv, "parquet": _write_parquet}[source]
    files = _files(tmp_path, writer, source)
    files["validation"] = _write_empty(tmp_path / f"empty.{source}", source, content)
    with pytest.raises(ValueError) as info:
        _load(tmp_path, source, files)
    assert "'user'" in str(info.value) and "'validation'" in str(info.value)
    assert "empty" in str(info.value)


@pytest.mark.parametrize(
    "bad_row,column",
    [({"question": "q", "answer": ""}, "answer"),
     ({"question": "q", "answer": None}, "answer"),
     ({"question": "q"}, "answer"),
     ({"question": "   ", "answer": "a"}, "question")],
)
def test_file_task_bad_row_error_names_file_row_index_and_column(tmp_path, bad_row, column):
    rows = _rows("train", 4)
    rows[2] = bad_row
    files = _files(tmp_path, _write_jsonl, "jsonl")
    files["train"] = _write_jsonl(tmp_path / "train_bad.jsonl", rows)
    with pytest.raises(ValueError) as info:
        _load(tmp_path, "jsonl", files)
    message = str(info.value)
    assert "row 2" in message and f"'{column}'" in message
    assert "train_bad.jsonl" in message and "'user'" in message


def test_file_task_non_string_value_is_a_bad_row(tmp_path):
    rows = [{"question": "q0", "answer": 1}, {"question": "q1", "answer": 2}]
    files = _files(tmp_path, _write_parquet, "parquet")
    files["test"] = _write_parquet(tmp_path / "ints.parquet", rows)
    with pytest.raises(ValueError, match=r"ints\.parquet.*row 0.*'answer'.*not a string"):
        _load(tmp_path, "parquet", files)


def test_file_task_skip_bad_rows_drops_and_counts_them(tmp_path):
    rows = _rows("train", 5)
    rows[1] = {"question": "q", "answer": ""}
    rows[3] = {"question": None, "answer": "a"}
    files = _files(tmp_path, _write_jsonl, "jsonl")
    files["train"] = _write_jsonl(tmp_path / "train_bad.jsonl", rows)
    task = _load(tmp_path, "jsonl", files, skip_bad_rows=True)
    assert task.skipped_rows == {"train": 2, "validation": 0, "test": 0}
    assert [ex.prompt for ex in task.examples("train")] == ["train q0", "train q2", "train q4"]


def test_file_task_requires_all_three_splits_and_names_missing(tmp_path):
    files = _files(tmp_path, _write_jsonl, "jsonl")
    del files["validation"], files["test"]
    with pytest.raises(ValueError) as info:
        _load(tmp_path, "jsonl", files)
    assert "validation" in str(info.value) and "test" in str(info.value)


def test_dataset_directory_source_maps_split_names(tmp_path):
    # A local dataset directory is loaded exactly like a Hub dataset; its README
    # declares a "dev" split that we map to our "validation".
    root = tmp_path / "my_dataset"
    root.mkdir()
    for split_file in ("train", "dev", "test"):
        _write_jsonl(root / f"{split_file}.jsonl", _rows(split_file, 2))
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: train.jsonl\n"
        "  - split: dev\n    path: dev.jsonl\n"
        "  - split: test\n    path: test.jsonl\n---\n"
    )
    task = _load(tmp_path, str(root), None, splits={"validation": "dev"})
    assert [ex.prompt for ex in task.examples("validation")] == ["dev q0", "dev q1"]
    assert [ex.response for ex in task.examples("test")] == ["test a0", "test a1"]

    with pytest.raises(ValueError) as info:
        _load(tmp_path, str(root), None)
    assert "validation" in str(info.value) and "dev" in str(info.value)
