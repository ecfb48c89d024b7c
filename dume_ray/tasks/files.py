"""User-defined tasks loaded through Hugging Face ``datasets``.

:func:`load_task_from_source` turns local JSON/JSONL/Parquet/CSV files, a
dataset on the Hugging Face Hub, a local folder laid out like a Hub dataset
repository (``data/train-00000-of-00001.parquet``, or ``train.jsonl`` ... with
an optional ``README.md``), or a folder written by ``DatasetDict.save_to_disk``
into a :class:`~dume_ray.tasks.base.Task`. All reading goes through
``datasets`` (``load_dataset``; ``load_from_disk`` for ``save_to_disk``
folders); this module only maps columns and splits and validates the rows, with
error messages that name the task, the file or folder and split, the row and
the column involved.

Test with::

    .venv/bin/python -m pytest tests/unit/test_tasks.py -q
"""

from __future__ import annotations

import os
from typing import Any

from dume_ray.tasks.base import SPLITS, Example, Task

#: Local formats and the ``datasets`` builder that reads each.
LOCAL_FORMATS: dict[str, str] = {
    "json": "json",
    "jsonl": "json",  # the json builder reads JSON Lines too
    "parquet": "parquet",
    "csv": "csv",
}


def load_task_from_source(
    name: str,
    source: str,
    data_files: dict[str, str] | None,
    prompt_column: str,
    response_column: str,
    splits: dict[str, str] | None = None,
    *,
    skip_bad_rows: bool = False,
    config: str | None = None,
    cache_dir: str | None = None,
) -> Task:
    """Loads a user task from local files or a Hub dataset.

    All three splits (train, validation, test) are required; nothing is carved
    out of train implicitly, so what is evaluated is always what the user gave.

    Args:
        name: Task name, used in the Task and in every error message.
        source: ``"json"``, ``"jsonl"``, ``"parquet"`` or ``"csv"`` for local
            files; a folder written by ``DatasetDict.save_to_disk`` (read with
            ``datasets.load_from_disk``); anything else is passed to
            ``datasets.load_dataset`` as a Hub dataset name or a local folder
            laid out like a Hub dataset repository.
        data_files: For local formats, maps each of ``train``/``validation``/
            ``test`` to a file path (required). For a Hub source it is optional
            and passed through to ``load_dataset``.
        prompt_column: Column holding the prompt text.
        response_column: Column holding the response text.
        splits: Hub and ``save_to_disk`` sources: maps our split names to the dataset's split
            names, e.g. ``{"validation": "dev"}``; unmapped splits keep their
            own name.
        skip_bad_rows: If True, rows whose prompt or response is missing,
            None, blank or not a string are dropped and counted in
            ``Task.skipped_rows``; if False such a row raises.
        config: Hub sources only: dataset configuration name (e.g. ``"sst2"``).
        cache_dir: Where ``datasets`` caches Arrow files; its default if None.

    Returns:
        The task, with ``skipped_rows`` holding a count for every split.

    Raises:
        FileNotFoundError: A local data file or dataset folder does not exist.
        ValueError: Splits are missing or unknown, a column is missing, a split
            is empty, or (unless ``skip_bad_rows``) a row is malformed.
    """
    if source in LOCAL_FORMATS:
        columns = (prompt_column, response_column)
        raw = _load_local(name, source, data_files, splits, columns, cache_dir)
    elif _saved_to_disk(source):
        raw = _load_saved(name, source, data_files, splits, config)
    else:
        raw = _load_hub(name, source, data_files, splits, config, cache_dir)

    task_splits: dict[str, list[Example]] = {}
    skipped: dict[str, int] = {}
    for split in SPLITS:
        dataset, where = raw[split]
        task_splits[split], skipped[split] = _to_examples(
            name, split, where, dataset, prompt_column, response_column, skip_bad_rows
        )
    return Task(name=name, splits=task_splits, skipped_rows=skipped)


def _check_split_keys(name: str, given: dict[str, Any], what: str) -> None:
    """Requires exactly the canonical splits as keys of ``given``."""
    unknown = sorted(set(given) - set(SPLITS))
    if unknown:
        raise ValueError(
            f"task {name!r}: unknown split name(s) {unknown} in {what}; "
            f"expected keys among {list(SPLITS)}"
        )
    missing = [s for s in SPLITS if s not in given]
    if missing:
        raise ValueError(
            f"task {name!r}: {what} is missing split(s) {missing}; user tasks need all of "
            f"{list(SPLITS)} (validation and test are not carved out of train)"
        )


