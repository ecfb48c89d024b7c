"""Turns prompt/response text into token ids, padded batches and loss positions.

Sequence layout: ``prefix + response + [eos]``. The prefix is the prompt as
one user turn of the tokenizer's chat template (ending with the assistant
header) when the tokenizer has one, else ``[bos] + prompt`` (bos only if the
tokenizer has one). Whether a run's tokenizer keeps its template is decided
once, when the base stage saves it (``data.chat_template``), so training,
scoring and generation always agree. Where the response starts is recorded as
a position (``response_start``), never found by comparing token ids: chat
models such as SmolLM2 use their eos token as pad token. The loss covers the response tokens and the final eos, so
the model learns both the answer and when to stop. Logits at position ``t - 1``
predict the token at position ``t``; :func:`collate` stores targets at their
own position in ``labels`` and the loss code performs the usual causal shift.
:func:`response_positions` gives the logits positions directly, for code that
gathers per-token distributions (e.g. distillation soft targets).

Test with::

    .venv/bin/python -m pytest tests/unit/test_encode.py -q
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from dume_ray.data.soft_targets import COUNTS_COLUMN, decode_logprobs, pad_top_k

#: Label value ignored by ``torch.nn.functional.cross_entropy``.
IGNORE_INDEX = -100


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer: Any) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _prefix_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The ids the response follows: the chat-template user turn + assistant header, or [bos] + prompt."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return _bos(tokenizer) + _text_ids(tokenizer, prompt)


def encode_example(
    tokenizer: Any, prompt: str, response: str, max_seq_len: int, where: str = ""
) -> dict:
    """Encodes one training example.

    Args:
        tokenizer: A Hugging Face tokenizer with an eos token.
        prompt: Prompt text.
        response: Response text; must not be empty.
        max_seq_len: Longest allowed sequence, special tokens included.
        where: Human-readable location used in errors, e.g.
            ``"task 'add' train row 12"``.

    Returns:
        ``{"input_ids": list[int], "response_start": int}`` where
        ``response_start`` is the index of the first response token.

    Raises:
        ValueError: If the tokenizer has no eos token, the response is empty,
            there is nothing before the response to condition on (no bos and
            an empty prompt), or the sequence is longer than ``max_seq_len``.
    """
    label = where or "example"
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"{label}: tokenizer has no eos token; one is needed to mark the end of responses"
        )
    if not response:
        raise ValueError(f"{label}: response is empty")
    prefix = _prefix_ids(tokenizer, prompt)
    response_ids = _text_ids(tokenizer, response)
    if not response_ids:
        raise ValueError(f"{label}: response {response!r} encodes to no tokens")
    if not prefix:
        # The first response token must be predicted from some earlier position.
        raise ValueError(f"{label}: empty prompt and no bos token; nothing to condition on")
    input_ids = prefix + response_ids + [tokenizer.eos_token_id]
    if len(input_ids) > max_seq_len:
        raise ValueError(
            f"{label}: sequence length {len(input_ids)} tokens exceeds the limit "
            f"max_seq_len={max_seq_len} (prompt {len(prefix)}, response {len(response_ids)} + eos)"
        )
    return {"input_ids": input_ids, "response_start": len(prefix)}


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Encodes a prompt for generation: the prefix :func:`encode_example` puts before the response.

    Args:
        tokenizer: A Hugging Face tokenizer.
        prompt: Prompt text.

    Returns:
        The ids the model should continue from, matching the prefix produced
        by :func:`encode_example`.
    """
    return _prefix_ids(tokenizer, prompt)


def answer_tokens(row: dict) -> int:
    """Tokens greedy decoding must be allowed (``max_new_tokens``) to reproduce an encoded row's answer: its
    response tokens, the final eos not counted.

    Decoding (``training.greedy_generate``) stops at eos or after ``max_new_tokens`` tokens, whichever comes
    first, and the answer is decoded without special tokens, so an answer of N tokens is matched with
    ``max_new_tokens = N``; N + 1 is not needed (pinned in tests/unit/test_model_and_training.py). The
    preflight's warning (``cli.answers_cut_by_generation_cap``) and benchmarks/curves.py's ``answer_room``
    both count with this.

    Args:
        row: An output of :func:`encode_example` (``input_ids``, ``response_start``).
    """
    return len(row["input_ids"]) - row["response_start"] - 1


