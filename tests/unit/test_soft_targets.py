"""Round trip and validation of the Parquet soft-target shard format.

Run: cd /work/main && .venv/bin/python -m pytest tests/unit/test_soft_targets.py -q
"""

import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dume_ray.data.soft_targets import (
    SOFT_TARGET_COLUMNS,
    SoftTargetError,
    decode_top_k,
    encode_top_k,
    rows_to_table,
    soft_target_schema,
    validate_shard,
    write_shard,
)

VOCAB, TOP_K = 64, 5


def _make_rows(n_rows=4, seed=0, vocab=VOCAB, k=TOP_K):
    """Rows from a random teacher; also returns each row's full log-probs [n_resp, V]."""
    gen = torch.Generator().manual_seed(seed)
    rows, full = [], []
    for i in range(n_rows):
        prompt_len, n_resp = 3 + i, 2 + i
        input_ids = torch.randint(0, vocab, (prompt_len + n_resp,), generator=gen)
        logp = torch.log_softmax(torch.randn(n_resp, vocab, generator=gen) * 3, -1)  # [n_resp, V]
        ids, lps, tail = encode_top_k(logp, k)
        rows.append(
            dict(
                example_id=f"reverse/train/{i}", task="reverse", group="string",
                input_ids=input_ids.tolist(), response_start=prompt_len,
                topk_ids=ids.reshape(-1).tolist(), topk_logprobs=lps.reshape(-1),
                tail_logmass=tail,
            )
        )
        full.append(logp)
    return rows, full


def _write(tmp_path, rows, k=TOP_K, name="shard-00003.parquet"):
    path = str(tmp_path / name)
    write_shard(rows_to_table(rows, k), path)
    return path


# ---------------------------------------------------------------- encode/decode


def test_round_trip_through_parquet_preserves_values(tmp_path):
    rows, full = _make_rows()
    path = _write(tmp_path, rows)
    table = pq.read_table(path)
    assert table.schema.field("topk_logprobs").type == pa.list_(pa.float16())
    for row, logp in zip(table.to_pylist(), full):
        ids, lps, tail = decode_top_k(row, TOP_K)
        want_lps, want_ids = torch.topk(logp, TOP_K, -1)
        assert ids.dtype == torch.int64 and lps.dtype == torch.float32
        assert torch.equal(ids, want_ids)
        # float16 has a 10-bit mantissa: relative error <= 2**-11.
        assert torch.allclose(lps, want_lps, rtol=2**-10, atol=0)
        want_tail = torch.logsumexp(logp.scatter(-1, want_ids, float("-inf")), -1)
        assert torch.allclose(tail, want_tail, atol=1e-5)


def test_decode_accepts_numpy_values_like_ray_batches(tmp_path):
    rows, _ = _make_rows(n_rows=2)
    table = pq.read_table(_write(tmp_path, rows))
    from_lists = decode_top_k(table.to_pylist()[1], TOP_K)
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in SOFT_TARGET_COLUMNS}
    row = {c: batch[c][1] for c in batch}  # object arrays of ndarrays -> one ndarray each
    from_numpy = decode_top_k(row, TOP_K)
    for a, b in zip(from_lists, from_numpy):
        assert torch.equal(a, b)


def test_tail_is_neg_inf_when_k_equals_vocab():
    logp = torch.log_softmax(torch.randn(3, 8), -1)
    ids, lps, tail = encode_top_k(logp, 8)
    assert ids.shape == (3, 8) and np.isneginf(tail).all()
    ids, _, tail = encode_top_k(logp, 100)  # k is clamped to V
    assert ids.shape == (3, 8) and np.isneginf(tail).all()


def test_tail_equals_log_of_one_minus_topk_mass():
    logp = torch.log_softmax(torch.randn(5, 32, generator=torch.Generator().manual_seed(1)), -1)
    ids, lps, tail = encode_top_k(logp, 4)
    assert ids.dtype == np.uint16 and lps.dtype == np.float16 and tail.dtype == np.float32  # V = 32 fits uint16
    top_mass = torch.topk(logp, 4, -1).values.exp().sum(-1)
    assert np.allclose(tail, torch.log1p(-top_mass).numpy(), atol=1e-5)