def _load_local(
    name: str,
    source: str,
    data_files: dict[str, str] | None,
    splits: dict[str, str] | None,
    columns: tuple[str, str],
    cache_dir: str | None,
) -> dict[str, tuple[Any, str]]:
    """Loads one local file per split; returns ``{split: (dataset, where)}``.

    Each split is loaded on its own so that a schema difference between files
    cannot break the others, and errors can name the offending file.
    """
    if splits is not None:
        raise ValueError(
            f"task {name!r}: `hub_splits` only applies to Hub and dataset-folder sources; for local {source!r} "
            f"files key `data_files` by {list(SPLITS)} instead"
        )
    if not data_files:
        raise ValueError(
            f"task {name!r}: local source {source!r} needs `data_files` mapping "
            f"{list(SPLITS)} to file paths"
        )
    _check_split_keys(name, data_files, "data_files")

    builder = LOCAL_FORMATS[source]
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        # CSV carries no types: without this, an answer column like "62" would
        # be inferred as numbers and then rejected as non-string. (Empty cells
        # still come back as None and are reported as missing.)
        kwargs["converters"] = {column: str for column in columns}

    paths = {split: os.fspath(data_files[split]) for split in SPLITS}
    # Check every file before loading any, so a typo in the test path fails fast.
    for split, path in paths.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"task {name!r}: {split} data file {path!r} does not exist")
    for split, path in paths.items():
        # datasets fails on row-less files with unrelated-looking errors (a bare
        # StopIteration, "corresponds to no data", a generation error for
        # Parquet), so recognise the empty case before and after loading.
        if _has_no_rows(builder, path):
            raise _empty_error(name, split, path)
        if builder == "json":
            _check_json_rows(name, path, source)
        elif builder == "parquet":
            _check_parquet(name, path)

    import datasets  # heavy import (seconds): after the checks above, so a bad file fails at once

    loaded: dict[str, tuple[Any, str]] = {}
    for split, path in paths.items():
        where = f"{split} file {path!r}"
        empty_error = _empty_error(name, split, path)
        try:
            dataset = datasets.load_dataset(
                builder, data_files={split: path}, split=split, cache_dir=cache_dir, **kwargs
            )
        except StopIteration as exc:
            raise empty_error from exc
        except ValueError as exc:
            if "corresponds to no data" in str(exc):
                raise empty_error from exc
            raise ValueError(f"task {name!r}: cannot read {where}: {_root_cause(exc)}") from exc
        except Exception as exc:  # e.g. DatasetGenerationError: its message says nothing, its cause does
            raise ValueError(f"task {name!r}: cannot read {where}: {_root_cause(exc)}") from exc
        loaded[split] = (dataset, where)
    return loaded


def _empty_error(name: str, split: str, path: str) -> ValueError:
    return ValueError(f"task {name!r}: split {split!r} is empty ({split} file {path!r} has no rows)")


def _check_json_rows(name: str, path: str, source: str) -> None:
    """Names the first line that is not a JSON object as ``file:line:column``.

    ``datasets`` reports a bad row as a generic generation error with a traceback;
    this reads the file once more, which costs far less than the tokenization that
    follows. A ``json`` source holding one whole JSON document is left to ``datasets``.
    """
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if source == "json":
        try:
            json.loads(text)
            return  # one JSON document (a list of rows, or a {"data": [...]} object)
        except ValueError:
            pass  # JSON Lines, or broken: check it line by line
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"task {name!r}: {path}:{number}:{exc.colno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"task {name!r}: {path}:{number}: each line must be a JSON object "
                             f"{{\"prompt\": ..., \"response\": ...}}, got {type(row).__name__}") from None


def _check_parquet(name: str, path: str) -> None:
    """A file that is not Parquet is named here: ``datasets`` logs a traceback for it before failing."""
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a bad file
        raise ValueError(f"task {name!r}: cannot read {path!r} as Parquet: {_root_cause(exc)}") from None


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's message on one line: what went wrong, not where the wrapper noticed it."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


def _has_no_rows(builder: str, path: str) -> bool:
    """Cheap emptiness check: a zero-byte file, or Parquet metadata saying 0 rows."""
    if os.path.getsize(path) == 0:
        return True
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_metadata(path).num_rows == 0
        except Exception:
            return False  # not valid Parquet: let datasets report the real error
    return False


def _saved_to_disk(source: str) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return any(os.path.isfile(os.path.join(source, marker)) for marker in ("dataset_dict.json", "state.json"))


def _looks_like_a_path(source: str) -> bool:
    """``./data``, ``/abs/data``, ``~/data``: meant as a local folder, never a Hub name (``user/name``)."""
    return source.startswith(("/", "./", "../", "~"))


def _check_split_mapping(name: str, splits: dict[str, str] | None) -> dict[str, str]:
    mapping = dict(splits or {})
    unknown = sorted(set(mapping) - set(SPLITS))
    if unknown:
        raise ValueError(
            f"task {name!r}: unknown split name(s) {unknown} in `hub_splits`; "
            f"keys must be among {list(SPLITS)}"
        )
    return mapping


def _pick_splits(name: str, source: str, what: str, dataset_dict: Any, mapping: dict[str, str]) -> dict[str, tuple[Any, str]]:
    """Our three splits out of a DatasetDict, through `mapping`; one error lists every missing one."""
    available = list(dataset_dict.keys())
    loaded: dict[str, tuple[Any, str]] = {}
    missing = []
    for split in SPLITS:
        source_split = mapping.get(split, split)
        if source_split not in dataset_dict:
            missing.append(f"{split} (looked for {source_split!r})")
            continue
        loaded[split] = (dataset_dict[source_split], f"split {source_split!r} of {source!r}")
    if missing:
        raise ValueError(
            f"task {name!r}: {what} {source!r} lacks split(s) {missing}; it has {available}. "
            f"Map our split names to the dataset's with `hub_splits`, e.g. {{'validation': 'dev'}}"
        )
    return loaded


