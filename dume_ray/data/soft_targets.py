"""On-disk format of teacher soft targets: one Parquet row per training example.

Each row holds the full token sequence (prompt + response) and, for every
response token, the teacher's top-k token ids, their log-probs at
temperature 1, and the log of the probability mass outside the top k (the
"tail"); see ``dume_ray.losses`` for how they are consumed.

Storage choice for log-probs: ``topk_logprobs`` is a native Parquet
``list<float16>`` (Arrow ``halffloat``, Parquet FLOAT16 logical type).
pyarrow 26 writes and reads it losslessly (checked by the round-trip test),
which halves the size of the largest column versus float32. Log-probs are
clamped to >= -1e4 before the cast so they stay finite (float16 overflows
to -inf below -65504; e^-1e4 is 0 at any precision anyway).

Adaptive k (``soft_targets.kl_max`` > 0): per response token only the fewest of
the top k tokens are kept whose reconstruction (kept probabilities + the tail
mass spread uniformly over the tokens not kept) is within kl_max nats of the
full distribution, KL(full ‖ reconstruction) <= kl_max; at least one, at most
k. Fine-tuned experts are near-deterministic on most response tokens, so this
spends the bytes on the uncertain ones (benchmarks/storage.py measures it at
V = 49,152). Such a shard has one more column, ``topk_counts`` list<uint8>
[n_resp] (the number kept at each position), and its ``topk_ids`` /
``topk_logprobs`` hold sum(counts) values per row, position by position.
Readers pad each position back to a fixed width with log-prob -inf and the
position's first id (``pad_top_k``); the KD loss ignores those entries.

Compact storage (issue 16's goal: <= 40 bytes/token at <= 0.05 nats KL at
V = 49,152). Token ids are stored as ``uint16`` whenever the vocabulary fits
(V <= 65,536; lossless), ``int32`` otherwise; readers accept both, so shards
written before (int32 at any V) stay readable. ``soft_targets.logprob_bits``
chooses the log-prob codec: 16 (the default) stores ``topk_logprobs`` as
float16 and ``tail_logmass`` as float32, as above; 8 stores both as ``uint8``
codes of a log-quantiser with step ``LOGPROB_STEP`` = 1/16 nat: code
round(-lp / step) for finite lp, clipped to 254, and code 255 = -inf. A top-k
token whose code would be clipped (lp < FLOOR_8BIT, about -15.9 nats: p below
1.3e-7) is not stored: it becomes padding (the position's top-1 id with code
255, dropped on both sides by the KD loss like adaptive-k padding) and its
mass joins the tail; adaptive k keeps fewer tokens instead (their mass in the
tail too). (Format version ``stage_hashes.EIGHT_BIT_FORMAT``.) Clipped, such a token would be overweighted in the tempered target
p^(1/T) at T > 1. Only the tail can be clipped (a tail mass below 1.3e-7,
which only T = 1 uses). The scheme is the one
benchmarks/storage.py measured ("uint16 ids + 8-bit log-probs (1/16 nat) +
8-bit tail") and it imports ``quantise_logprobs`` from here. Readers
dequantise (error <= step/2 per stored value, unless clipped) and renormalise
each position (kept + tail logsumexp to 0), so the KD loss always sees a
distribution; 16-bit values are handed over bit for bit as before. The dtype
of the stored column says which codec a shard used (uint8 = 8 bits).

Pure pyarrow/numpy/torch, no Ray. Test with:

    .venv/bin/python -m pytest tests/unit/test_soft_targets.py -q
"""

from __future__ import annotations

import glob
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

SOFT_TARGET_COLUMNS = (
    "example_id",
    "task",
    "group",
    "input_ids",
    "response_start",
    "topk_ids",
    "topk_logprobs",
    "tail_logmass",
)

COUNTS_COLUMN = "topk_counts"  # adaptive-k shards only: kept tokens per response position

# Lowest stored log-prob; keeps float16 values finite (see module docstring).
LOGPROB_FLOOR = -1.0e4
# Every soft-target shard is written with zstd (pyarrow's default is snappy): 8-20% fewer bytes at no loss on
# SmolLM2's experts (benchmarks/results/storage_smollm2.json, "zstd" beside "snappy"); any codec reads back.
PARQUET_WRITE_ARGS = {"compression": "zstd", "compression_level": 9}  # what the benchmark measured

LOGPROB_BITS = (16, 8)  # soft_targets.logprob_bits: float16 log-probs + float32 tail, or 8-bit codes for both
LOGPROB_STEP = 1.0 / 16  # nats per 8-bit code (the step benchmarks/storage.py measured)
FLOOR_8BIT = -(2 ** 8 - 1.5) * LOGPROB_STEP  # -15.906: log-probs from here up get codes <= 254, never clipped
UINT16_VOCAB = 1 << 16  # vocabularies up to this size store their ids as uint16
# validate_shard's tolerance on each position's logsumexp: float16 rounding, or half an 8-bit step (+ slack for the
# clipped codes, each worth < 1.3e-7 of mass)
ATOL = {16: 2e-2, 8: LOGPROB_STEP / 2 + 1e-3}
_LIST_COLUMNS = ("input_ids", "topk_ids", "topk_logprobs", "tail_logmass", COUNTS_COLUMN)