# ---------------------------------------------------------------- validate_shard


def test_validate_accepts_good_shard_and_returns_row_count(tmp_path):
    rows, _ = _make_rows(n_rows=4)
    assert validate_shard(_write(tmp_path, rows), VOCAB, TOP_K) == 4


def test_validate_accepts_k_equal_vocab_with_neg_inf_tail(tmp_path):
    rows, _ = _make_rows(n_rows=2, vocab=8, k=8)
    assert validate_shard(_write(tmp_path, rows, k=8), 8, 8) == 2


def _assert_rejects(path, row, field, match=None, **kw):
    with pytest.raises(SoftTargetError) as info:
        validate_shard(path, kw.get("vocab", VOCAB), kw.get("k", TOP_K))
    msg = str(info.value)
    assert path in msg
    assert f"row {row} (example_id='reverse/train/{row}')" in msg
    assert field in msg
    if match:
        assert match in msg
    return msg


def test_validate_rejects_id_outside_vocab(tmp_path):
    rows, _ = _make_rows()
    rows[2]["topk_ids"][3] = 900
    path = _write(tmp_path, rows)
    msg = _assert_rejects(path, 2, "topk_ids", match="900")
    assert "vocab_size 64" in msg


def test_validate_rejects_nan_logprob(tmp_path):
    rows, _ = _make_rows()
    rows[1]["topk_logprobs"] = rows[1]["topk_logprobs"].copy()
    rows[1]["topk_logprobs"][0] = np.nan
    _assert_rejects(_write(tmp_path, rows), 1, "topk_logprobs", match="nan")


def test_validate_rejects_wrong_flattened_length(tmp_path):
    rows, _ = _make_rows()
    rows[3]["topk_ids"] = rows[3]["topk_ids"][:-1]
    _assert_rejects(_write(tmp_path, rows), 3, "topk_ids")


def test_validate_rejects_logprobs_that_do_not_sum_to_one(tmp_path):
    rows, _ = _make_rows()
    rows[2]["tail_logmass"] = np.zeros_like(rows[2]["tail_logmass"])  # tail mass 1
    _assert_rejects(_write(tmp_path, rows), 2, "logsumexp")


def test_validate_rejects_bad_response_start(tmp_path):
    rows, _ = _make_rows()
    rows[0]["response_start"] = 0
    _assert_rejects(_write(tmp_path, rows), 0, "response_start")


def test_validate_rejects_truncated_file_naming_it(tmp_path):
    rows, _ = _make_rows()
    path = _write(tmp_path, rows)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(SoftTargetError, match="shard-00003.parquet"):
        validate_shard(path, VOCAB, TOP_K)


def test_validate_rejects_wrong_schema(tmp_path):
    rows, _ = _make_rows()
    table = rows_to_table(rows, TOP_K)
    as_float32 = table.set_column(
        table.schema.get_field_index("topk_logprobs"), "topk_logprobs",
        table.column("topk_logprobs").cast(pa.list_(pa.float32())),
    )
    path = str(tmp_path / "bad.parquet")
    write_shard(as_float32, path)
    with pytest.raises(SoftTargetError, match="bad.parquet: schema mismatch"):
        validate_shard(path, VOCAB, TOP_K)


def test_validate_rejects_top_k_metadata_mismatch(tmp_path):
    rows, _ = _make_rows()
    path = _write(tmp_path, rows)
    with pytest.raises(SoftTargetError, match="top_k"):
        validate_shard(path, VOCAB, TOP_K + 1)


# ---------------------------------------------------------------- writing


def test_write_shard_leaves_no_tmp_file_behind(tmp_path):
    rows, _ = _make_rows(n_rows=1)
    path = _write(tmp_path, rows)
    assert os.listdir(tmp_path) == [os.path.basename(path)]


def test_shards_are_zstd_compressed_and_smaller_than_snappy(tmp_path):
    # The codec the storage benchmark measured (zstd beside pyarrow's default snappy): every column of a shard.
    rows, _ = _make_rows(n_rows=16)
    path = _write(tmp_path, rows)
    metadata = pq.ParquetFile(path).metadata
    codecs = {metadata.row_group(g).column(c).compression
              for g in range(metadata.num_row_groups) for c in range(metadata.num_columns)}
    assert codecs == {"ZSTD"}
    snappy = str(tmp_path / "snappy.parquet")
    pq.write_table(pq.read_table(path), snappy)
    assert os.path.getsize(path) < os.path.getsize(snappy)