def batch_rows(batch: dict) -> list[dict]:
    """A columnar batch (Ray Data numpy batch, or dict of lists) -> the rows `collate` takes."""
    return [{"input_ids": ids, "response_start": int(rs)} for ids, rs in zip(batch["input_ids"], batch["response_start"])]


def collate(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads encoded rows into a batch.

    Args:
        rows: Outputs of :func:`encode_example`; ``input_ids`` may be lists or
            numpy arrays (as returned by ``datasets``).
        pad_id: Id used for padding positions.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each ``[batch, seq]``
        long tensors, ``seq`` being the longest row. ``labels[b, t]`` equals
        ``input_ids[b, t]`` for response positions (``t >= response_start``,
        not padding) and :data:`IGNORE_INDEX` elsewhere. Labels are NOT
        shifted: logits at ``t - 1`` predict ``labels[t]``.

    Raises:
        ValueError: If ``rows`` is empty or a ``response_start`` is out of
            range.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    lengths = [len(row["input_ids"]) for row in rows]
    seq_len = max(lengths)
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    for b, (row, length) in enumerate(zip(rows, lengths)):
        start = int(row["response_start"])
        if not 1 <= start < length:
            raise ValueError(
                f"row {b}: response_start {start} must be in [1, {length}) for a row of "
                f"{length} tokens"
            )
        ids = torch.as_tensor(list(row["input_ids"]), dtype=torch.long)
        input_ids[b, :length] = ids
        attention_mask[b, :length] = 1
        labels[b, start:length] = ids[start:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def soft_target_batch(batch: dict, pad_id: int, top_k: int) -> dict[str, torch.Tensor]:
    """A columnar batch of soft-target rows -> :func:`collate`'s LM batch + the flattened teacher targets.

    The one soft-target batch builder: the Ray workers pass Ray Data numpy batches (list columns as object
    arrays), the plain loops dicts of lists (:func:`shuffled_batches`). Teacher targets are concatenated row
    by row, which is the order :func:`response_positions` gathers logits in.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` as :func:`collate`, plus ``topk_ids`` int64 [n, k],
        ``topk_logprobs`` float32 [n, k] and ``tail_logmass`` float32 [n], n = response tokens in the batch.
        Adaptive-k shards (a ``topk_counts`` column): k = the most kept at a position of this batch, the
        shorter positions padded with log-prob -inf (``pad_top_k``; the KD loss drops those entries).
        Ids stored as uint16 or int32 alike; 8-bit log-prob codes dequantised and renormalised per position
        (``decode_logprobs``).
    """
    out = collate(batch_rows(batch), pad_id)
    tail = np.concatenate(batch["tail_logmass"])  # [n], stored values or codes
    adaptive = batch.get(COUNTS_COLUMN) is not None
    counts = np.concatenate(batch[COUNTS_COLUMN]).astype(np.int64) if adaptive else np.full(tail.shape[0], top_k, np.int64)  # [n]
    ids = np.concatenate(batch["topk_ids"]).astype(np.int64)  # [sum(counts)]
    logprobs, tail = decode_logprobs(np.concatenate(batch["topk_logprobs"]), tail, counts)  # float32
    if adaptive:  # pad to the most kept in this batch, not to top_k
        out["topk_ids"], out["topk_logprobs"] = pad_top_k(ids, logprobs, counts, int(counts.max(initial=1)))  # [n, width], -inf padding
    else:
        out["topk_ids"] = torch.from_numpy(ids).view(-1, top_k)  # [n, k]
        out["topk_logprobs"] = torch.from_numpy(logprobs).view(-1, top_k)
    out["tail_logmass"] = torch.from_numpy(tail)  # [n]
    return out


def to_columns(rows: Sequence[dict]) -> dict[str, list]:
    """Row dicts -> one dict of lists, the columnar shape of a Ray Data batch (keys of the first row)."""
    return {key: [row[key] for row in rows] for key in rows[0]}


def shuffled_batches(rows: list[dict], batch_size: int, seed: int) -> Iterator[dict[str, list]]:
    """Endless columnar batches of `rows` for the loops that run without Ray Data (search proxy, benchmarks).

    Reshuffled every epoch from one generator seeded with `seed` (deterministic); the last incomplete batch
    of an epoch is dropped unless there are fewer rows than `batch_size`, then each batch is all rows.
    """
    rng = random.Random(seed)
    order = list(range(len(rows)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield to_columns([rows[i] for i in order[start:start + batch_size]])


def scheduled_batches(rows: list[dict], batch_size: int, seed: int, schedule: str, groups: list[str],
                      length: int | None = None) -> Iterator[dict[str, list]]:
    """Endless columnar batches of `rows` (each with a "group") in `stream_order(..., schedule, length)`, a new
    order every pass (seed + pass), for loops that run without Ray Data (benchmarks/curves.py); `length`: the
    rows the loop reads in all (steps x batch size), which an "annealed" pass spans. The incomplete last batch
    of a pass is dropped as in `shuffled_batches`."""
    epoch = 0
    while True:
        order = stream_order([r["group"] for r in rows], groups, seed + epoch, schedule, length)
        for start in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield to_columns([rows[i] for i in order[start:start + batch_size]])
        epoch += 1


def response_positions(batch_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Finds the logits positions that predict response tokens.

    Args:
        batch_labels: ``[batch, seq]`` labels from :func:`collate`.

    Returns:
        ``(b_idx, t_idx)`` long tensors such that ``logits[b_idx, t_idx]``
        are the predictions for ``batch_labels[b_idx, t_idx + 1]``. Order is
        row-major: all of row 0's response tokens in sequence, then row 1's,
        and so on, which equals ``batch_labels[batch_labels != IGNORE_INDEX]``.

    Raises:
        ValueError: If a label sits at position 0 (nothing could predict it).
    """
    mask = batch_labels != IGNORE_INDEX
    if batch_labels.shape[-1] and bool(mask[:, 0].any()):
        raise ValueError("labels at position 0 cannot be predicted by any logits position")
    # nonzero() walks the tensor in row-major order, which gives the documented order.
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    return b_idx, t_idx - 1


def training_order(rows: list, seed: int) -> list:
    """The rows in one seeded random order. Rows come grouped by task (and shards by expert group); a training
    stream fed in that order would see one task for many steps, then the next (the local shuffle buffer of the
    workers mixes only a few batches), so every Ray Dataset we train on is built from rows in this order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order]


def stream_order(row_groups: list[str], groups: list[str], seed: int, schedule: str,
                 length: int | None = None) -> list[int]:
    """Row indices in the order of `distill.teacher_schedule` (`row_groups[i]` = row i's group):

    * "interleaved": one epoch, one seeded shuffle of all rows (every group's rows mixed);
    * "sequential": one epoch, each group's rows shuffled, the groups one after another in `groups` order;
    * "annealed": from sequential to interleaved over the whole stream the student reads, `length` rows (its
      steps x batch size; None = one epoch), not over each epoch: each group queues its share of `length`
      (passes over its rows, each shuffled with seed + pass), then in rounds every group, in `groups` order,
      gives one block of half its rows still queued (at least one row). The first half of the stream is one
      expert after another, the blocks halve round by round, and the last rounds alternate the groups row by
      row. The stream holds at least `length` rows (each group's share rounded up).
    """
    if schedule == "interleaved":
        return training_order(list(range(len(row_groups))), seed)
    members = {g: [i for i, x in enumerate(row_groups) if x == g] for g in groups}
    if schedule == "sequential":
        return [i for g in groups for i in training_order(members[g], seed)]
    if schedule != "annealed":
        raise ValueError(f"unknown teacher schedule {schedule!r}; expected interleaved, sequential or annealed")
    length = len(row_groups) if length is None else length
    passes = max(1, -(-length // max(1, len(row_groups))))
    queues = {}
    for g in groups:
        share = -(-length * len(members[g]) // max(1, len(row_groups)))  # its share of the rows read, rounded up
        queues[g] = [i for p in range(passes) for i in training_order(members[g], seed + p)][:share]
    order = []
    while any(queues.values()):
        for g in groups:
            block = (len(queues[g]) + 1) // 2
            order += queues[g][:block]
            queues[g] = queues[g][block:]
    return order