def _load_saved(
    name: str,
    source: str,
    data_files: dict[str, str] | None,
    splits: dict[str, str] | None,
    config: str | None,
) -> dict[str, tuple[Any, str]]:
    """Loads a ``DatasetDict.save_to_disk`` folder; returns ``{split: (dataset, where)}``."""
    import datasets  # heavy import, only needed when user tasks are used

    if data_files or config:
        raise ValueError(
            f"task {name!r}: {source!r} is a folder written by save_to_disk; `data_files` and "
            f"`hub_config` do not apply to it (its splits are its subfolders; map them with `hub_splits`)"
        )
    mapping = _check_split_mapping(name, splits)
    if not os.path.isfile(os.path.join(source, "dataset_dict.json")):
        raise ValueError(
            f"task {name!r}: {source!r} holds a single Dataset (Dataset.save_to_disk), but a task needs "
            f"{list(SPLITS)}: save a DatasetDict with those splits instead, e.g. "
            f"DatasetDict(train=..., validation=..., test=...).save_to_disk({source!r})"
        )
    try:
        dataset_dict = datasets.load_from_disk(source)
    except Exception as exc:  # a broken folder: one line naming the task and the folder
        raise ValueError(f"task {name!r}: cannot load the save_to_disk folder {source!r}: {_root_cause(exc)}") from exc
    return _pick_splits(name, source, "save_to_disk folder", dataset_dict, mapping)


def _load_hub(
    name: str,
    source: str,
    data_files: dict[str, str] | None,
    splits: dict[str, str] | None,
    config: str | None,
    cache_dir: str | None,
) -> dict[str, tuple[Any, str]]:
    """Loads a Hub dataset (or a local folder laid out like one); returns ``{split: (dataset, where)}``."""
    import datasets  # heavy import, only needed when user tasks are used

    mapping = _check_split_mapping(name, splits)
    if _looks_like_a_path(source) and not os.path.isdir(os.path.expanduser(source)):
        raise FileNotFoundError(f"task {name!r}: dataset folder {source!r} does not exist")
    if os.path.isdir(source) and not os.listdir(source):
        raise ValueError(f"task {name!r}: dataset folder {source!r} is empty (no data files)")
    try:
        dataset_dict = datasets.load_dataset(
            os.path.expanduser(source), config, data_files=data_files, cache_dir=cache_dir
        )
    except Exception as exc:  # a missing dataset, no network, a broken folder: name the task and source
        raise ValueError(f"task {name!r}: cannot load dataset {source!r}: {_root_cause(exc)}") from exc
    return _pick_splits(name, source, "dataset", dataset_dict, mapping)


def _to_examples(
    name: str,
    split: str,
    where: str,
    dataset: Any,
    prompt_column: str,
    response_column: str,
    skip_bad_rows: bool,
) -> tuple[list[Example], int]:
    """Validates one split and converts it to examples; returns (examples, skipped)."""
    columns = list(dataset.column_names)
    for column in (prompt_column, response_column):
        if column not in columns:
            raise ValueError(
                f"task {name!r}: {where} has no column {column!r}; columns are {columns}"
            )
    if len(dataset) == 0:
        raise ValueError(f"task {name!r}: split {split!r} is empty ({where} has no rows)")

    # Whole-column access is one Arrow conversion instead of a Python dict per row.
    prompts = dataset[prompt_column]
    responses = dataset[response_column]
    examples: list[Example] = []
    skipped = 0
    for index, (prompt, response) in enumerate(zip(prompts, responses)):
        problem = _cell_problem(prompt, prompt_column) or _cell_problem(response, response_column)
        if problem is None:
            examples.append(Example(prompt=prompt, response=response, source=f"{where} row {index}"))
        elif skip_bad_rows:
            skipped += 1
        else:
            raise ValueError(
                f"task {name!r}: {where} row {index} (0-based): {problem} "
                f"(set tasks.skip_bad_rows=true to drop such rows)"
            )
    if not examples:
        raise ValueError(
            f"task {name!r}: split {split!r} is empty after dropping {skipped} bad rows ({where})"
        )
    return examples, skipped


def _cell_problem(value: Any, column: str) -> str | None:
    """Describes what is wrong with a prompt/response cell, or None if it is fine."""
    if value is None:
        return f"column {column!r} is missing (None)"
    if not isinstance(value, str):
        return f"column {column!r} is not a string ({type(value).__name__}: {value!r})"
    # A whitespace-only response can never be told apart from an empty one by
    # exact match (which strips), so it is treated as empty too.
    if not value.strip():
        return f"column {column!r} is empty"
    return None