def test_schema_has_exact_fields_and_top_k_metadata():
    schema = soft_target_schema(7)
    assert tuple(schema.names) == SOFT_TARGET_COLUMNS
    assert schema.metadata[b"top_k"] == b"7"
    assert schema.field("response_start").type == pa.int32()
    assert schema.field("tail_logmass").type == pa.list_(pa.float32())


# ---------------------------------------------------------------- the stage's check of a whole shard folder


def test_validate_shards_rejects_a_deleted_shard_by_row_count(tmp_path):
    from dume_ray.soft_targets.launch import validate_shards

    rows, _ = _make_rows(n_rows=4)
    _write(tmp_path, rows[:2], name="shard-0.parquet")
    second = _write(tmp_path, rows[2:], name="shard-1.parquet")
    assert validate_shards(str(tmp_path), VOCAB, TOP_K, expected_rows=4) == 4
    os.remove(second)
    with pytest.raises(SoftTargetError, match="1 shards hold 2 rows, expected 4"):
        validate_shards(str(tmp_path), VOCAB, TOP_K, expected_rows=4)


def test_validate_shards_names_the_corrupted_file_among_good_ones(tmp_path):
    from dume_ray.soft_targets.launch import validate_shards

    rows, _ = _make_rows(n_rows=4)
    _write(tmp_path, rows[:2], name="shard-0.parquet")
    bad = _write(tmp_path, rows[2:], name="shard-1.parquet")
    with open(bad, "r+b") as f:
        f.seek(40)
        f.write(b"\x00" * 64)  # bytes overwritten in the middle of the file
    with pytest.raises(SoftTargetError, match="shard-1.parquet"):
        validate_shards(str(tmp_path), VOCAB, TOP_K, expected_rows=4)


# ---------------------------------------------------------------- adaptive k (soft_targets.kl_max)


def _uniform_tail_kl(logp, ids, count):
    """KL(p ‖ q) by brute force, q = p on the first `count` ids + their tail spread uniformly over the rest."""
    vocab = logp.shape[0]
    kept = torch.zeros(vocab, dtype=torch.bool)
    kept[ids[:count]] = True
    tail = torch.logsumexp(logp.double()[~kept], 0)
    q = torch.where(kept, logp.double(), tail - math.log(vocab - count))
    return float((logp.double().exp() * (logp.double() - q)).sum())


@pytest.mark.parametrize("kl_max", [0.01, 0.1])
def test_kept_counts_are_the_fewest_within_kl_max(kl_max):
    from dume_ray.data.soft_targets import kept_counts
    gen = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(40, VOCAB, generator=gen) * torch.linspace(0.5, 8, 40).unsqueeze(1), -1)
    counts = kept_counts(logp, 12, kl_max)
    assert counts.min() >= 1 and counts.max() <= 12 and counts.min() < counts.max()
    for t in range(40):
        ids = torch.topk(logp[t], 12).indices
        c = int(counts[t])
        if c < 12:
            assert _uniform_tail_kl(logp[t], ids, c) <= kl_max + 1e-9
        if c > 1:
            assert _uniform_tail_kl(logp[t], ids, c - 1) > kl_max - 1e-9


def _adaptive_rows(n_rows=4, k=TOP_K, kl_max=0.05, seed=0):
    from dume_ray.data.soft_targets import encode_adaptive_top_k
    rows, full = _make_rows(n_rows, seed, k=k)
    for row, logp in zip(rows, full):
        ids, lps, tail, counts = encode_adaptive_top_k(logp, k, kl_max)
        row.update(topk_ids=ids, topk_logprobs=lps, tail_logmass=tail, topk_counts=counts)
    return rows, full