class SoftTargetError(ValueError):
    """A soft-target shard is unreadable or violates the format."""


def id_dtype(vocab_size: Optional[int]) -> type:
    """numpy dtype of stored top-k ids: uint16 when the vocabulary fits (V <= 65,536), else int32; None (the
    vocabulary not given) = int32, the format every shard had before ids were narrowed."""
    return np.uint16 if vocab_size is not None and vocab_size <= UINT16_VOCAB else np.int32


def _check_bits(logprob_bits: int) -> None:
    if logprob_bits not in LOGPROB_BITS:
        raise ValueError(f"logprob_bits must be one of {LOGPROB_BITS}, got {logprob_bits!r}")


def soft_target_schema(top_k: int, adaptive: bool = False, vocab_size: Optional[int] = None,
                       logprob_bits: int = 16) -> pa.Schema:
    """Arrow schema of a soft-target shard.

    Fields: ``example_id``/``task``/``group`` strings; ``input_ids``
    list<int32> (prompt + response); ``response_start`` int32 (index of the
    first response token, so logits at positions response_start-1 .. len-2
    score the n_resp = len(input_ids) - response_start response tokens);
    ``topk_ids`` list<uint16> (V <= 65,536) or list<int32>, and
    ``topk_logprobs`` list<float16> (logprob_bits 16) or list<uint8> (8), both
    the row-major flattening of [n_resp, k]; ``tail_logmass`` list<float32>
    (16) or list<uint8> (8), [n_resp]. Metadata ``b"top_k"`` holds str(k).
    Adaptive shards add ``topk_counts`` list<uint8> [n_resp] and their top-k
    lists hold sum(counts) values (k is then the most kept at a position).

    Args:
        top_k: Number of teacher tokens kept per position (the cap, adaptive).
        adaptive: Whether the shard keeps a variable number per position.
        vocab_size: The teacher's vocabulary size, which decides the id type
            (``id_dtype``); None = int32 ids.
        logprob_bits: 16 or 8 (``soft_targets.logprob_bits``).

    Returns:
        The schema.
    """
    _check_bits(logprob_bits)
    counts = [pa.field(COUNTS_COLUMN, pa.list_(pa.uint8()))] if adaptive else []
    lp_type, tail_type = (pa.float16(), pa.float32()) if logprob_bits == 16 else (pa.uint8(), pa.uint8())
    return pa.schema(
        [
            pa.field("example_id", pa.string()),
            pa.field("task", pa.string()),
            pa.field("group", pa.string()),
            pa.field("input_ids", pa.list_(pa.int32())),
            pa.field("response_start", pa.int32()),
            pa.field("topk_ids", pa.list_(pa.from_numpy_dtype(id_dtype(vocab_size)))),
            pa.field("topk_logprobs", pa.list_(lp_type)),
            pa.field("tail_logmass", pa.list_(tail_type)),
        ] + counts,
        metadata={b"top_k": str(int(top_k)).encode()},
    )


# --------------------------------------------------------------------------
# 8-bit log-prob codes
# --------------------------------------------------------------------------


def quantise_logprobs(values: np.ndarray, bits: int = 8, step: float = LOGPROB_STEP) -> np.ndarray:
    """Log-probs (<= 0, -inf allowed) -> unsigned codes: round(-lp / step) for finite lp, clipped to
    2^bits - 2; -inf -> 2^bits - 1. uint8 array of the same shape (values < 2^bits; benchmarks/storage.py packs
    its 4-bit codes two per byte). The error of a decoded finite value is <= step/2 unless it was clipped
    (lp < -(2^bits - 2)·step)."""
    top = 2 ** bits - 1
    lp = np.asarray(values, dtype=np.float64)
    if np.isnan(lp).any():  # NaN would become code 0, a log-prob of 0: a silent certainty
        raise ValueError(f"log-probs to quantise hold NaN at flat index {int(np.flatnonzero(np.isnan(lp))[0])}")
    with np.errstate(invalid="ignore"):
        codes = np.clip(np.rint(-lp / step), 0, top - 1)
    return np.where(np.isneginf(lp), top, codes).astype(np.uint8)


def dequantise_logprobs(codes: np.ndarray, bits: int = 8, step: float = LOGPROB_STEP) -> np.ndarray:
    """quantise_logprobs' codes -> float32 log-probs (code 2^bits - 1 -> -inf)."""
    codes = np.asarray(codes)
    return np.where(codes == 2 ** bits - 1, -np.inf, -codes.astype(np.float32) * step).astype(np.float32)


