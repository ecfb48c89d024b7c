"""Task and example containers shared by built-in and file-backed tasks.

A :class:`Task` is a named set of prompt/response :class:`Example` s split into
``train`` / ``validation`` / ``test``, plus the name of the metric used to score
generated predictions against the references. Everything here is plain Python
(no torch, no Ray) so it can be imported anywhere.

Test with::

    .venv/bin/python -m pytest tests/unit/test_tasks.py -q
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, TypeVar

SPLITS = ("train", "validation", "test")
T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """One supervised example.

    Attributes:
        prompt: Text the model is conditioned on (includes the task tag).
        response: Text the model must produce after the prompt.
        source: Where a file-backed example came from (file and 0-based row), for error messages.
    """

    prompt: str
    response: str
    source: str | None = field(default=None, compare=False, repr=False)  # e.g. "train file 'qa.jsonl' row 12"


def exact_match(prediction: str, reference: str) -> float:
    """Scores one prediction by exact string equality.

    Surrounding whitespace is ignored because decoding often leaves a trailing
    space or newline that carries no meaning for these tasks.

    Args:
        prediction: Generated text.
        reference: Expected response.

    Returns:
        1.0 if both are equal after ``str.strip()``, else 0.0.
    """
    return 1.0 if prediction.strip() == reference.strip() else 0.0


METRICS: dict[str, Callable[[str, str], float]] = {"exact_match": exact_match}


@dataclass
class Task:
    """A named task with its splits and metric.

    Attributes:
        name: Task name, used in error messages and reports.
        splits: Mapping from split name (normally one of :data:`SPLITS`) to
            its examples.
        metric: Key into :data:`METRICS`.
        skipped_rows: How many malformed (``skip_bad_rows=True``) or over-long
            (``too_long="drop"``) rows were dropped per split; empty otherwise.
    """

    name: str
    splits: dict[str, list[Example]]
    metric: str = "exact_match"
    skipped_rows: dict[str, int] = field(default_factory=dict)
    truncated_rows: dict[str, int] = field(default_factory=dict)  # examples whose response was cut to fit (tasks.too_long)

    def __post_init__(self) -> None:
        # Fail at construction, not after hours of training, if the metric is unknown.
        if self.metric not in METRICS:
            raise ValueError(
                f"task {self.name!r}: unknown metric {self.metric!r}; "
                f"known metrics: {sorted(METRICS)}"
            )

    def examples(self, split: str) -> list[Example]:
        """Returns the examples of one split.

        Args:
            split: Split name, e.g. ``"train"``.

        Returns:
            The list of examples (not a copy).

        Raises:
            KeyError: If the task has no such split; the message names the task,
                the split and the available splits.
        """
        if split not in self.splits:
            raise KeyError(
                f"task {self.name!r} has no split {split!r}; "
                f"available splits: {sorted(self.splits)}"
            )
        return self.splits[split]

    def score(self, predictions: list[str], split: str) -> float:
        """Scores predictions against the references of a split.

        Args:
            predictions: One generated string per example, in split order.
            split: Split the predictions were made for.

        Returns:
            The mean per-example metric value, in [0, 1] for exact match.

        Raises:
            KeyError: If the split does not exist.
            ValueError: If the number of predictions differs from the number
                of examples, or the split is empty.
        """
        examples = self.examples(split)
        if len(predictions) != len(examples):
            raise ValueError(
                f"task {self.name!r} split {split!r}: got {len(predictions)} predictions "
                f"for {len(examples)} examples"
            )
        if not examples:
            raise ValueError(f"task {self.name!r} split {split!r} is empty; nothing to score")
        metric = METRICS[self.metric]
        total = sum(metric(pred, ex.response) for pred, ex in zip(predictions, examples))
        return total / len(examples)


def draw_distinct(draw: Callable[[], T], key: Callable[[T], object], total: int, name: str, space: int,
                  what: str) -> list[T]:
    """`total` draws with distinct `key`s, in draw order (rejection sampling). Rejection is non-uniform over the
    space (some inputs are likelier) and stalls near its size; a cap on draws turns that into a clear error."""
    seen: set = set()
    unique: list[T] = []
    max_draws, draws = 100 * total + 1000, 0
    while len(unique) < total:
        if draws >= max_draws:
            raise ValueError(
                f"task {name!r}: only found {len(unique)} distinct {what} after {draws} draws "
                f"but {total} were requested; the input space ({space}) is too small "
                f"for these sizes, request fewer examples"
            )
        item = draw()
        draws += 1
        if key(item) not in seen:
            seen.add(key(item))
            unique.append(item)
    return unique