def test_adaptive_round_trip_validates_and_decodes_padded(tmp_path):
    rows, full = _adaptive_rows(k=8)
    path = str(tmp_path / "adaptive.parquet")
    write_shard(rows_to_table(rows, 8, adaptive=True), path)
    assert validate_shard(path, VOCAB, 8, adaptive=True) == 4
    with pytest.raises(SoftTargetError, match="schema mismatch"):  # a fixed-k reader refuses it
        validate_shard(path, VOCAB, 8)
    table = pq.read_table(path)
    assert table.schema.field("topk_counts").type == pa.list_(pa.uint8())
    for row, logp in zip(table.to_pylist(), full):
        ids, lps, tail = decode_top_k(row, 8)
        counts = row["topk_counts"]
        assert ids.shape == (len(counts), 8) and len(row["topk_ids"]) == sum(counts)
        for t, c in enumerate(counts):
            want_lps, want_ids = torch.topk(logp[t], c)
            assert torch.equal(ids[t, :c], want_ids) and (ids[t, c:] == want_ids[0]).all()
            assert torch.allclose(lps[t, :c], want_lps, rtol=2**-10, atol=0) and torch.isneginf(lps[t, c:]).all()
            want_tail = torch.logsumexp(logp[t].scatter(0, want_ids, float("-inf")), 0)
            assert torch.allclose(tail[t], want_tail, atol=1e-5)


def test_adaptive_validate_rejects_bad_counts(tmp_path):
    rows, _ = _adaptive_rows(k=8)
    rows[1]["topk_counts"] = rows[1]["topk_counts"].copy()
    rows[1]["topk_counts"][0] += 1  # one more than the ids/log-probs hold
    path = str(tmp_path / "bad.parquet")
    write_shard(rows_to_table(rows, 8, adaptive=True), path)
    with pytest.raises(SoftTargetError, match=r"row 1 .*topk_ids has \d+ values, expected \d+ \(sum of topk_counts\)"):
        validate_shard(path, VOCAB, 8, adaptive=True)
    rows[1]["topk_counts"][0] = 9  # above k
    write_shard(rows_to_table(rows, 8, adaptive=True), path)
    with pytest.raises(SoftTargetError, match="topk_counts has count 9, expected 1..8"):
        validate_shard(path, VOCAB, 8, adaptive=True)


def test_soft_target_batch_pads_adaptive_rows_to_the_batch_widest():
    from dume_ray.data.encode import soft_target_batch
    rows, _ = _adaptive_rows(k=8, kl_max=0.05)
    table = rows_to_table(rows, 8, adaptive=True)
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    out = soft_target_batch(batch, 0, 8)
    counts = np.concatenate([r["topk_counts"] for r in rows]).astype(np.int64)
    assert out["topk_ids"].shape == (counts.size, counts.max()) == out["topk_logprobs"].shape
    assert (torch.isfinite(out["topk_logprobs"]).sum(1).numpy() == counts).all()
    assert np.array_equal(out["topk_ids"][torch.isfinite(out["topk_logprobs"])].numpy(),
                          np.concatenate([r["topk_ids"] for r in rows]))


# ---------------------------------------------------------------- compact storage: uint16 ids, 8-bit log-probs


def _bits_rows(n_rows=4, bits=8, k=TOP_K, kl_max=0.0, vocab=VOCAB):
    """Rows as the product writes them (`targets_table`, what TeacherScorer returns) + their full log-probs."""
    from dume_ray.data.soft_targets import targets_table
    rows, full = _make_rows(n_rows, vocab=vocab, k=k)
    return targets_table(rows, torch.cat(full), k, kl_max, bits), full


def test_ids_are_uint16_when_the_vocabulary_fits_and_int32_above():
    from dume_ray.data.soft_targets import id_dtype
    assert id_dtype(49_152) == id_dtype(65_536) == np.uint16 and id_dtype(65_537) == id_dtype(None) == np.int32
    big = torch.log_softmax(torch.randn(2, 70_000, generator=torch.Generator().manual_seed(0)), -1)
    ids, _, _ = encode_top_k(big, 4)
    assert ids.dtype == np.int32 and ids.max() >= 0 and np.array_equal(ids, torch.topk(big, 4, -1).indices.numpy())
    table, _ = _bits_rows(bits=16)
    assert table.schema.field("topk_ids").type == pa.list_(pa.uint16())