def _encode_values(values: Tensor, tail: Tensor, logprob_bits: int) -> Tuple[np.ndarray, np.ndarray]:
    """Stored top-k log-probs and tail: float16 (clamped to LOGPROB_FLOOR) + float32, or 8-bit codes."""
    _check_bits(logprob_bits)
    values, tail = values.detach().float().cpu().numpy(), tail.detach().float().cpu().numpy()
    if logprob_bits == 8:
        return quantise_logprobs(values), quantise_logprobs(tail)
    return np.maximum(values, LOGPROB_FLOOR).astype(np.float16), tail.astype(np.float32)


def decode_logprobs(topk_values: Any, tail_values: Any, counts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Stored log-prob columns (flat, position by position) -> float32 log-probs for the KD loss.

    float16/float32 columns (logprob_bits 16) are returned as stored, bit for bit. Integer codes
    (logprob_bits 8: uint8 from Parquet or Ray Data, Python ints from ``to_pylist``) are dequantised and every
    position renormalised, its counts[t] kept values + tail shifted by their logsumexp so they sum to 1.

    Args:
        topk_values: [sum(counts)] stored top-k values.
        tail_values: [positions] stored tail values.
        counts: [positions] values kept at each position (k for fixed-k shards).

    Returns:
        (topk_logprobs float32 [sum(counts)], tail_logmass float32 [positions]).
    """
    topk, tail = np.asarray(topk_values), np.asarray(tail_values)
    if topk.dtype.kind not in "ui":  # float16 / float32 as stored (an empty list reads as float64)
        return topk.astype(np.float32), tail.astype(np.float32)
    topk, tail = dequantise_logprobs(topk), dequantise_logprobs(tail)
    if tail.size == 0:
        return topk, tail
    total = position_logmass(topk, np.asarray(counts, dtype=np.int64), tail)  # [positions]
    return ((topk - np.repeat(total, counts)).astype(np.float32), (tail - total).astype(np.float32))


def position_logmass(logps: np.ndarray, counts: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """logsumexp of each position's kept log-probs and its tail, float64 [positions]; position t owns
    logps[starts[t]:starts[t] + counts[t]] (counts >= 1, its first value finite: the largest kept)."""
    logps, tail = np.asarray(logps, dtype=np.float64), np.asarray(tail, dtype=np.float64)
    starts = np.zeros(counts.size, dtype=np.int64)  # [positions]
    np.cumsum(counts[:-1], out=starts[1:])
    peak = np.maximum(np.maximum.reduceat(logps, starts), tail)  # [positions], finite
    position = np.repeat(np.arange(counts.size), counts)  # [sum(counts)]
    mass = np.add.reduceat(np.exp(logps - peak[position]), starts) + np.exp(tail - peak)  # [positions]
    return peak + np.log(mass)


# --------------------------------------------------------------------------
# Encode / decode
# --------------------------------------------------------------------------


def encode_top_k(logprobs: Tensor, k: int, logprob_bits: int = 16) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compress full teacher log-probs to top-k + tail.

    Args:
        logprobs: Teacher ``log_softmax`` output at T=1, [n, V].
        k: Tokens to keep per position; clamped to V.
        logprob_bits: 16 (float16 log-probs, float32 tail) or 8 (uint8 codes, ``quantise_logprobs``).

    Returns:
        (topk_ids [n, k] uint16 (V <= 65,536) or int32, topk_logprobs
        float16/uint8 [n, k], tail_logmass float32/uint8 [n]). The tail is the
        exact logsumexp of the non-top-k log-probs in float32 (-inf when
        k >= V) before it is stored. At 8 bits a top-k token below
        FLOOR_8BIT is stored as padding (the top-1 id, code 255 = -inf: the
        KD loss drops it on both sides, as adaptive-k padding) and its mass
        (< 1.3e-7) joins the tail (`_floor_to_tail`).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k!r}")
    logp = logprobs.detach().float()  # [n, V]
    n, vocab = logp.shape
    k = min(k, vocab)
    values, ids = torch.topk(logp, k, dim=-1)  # [n, k], [n, k]
    if k == vocab:
        tail = torch.full((n,), float("-inf"))  # [n]
    else:
        # A mask + logsumexp is exact; log1p(-sum p_topk) cancels badly when
        # the top k hold nearly all the mass.
        in_topk = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, ids, True)  # [n, V]
        tail = torch.logsumexp(logp.masked_fill(in_topk, float("-inf")), dim=-1)  # [n]
    if logprob_bits == 8:  # top-k tokens below the 8-bit floor: stored as padding; the top-1 never is (>= -log V)
        ids, values, tail = _floor_to_tail(ids, values, tail)
    return (ids.cpu().numpy().astype(id_dtype(vocab)), *_encode_values(values, tail, logprob_bits))


def _floor_to_tail(ids: Tensor, values: Tensor, tail: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """8-bit codes cannot hold a log-prob below FLOOR_8BIT: such a top-k token becomes padding, as adaptive k
    pads (its id replaced by the position's top-1 id, its value -inf: dropped on both sides) and its mass
    joins the tail. Both sides then count a student's mass on that token in the tail bucket; keeping its
    own id with a -inf value would count it nowhere, and reverse KL would pay the student to move mass there."""
    below = values < FLOOR_8BIT  # [n, k]
    if not bool(below.any()):
        return ids, values, tail
    tail = torch.logaddexp(tail, torch.logsumexp(values.masked_fill(~below, float("-inf")), dim=-1))  # [n]
    return (torch.where(below, ids[:, :1].expand_as(ids), ids), values.masked_fill(below, float("-inf")), tail)


def kept_counts(logprobs: Tensor, k: int, kl_max: float, chunk: int = 256) -> Tensor:
    """Per position, the fewest top tokens (1..k) whose reconstruction is within ``kl_max`` nats.

    The reconstruction keeps the j most likely tokens' probabilities and
    spreads the rest, m_j, uniformly over the other V - j tokens, so
    KL_j = sum_{i not kept} p_i log p_i - m_j log(m_j / (V - j)), exact from
    the full log-probs (float64, m_j by logsumexp: no 1 - cumsum
    cancellation). Positions where no j <= k qualifies keep k.

    Args:
        logprobs: Teacher ``log_softmax`` output at T=1, [n, V].
        k: Most tokens kept; clamped to V.
        kl_max: Largest KL(full ‖ reconstruction) in nats.

    Returns:
        int64 counts, [n], in [1, min(k, V)].
    """
    n, vocab = logprobs.shape
    k = min(k, vocab)
    out = []
    for start in range(0, n, chunk):
        ids = torch.topk(logprobs[start:start + chunk].detach().float(), k, dim=-1).indices  # [c, k]: encode_top_k's order
        lp = logprobs[start:start + chunk].detach().double()  # [c, V]
        values = lp.gather(-1, ids)  # [c, k], descending
        beyond = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), -1, keepdim=True)  # [c, 1], -inf if k == V
        rest = torch.logcumsumexp(values.flip(-1), dim=-1).flip(-1)  # [c, k]: logsumexp(values[j:])
        tails = torch.cat([torch.logaddexp(beyond, rest[:, 1:]), beyond], dim=1)  # [c, k]: log m_j, j = 1..k
        p_logp = (lp.exp() * lp).nan_to_num(0.0)  # [c, V]; 0 log 0 = 0
        tail_plogp = p_logp.sum(-1, keepdim=True) - torch.cumsum(p_logp.gather(-1, ids), dim=-1)  # [c, k]
        others = (vocab - torch.arange(1, k + 1, dtype=torch.float64)).clamp_min(1.0)  # [k]
        kl = tail_plogp - (tails.exp() * (tails - others.log())).nan_to_num(0.0)  # [c, k]
        ok = kl <= kl_max  # [c, k]
        out.append(torch.where(ok.any(-1), ok.to(torch.int8).argmax(-1) + 1, torch.full_like(ok[:, 0], k, dtype=torch.int64)))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def encode_adaptive_top_k(logprobs: Tensor, k: int, kl_max: float,
                          logprob_bits: int = 16) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Compress full teacher log-probs to a variable number of top tokens + tail (see ``kept_counts``).

    At logprob_bits 8 a position keeps no token below the 8-bit floor (-15.875 nats, p < 1.3e-7), whatever
    the KL rule asks (it moves the reconstruction by ~1e-6 nats at most): such a code would be clipped, which
    at T > 1 would overweight the token in the tempered target. Only the tail can then be clipped (T = 1 only).

    Returns:
        (topk_ids uint16/int32 [sum(counts)] (as ``encode_top_k``),
        topk_logprobs float16/uint8 [sum(counts)], tail_logmass float32/uint8
        [n] (the exact log-mass of the tokens not kept, -inf when all V are),
        counts uint8 [n]); the flat arrays list each position's kept tokens in
        descending probability, position by position.
    """
    counts = kept_counts(logprobs, k, kl_max)  # [n]
    logp = logprobs.detach().float()  # [n, V]
    k = min(k, logp.shape[1])
    values, ids = torch.topk(logp, k, dim=-1)  # [n, k]
    if logprob_bits == 8:  # never keep a token whose code would be clipped: its mass (< 1.3e-7) joins the exact tail
        above = (values >= FLOOR_8BIT).sum(-1)  # [n]; values descend, so a prefix
        counts = torch.minimum(counts, above.clamp_min(1))
    kept = torch.arange(k).unsqueeze(0) < counts.unsqueeze(1)  # [n, k]
    in_kept = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, ids, kept)  # [n, V]
    tail = torch.logsumexp(logp.masked_fill(in_kept, float("-inf")), dim=-1)  # [n]
    return (ids[kept].cpu().numpy().astype(id_dtype(logp.shape[1])), *_encode_values(values[kept], tail, logprob_bits),
            counts.cpu().numpy().astype(np.uint8))


def pad_top_k(ids: np.ndarray, logprobs: np.ndarray, counts: np.ndarray, width: int) -> Tuple[Tensor, Tensor]:
    """Flat variable-length top-k values -> fixed-width tensors for ``kd_loss``.

    Position t's counts[t] values fill the first columns of row t; the rest
    repeat the position's first id with log-prob -inf, which the KD loss
    treats as absent (no teacher mass, the student's entry dropped, and the
    repeated id changes nothing in the student's tail).

    Returns:
        (topk_ids int64 [n, width], topk_logprobs float32 [n, width]).
    """
    counts = np.asarray(counts, dtype=np.int64)  # [n]
    n = counts.shape[0]
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    col = np.arange(width)[None, :]  # [1, width]
    kept = col < counts[:, None]  # [n, width]
    src = np.where(kept, starts[:, None] + col, starts[:, None])  # [n, width]
    ids = np.asarray(ids, dtype=np.int64)[src] if n else np.zeros((0, width), np.int64)
    lps = np.where(kept, np.asarray(logprobs, dtype=np.float32)[src], -np.inf) if n else np.zeros((0, width), np.float32)
    return torch.from_numpy(ids), torch.from_numpy(lps.astype(np.float32))


def decode_top_k(row: Mapping[str, Any], top_k: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Turn one stored row back into tensors for ``kd_loss``.

    Accepts values as Python lists (pyarrow ``to_pylist()``) or numpy arrays
    (a row taken from a Ray Data numpy batch, where list columns are object
    arrays holding one ndarray per row).

    Args:
        row: Mapping with at least ``topk_ids``, ``topk_logprobs`` and
            ``tail_logmass``.
        top_k: k the shard was written with.

    Returns:
        (topk_ids int64 [n_resp, k], topk_logprobs float32 [n_resp, k],
        tail_logmass float32 [n_resp]).

    Raises:
        SoftTargetError: If the flattened lengths do not match [n_resp, k].
    """
    # np.array copies: Arrow-backed arrays are read-only, torch wants writable.
    ids = np.asarray(row["topk_ids"]).astype(np.int64)  # [n_resp * k], stored uint16 or int32
    logps, tail = np.asarray(row["topk_logprobs"]), np.array(row["tail_logmass"])  # stored values or 8-bit codes
    n_resp = tail.shape[0]
    adaptive = row.get(COUNTS_COLUMN) is not None
    counts = np.asarray(row[COUNTS_COLUMN], dtype=np.int64) if adaptive else np.full(n_resp, top_k, dtype=np.int64)  # [n_resp]
    if adaptive and (counts.size != n_resp or ids.size != counts.sum() or logps.size != counts.sum()):
        raise SoftTargetError(
            f"example_id={row.get('example_id')!r}: topk_ids/topk_logprobs have {ids.size}/{logps.size} "
            f"values and {counts.size} counts, expected sum(counts) = {counts.sum()} and n_resp = {n_resp}"
        )
    if not adaptive and (ids.size != n_resp * top_k or logps.size != n_resp * top_k):
        raise SoftTargetError(
            f"example_id={row.get('example_id')!r}: topk_ids/topk_logprobs have "
            f"{ids.size}/{logps.size} values, expected n_resp*k = {n_resp}*{top_k}"
        )
    logps, tail = decode_logprobs(logps, tail, counts)  # float32; 8-bit codes dequantised and renormalised
    if adaptive:  # pad each position to top_k
        return (*pad_top_k(ids, logps, counts, top_k), torch.from_numpy(tail))
    return (
        torch.from_numpy(ids.reshape(n_resp, top_k)),
        torch.from_numpy(logps.reshape(n_resp, top_k)),
        torch.from_numpy(tail),
    )


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _list_column(values: Sequence[Any], dtype: Any, arrow_type: pa.DataType) -> pa.Array:
    # Building flat values + offsets from numpy is fast and accepts lists,
    # 1-D or 2-D arrays alike (2-D [n_resp, k] is flattened row-major).
    flats = [np.asarray(v, dtype=dtype).reshape(-1) for v in values]
    offsets = np.zeros(len(flats) + 1, dtype=np.int32)
    np.cumsum([f.size for f in flats], out=offsets[1:])
    flat = np.concatenate(flats) if flats else np.zeros(0, dtype=dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=arrow_type))


def rows_to_table(rows: List[Dict[str, Any]], top_k: int, adaptive: bool = False, vocab_size: Optional[int] = None,
                  logprob_bits: int = 16) -> pa.Table:
    """Build a shard table from row dicts (values may be lists or arrays).

    Args:
        rows: One dict per example with every column in SOFT_TARGET_COLUMNS
            (and ``topk_counts`` when adaptive), values as encoded for
            ``logprob_bits`` (``encode_top_k``).
        top_k: k used for encoding (stored in the schema metadata).
        adaptive: Write the adaptive-k format (``topk_counts`` column).
        vocab_size: The teacher's vocabulary size (the id type; None = int32).
        logprob_bits: 16 or 8, as the values were encoded.

    Returns:
        A table with exactly ``soft_target_schema(top_k, adaptive, vocab_size, logprob_bits)``.
    """
    schema = soft_target_schema(top_k, adaptive, vocab_size, logprob_bits)
    columns = []
    for field in schema:
        values = [r[field.name] for r in rows]
        if field.name in _LIST_COLUMNS:
            columns.append(_list_column(values, field.type.value_type.to_pandas_dtype(), field.type.value_type))
        elif field.name == "response_start":
            columns.append(pa.array(np.asarray(values, dtype=np.int32), type=pa.int32()))
        else:
            columns.append(pa.array([str(v) for v in values], type=pa.string()))
    return pa.Table.from_arrays(columns, schema=schema)


def targets_table(rows: Sequence[Mapping[str, Any]], logprobs: Tensor, top_k: int, kl_max: float = 0.0,
                  logprob_bits: int = 16) -> pa.Table:
    """The shard table of `rows` from the teacher's log-probs at their response tokens: what ``TeacherScorer``
    writes (and benchmarks/storage.py measures), fixed k or adaptive (kl_max > 0), in the codec of logprob_bits,
    ids typed by the vocabulary (the log-probs' width).

    Args:
        rows: Encoded examples (``example_id``, ``task``, ``group``, ``input_ids``, ``response_start``).
        logprobs: Teacher ``log_softmax`` at T=1 of every response token, rows in order, [n, V].
        top_k: Tokens kept per position (the cap when adaptive); clamped to V.
        kl_max: > 0: adaptive k (``encode_adaptive_top_k``).
        logprob_bits: 16 or 8.

    Returns:
        A table in ``soft_target_schema(min(top_k, V), kl_max > 0, V, logprob_bits)``.
    """
    vocab = logprobs.shape[1]
    k = min(top_k, vocab)
    if kl_max > 0:  # flat [sum(counts)] values, counts [n]; rows slice them at the running sum of counts
        topk_ids, topk_logprobs, tail_logmass, counts = encode_adaptive_top_k(logprobs, k, kl_max, logprob_bits)
        ends = np.cumsum(counts, dtype=np.int64)  # [n]
    else:
        topk_ids, topk_logprobs, tail_logmass = encode_top_k(logprobs, k, logprob_bits)  # [n, k], [n, k], [n]
    out, offset = [], 0
    for row in rows:
        n_resp = len(row["input_ids"]) - row["response_start"]
        out.append({"example_id": row["example_id"], "task": row["task"], "group": row["group"],
                    "input_ids": row["input_ids"], "response_start": row["response_start"],
                    "tail_logmass": tail_logmass[offset:offset + n_resp]})
        if kl_max > 0:
            lo, hi = (ends[offset - 1] if offset else 0), ends[offset + n_resp - 1]
            out[-1].update(topk_ids=topk_ids[lo:hi], topk_logprobs=topk_logprobs[lo:hi], **{COUNTS_COLUMN: counts[offset:offset + n_resp]})
        else:
            out[-1].update(topk_ids=topk_ids[offset:offset + n_resp], topk_logprobs=topk_logprobs[offset:offset + n_resp])
        offset += n_resp
    if offset != logprobs.shape[0]:
        raise ValueError(f"rows have {offset} response tokens, log-probs {logprobs.shape[0]}")
    return rows_to_table(out, k, kl_max > 0, vocab, logprob_bits)


def int32_ids(table: pa.Table) -> pa.Table:
    """`table` with its ``topk_ids`` as list<int32>: shards with uint16 ids and older ones with int32 ids (a
    run's groups kept from before ids were narrowed) in one stream need one schema."""
    i = table.schema.get_field_index("topk_ids")
    return table.set_column(i, table.schema.field(i).with_type(pa.list_(pa.int32())),
                            table.column(i).cast(pa.list_(pa.int32())))


def write_shard(table: pa.Table, path: str) -> None:
    """Write a shard atomically: to ``path + ".tmp"``, fsync, then rename.

    Readers (and resumed jobs checking which shards exist) therefore never
    see a half-written file under the final name. Local filesystems only.

    Args:
        table: Table to write (normally from rows_to_table).
        path: Final Parquet path; parent directories are created.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, **PARQUET_WRITE_ARGS)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def validate_shard(path: str, vocab_size: int, top_k: int, atol: Optional[float] = None, adaptive: bool = False,
                   logprob_bits: int = 16) -> int:
    """Check a shard against the format and the teacher's probability axioms.

    Checks: readable Parquet; schema equals soft_target_schema(top_k,
    adaptive, vocab_size, logprob_bits) or the same with int32 ids (shards
    written before ids were narrowed), metadata ignored, and metadata top_k
    matches; no nulls; per row
    0 < response_start < len(input_ids), flattened top-k lengths equal
    n_resp * k and the tail length n_resp, every id in [0, vocab_size),
    top-k log-probs finite and <= atol, tail finite or -inf, and each
    position's logsumexp(topk_logprobs ∪ tail) within atol of 0. Adaptive
    shards: counts in [1, k], n_resp of them, and sum(counts) top-k values.

    Args:
        path: Shard file.
        vocab_size: Teacher/student vocabulary size.
        top_k: Expected k.
        atol: Tolerance for the log-prob checks; None = ``ATOL[logprob_bits]``
            (float16 rounding, or half an 8-bit step; 8-bit codes are checked
            dequantised, before the reader's renormalisation).
        adaptive: Expect the adaptive-k format (``topk_counts``).
        logprob_bits: Expected codec, 16 or 8.

    Returns:
        Number of rows.

    Raises:
        SoftTargetError: On the first violation; the message names the file
            and, for row-level problems, the row index, example_id and field.
    """
    table = _read_shard(path, top_k, adaptive, vocab_size, logprob_bits)
    if table.num_rows == 0:
        return 0
    fail = _row_error(path, table)
    _check_no_nulls(table, fail)
    lists = {name: _flat_list(table.column(name)) for name in _LIST_COLUMNS if name in table.column_names}  # (values, offsets)
    counts = _check_lengths(table, lists, top_k, fail)
    _check_ids(lists, vocab_size, fail)
    if logprob_bits == 8:  # checked as the reader decodes them, before its renormalisation
        for name in ("topk_logprobs", "tail_logmass"):
            lists[name] = (dequantise_logprobs(lists[name][0]), lists[name][1])
    _check_distributions(lists, counts, ATOL[logprob_bits] if atol is None else atol, fail, absent_ok=logprob_bits == 8)
    return table.num_rows


def validate_shards(directory: str, vocab_size: int, top_k: int, expected_rows: int, adaptive: bool = False,
                    logprob_bits: int = 16) -> int:
    """Validate every Parquet shard in `directory` and the total row count; raises SoftTargetError naming
    the bad file (or FileNotFoundError when there are no shards)."""
    paths = sorted(glob.glob(os.path.join(directory, "*.parquet")))
    if not paths:
        raise FileNotFoundError(f"no soft-target shards in {directory}")
    rows = sum(validate_shard(p, vocab_size, top_k, adaptive=adaptive, logprob_bits=logprob_bits) for p in paths)
    if rows != expected_rows:
        raise SoftTargetError(f"{directory}: {len(paths)} shards hold {rows} rows, expected {expected_rows} "
                              f"(one per training example): a shard is missing or extra")
    return rows


RowError = Callable[[int, str, str], SoftTargetError]


def _read_shard(path: str, top_k: int, adaptive: bool, vocab_size: int, logprob_bits: int) -> pa.Table:
    """The shard's table, after checking that it reads and has the expected schema (ids uint16 where V fits, or
    int32 as every shard had before) and metadata top_k."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        # Truncated files raise ArrowInvalid; wrap so callers handle one type.
        raise SoftTargetError(f"{path}: cannot read Parquet file: {e}") from e

    expected = soft_target_schema(top_k, adaptive, vocab_size, logprob_bits)
    old_ids = soft_target_schema(top_k, adaptive, None, logprob_bits)  # int32 ids
    if not (table.schema.equals(expected, check_metadata=False) or table.schema.equals(old_ids, check_metadata=False)):
        raise SoftTargetError(
            f"{path}: schema mismatch: got {_schema_str(table.schema)}, "
            f"expected {_schema_str(expected)}"
        )
    meta_k = (table.schema.metadata or {}).get(b"top_k")
    if meta_k != str(int(top_k)).encode():
        raise SoftTargetError(f"{path}: metadata top_k={meta_k!r}, expected {top_k}")
    return table


def _row_error(path: str, table: pa.Table) -> RowError:
    """fail(row, field, msg): the error naming the file, row index, example_id and field."""
    example_ids = table.column("example_id")

    def fail(row: int, field: str, msg: str) -> SoftTargetError:
        eid = example_ids[row].as_py()
        return SoftTargetError(f"{path}: row {row} (example_id={eid!r}): {field} {msg}")

    return fail


def _check_no_nulls(table: pa.Table, fail: RowError) -> None:
    for name in table.column_names:
        col = table.column(name)
        if col.null_count:
            row = int(np.flatnonzero(pc.is_null(col).to_numpy(zero_copy_only=False))[0])
            raise fail(row, name, "is null")


def _check_lengths(table: pa.Table, lists: Dict[str, Tuple[np.ndarray, np.ndarray]], top_k: int,
                   fail: RowError) -> np.ndarray:
    """0 < response_start < len(input_ids), n_resp tail values (and counts, each in [1, k]) per row, and
    n_resp * k (adaptive: sum(counts)) top-k values. Returns the kept count of every position, [positions]."""
    seq_len = np.diff(lists["input_ids"][1])  # [rows]
    start = table.column("response_start").to_numpy().astype(np.int64)  # [rows]
    bad = np.flatnonzero((start <= 0) | (start >= seq_len))
    if bad.size:
        r = int(bad[0])
        raise fail(r, "response_start", f"{start[r]} not in (0, len(input_ids)={seq_len[r]})")
    n_resp = seq_len - start  # [rows]

    def check(name: str, want: np.ndarray, why: str) -> None:
        length = np.diff(lists[name][1])  # [rows]
        bad = np.flatnonzero(length != want)
        if bad.size:
            r = int(bad[0])
            raise fail(r, name, f"has {length[r]} values, expected {want[r]} ({why.format(n=n_resp[r])})")

    check("tail_logmass", n_resp, "n_resp={n}")
    if COUNTS_COLUMN not in lists:
        for name in ("topk_ids", "topk_logprobs"):
            check(name, n_resp * top_k, f"n_resp={{n}} x {top_k}")
        return np.full(int(n_resp.sum()), top_k, dtype=np.int64)
    check(COUNTS_COLUMN, n_resp, "n_resp={n}")
    counts, offsets = lists[COUNTS_COLUMN]
    counts = counts.astype(np.int64)  # [positions]
    bad = np.flatnonzero((counts < 1) | (counts > top_k))
    if bad.size:
        raise fail(_row_of(offsets, bad[0]), COUNTS_COLUMN, f"has count {counts[bad[0]]}, expected 1..{top_k}")
    per_row = np.add.reduceat(counts, offsets[:-1]) if counts.size else np.zeros_like(n_resp)  # [rows]; n_resp >= 1
    for name in ("topk_ids", "topk_logprobs"):
        check(name, per_row, "sum of topk_counts")
    return counts


def _check_ids(lists: Dict[str, Tuple[np.ndarray, np.ndarray]], vocab_size: int, fail: RowError) -> None:
    for name in ("input_ids", "topk_ids"):
        values, offsets = lists[name]
        bad = np.flatnonzero((values < 0) | (values >= vocab_size))
        if bad.size:
            r, value = _row_of(offsets, bad[0]), int(values[bad[0]])
            problem = (
                f"id {value} >= vocab_size {vocab_size}" if value >= 0 else f"negative id {value}"
            )
            raise fail(r, name, f"has {problem}")


def _check_distributions(lists: Dict[str, Tuple[np.ndarray, np.ndarray]], counts: np.ndarray, atol: float,
                         fail: RowError, absent_ok: bool = False) -> None:
    """Top-k log-probs finite and <= atol (absent_ok, 8 bits: -inf too, but never a position's first), tail
    finite or -inf, each position's buckets logsumexp to 0."""
    logps, lp_offsets = lists["topk_logprobs"]
    logps = logps.astype(np.float64)  # [sum(counts)]
    starts = np.zeros(counts.size, dtype=np.int64)  # [positions]: each position's first (largest) value
    np.cumsum(counts[:-1], out=starts[1:])
    first = np.zeros(logps.size, dtype=bool)
    first[starts] = True
    absent = np.isneginf(logps) & (first | (not absent_ok))
    bad = np.flatnonzero(np.isnan(logps) | (logps > atol) | (logps == np.inf) | absent)
    if bad.size:
        r = _row_of(lp_offsets, bad[0])
        raise fail(r, "topk_logprobs", f"has value {logps[bad[0]]}, expected finite and <= 0")

    tail, tail_offsets = lists["tail_logmass"]
    tail = tail.astype(np.float64)  # [positions]
    bad = np.flatnonzero(np.isnan(tail) | (tail == np.inf))
    if bad.size:
        r = _row_of(tail_offsets, bad[0])
        raise fail(r, "tail_logmass", f"has value {tail[bad[0]]}, expected finite or -inf")

    # Lengths are consistent (checked first), so positions line up across columns: position t owns
    # logps[starts[t]:starts[t] + counts[t]], its largest kept log-prob first (finite).
    total = position_logmass(logps, counts, tail)  # [positions]
    bad = np.flatnonzero(np.abs(total) > atol)
    if bad.size:
        r = _row_of(tail_offsets, bad[0])
        pos = int(bad[0] - tail_offsets[r])
        raise fail(
            r, "topk_logprobs+tail_logmass",
            f"logsumexp at response position {pos} is {total[bad[0]]:.4f}, expected 0 ± {atol}",
        )


def _flat_list(col: pa.ChunkedArray) -> Tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets [rows+1] starting at 0) of a null-free list column."""
    arr = col.combine_chunks()  # ListArray, possibly a slice
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values, offsets - offsets[0]


def _row_of(offsets: np.ndarray, flat_index: int) -> int:
    # Row whose [offsets[r], offsets[r+1]) span contains flat_index.
    return int(np.searchsorted(offsets, flat_index, side="right") - 1)


def _schema_str(schema: pa.Schema) -> str:
    return "{" + ", ".join(f"{f.name}: {f.type}" for f in schema) + "}"