def test_quantiser_round_trip_is_within_half_a_step_above_its_floor():
    from dume_ray.data.soft_targets import LOGPROB_STEP, dequantise_logprobs, quantise_logprobs
    lp = np.concatenate([-np.linspace(0, 254 * LOGPROB_STEP, 10_001), [-np.inf, -20.0, -1e4]])
    codes = quantise_logprobs(lp)
    assert codes.dtype == np.uint8
    back = dequantise_logprobs(codes)
    finite = slice(0, 10_001)
    assert np.abs(back[finite] - lp[finite]).max() <= LOGPROB_STEP / 2 + 1e-6
    assert np.isneginf(back[-3]) and codes[-3] == 255  # -inf (an empty tail) is kept exactly
    assert (back[-2:] == -254 * LOGPROB_STEP).all()  # below the floor: clipped to it (p < 1.3e-7)


@pytest.mark.parametrize("kl_max", [0.0, 0.05])
def test_8bit_shard_validates_and_decodes_within_one_step_renormalised(tmp_path, kl_max):
    """Stored codes are within half a step of the log-probs; the reader's renormalisation shifts a position by at
    most another half step, so decoded values are within one step and every position sums to 1."""
    from dume_ray.data.soft_targets import LOGPROB_STEP
    table, full = _bits_rows(bits=8, k=8, kl_max=kl_max)
    assert table.schema.field("topk_logprobs").type == pa.list_(pa.uint8())
    assert table.schema.field("tail_logmass").type == pa.list_(pa.uint8())
    path = str(tmp_path / "eight.parquet")
    write_shard(table, path)
    assert validate_shard(path, VOCAB, 8, adaptive=kl_max > 0, logprob_bits=8) == 4
    with pytest.raises(SoftTargetError, match="schema mismatch"):  # a 16-bit config refuses 8-bit shards
        validate_shard(path, VOCAB, 8, adaptive=kl_max > 0)
    for row, logp in zip(pq.read_table(path).to_pylist(), full):
        ids, lps, tail = decode_top_k(row, 8)
        kept = torch.isfinite(lps)
        want = logp.gather(-1, ids)  # [n_resp, 8]
        assert (lps[kept] - want[kept]).abs().max() <= LOGPROB_STEP + 1e-6
        in_kept = torch.zeros_like(logp).scatter_add(-1, ids, kept.float()) > 0  # [n_resp, V] (padding repeats a kept id)
        want_tail = torch.logsumexp(logp.masked_fill(in_kept, float("-inf")), -1)
        assert (tail - want_tail).abs().max() <= LOGPROB_STEP + 1e-6
        total = torch.logsumexp(torch.cat([lps, tail.unsqueeze(1)], 1), 1)
        assert total.abs().max() <= 1e-5


def test_8bit_validation_rejects_codes_that_do_not_sum_to_one(tmp_path):
    table, _ = _bits_rows(bits=8)
    rows = table.to_pylist()
    rows[2]["tail_logmass"] = [0] * len(rows[2]["tail_logmass"])  # code 0 = log-prob 0: tail mass 1
    path = str(tmp_path / "bad.parquet")
    write_shard(pa.Table.from_pylist(rows, schema=table.schema), path)
    with pytest.raises(SoftTargetError, match=r"row 2 .*logsumexp"):
        validate_shard(path, VOCAB, TOP_K, logprob_bits=8)


def test_old_int32_shards_still_validate_and_decode_like_uint16_ones(tmp_path):
    from dume_ray.data.encode import soft_target_batch
    rows, _ = _make_rows(n_rows=3)
    old, new = str(tmp_path / "old.parquet"), str(tmp_path / "new.parquet")
    write_shard(rows_to_table(rows, TOP_K), old)  # no vocabulary given: int32 ids, as every shard before
    write_shard(rows_to_table(rows, TOP_K, vocab_size=VOCAB), new)
    assert pq.read_schema(old).field("topk_ids").type == pa.list_(pa.int32())
    assert pq.read_schema(new).field("topk_ids").type == pa.list_(pa.uint16())
    assert validate_shard(old, VOCAB, TOP_K) == validate_shard(new, VOCAB, TOP_K) == 3
    assert os.path.getsize(new) < os.path.getsize(old)
    batches = [soft_target_batch({c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}, 0, TOP_K)
               for t in (pq.read_table(old), pq.read_table(new))]
    for key in batches[0]:
        assert torch.equal(batches[0][key], batches[1][key])


def test_logprob_bits_other_than_8_or_16_are_refused():
    from dume_ray.config import ConfigError, load_config
    with pytest.raises(ValueError, match="logprob_bits"):
        soft_target_schema(4, logprob_bits=4)
    with pytest.raises(ConfigError, match="soft_targets.logprob_bits must be 16 or 8, got 12"):
        load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.yaml"), ["soft_targets.logprob_bits=12"])


def test_8bit_fixed_k_stores_tokens_below_the_floor_as_padding_and_validates(tmp_path):
    """A peaked teacher's top 8 reach below -15.9 nats: those codes would be clipped, so they are stored as
    padding (the position's top-1 id, code 255 = -inf, never a position's first) with their mass in the tail,
    and the shard still validates; a shard whose first value is absent is refused."""
    from dume_ray.data.soft_targets import FLOOR_8BIT, dequantise_logprobs, quantise_logprobs, targets_table
    rows, _ = _make_rows(n_rows=4)
    n = sum(len(r["input_ids"]) - r["response_start"] for r in rows)
    logp = torch.log_softmax(torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(3)) * 12, -1)
    table = targets_table(rows, logp, 8, logprob_bits=8)
    codes = np.concatenate([np.asarray(v) for v in table.column("topk_logprobs").to_pylist()]).reshape(-1, 8)
    ids = np.concatenate([np.asarray(v) for v in table.column("topk_ids").to_pylist()]).reshape(-1, 8)
    top = torch.topk(logp, 8, -1)
    below = top.values.numpy() < FLOOR_8BIT
    assert below.any() and np.array_equal(codes == 255, below) and (codes[:, 0] < 255).all()
    assert np.array_equal(ids, np.where(below, top.indices.numpy()[:, :1], top.indices.numpy()))
    tail = dequantise_logprobs(np.concatenate([np.asarray(v) for v in table.column("tail_logmass").to_pylist()]))
    outside = torch.logsumexp(logp.scatter(-1, top.indices, float("-inf")), -1)  # the non-top-k mass alone
    floored = torch.logsumexp(top.values.masked_fill(~torch.from_numpy(below), float("-inf")), -1)
    expected = torch.logaddexp(outside, floored).numpy()
    rows_below = below.any(1)
    expected = np.maximum(expected, -254 / 16)  # the tail's code clips at 254 (a mass below 1.3e-7)
    assert (np.abs(tail[rows_below] - expected[rows_below]) <= 1 / 32 + 1e-6).all()  # half a code step
    without = dequantise_logprobs(quantise_logprobs(outside.numpy()))  # the tail had the floored mass been lost
    assert (tail[rows_below] > without[rows_below]).any()
    path = str(tmp_path / "absent.parquet")
    write_shard(table, path)
    assert validate_shard(path, VOCAB, 8, logprob_bits=8) == 4
    bad = table.to_pylist()
    bad[1]["topk_logprobs"] = [255] * len(bad[1]["topk_logprobs"])
    write_shard(pa.Table.from_pylist(bad, schema=table.schema), path)
    with pytest.raises(SoftTargetError, match=r"row 1 .*topk_logprobs has value -inf"):
        validate_shard(path, VOCAB, 8, logprob_bits=8)


@pytest.mark.parametrize("kl_max", [0.0, 0.05])
def test_soft_target_batch_decodes_8bit_rows_like_decode_top_k(kl_max):
    """The student's batch builder (Ray Data numpy batches) and the row decoder hand the loss the same targets."""
    from dume_ray.data.encode import soft_target_batch
    table, _ = _bits_rows(bits=8, k=8, kl_max=kl_max)
    out = soft_target_batch({c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}, 0, 8)
    rows = [decode_top_k(r, 8) for r in table.to_pylist()]
    ids, lps, tail = (torch.cat(x) for x in zip(*rows))
    width = out["topk_ids"].shape[1]  # adaptive: the batch's widest position
    assert torch.equal(out["topk_ids"], ids[:, :width]) and torch.equal(out["topk_logprobs"], lps[:, :width])
    assert torch.equal(out["tail_logmass"], tail) and torch.isneginf(lps[:, width:]).all()
