"""Unit tests for dume_ray.data.tokenizer and dume_ray.data.encode.

Run with::

    cd /work/main && .venv/bin/python -m pytest tests/unit/test_encode.py -q
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from dume_ray.data.encode import (  # noqa: E402
    IGNORE_INDEX,
    collate,
    encode_example,
    encode_prompt,
    response_positions,
)
from dume_ray.data.tokenizer import build_char_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


# ---------------------------------------------------------------- tokenizer


def test_special_token_ids_and_pad_is_zero(tok):
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 0
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.unk_token == "<unk>"
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4


def test_one_token_per_character(tok):
    assert len(_ids(tok, "abc")) == 3
    assert len(_ids(tok, "ad 37,25=")) == 9


@pytest.mark.parametrize(
    "text", ["abc", "ad 37,25=", " a , b . ", "Hello, World! (x+y)*2/3 [ok]; 'q' \"r\" _#|:?-"]
)
def test_decode_round_trips_exactly_including_spaces(tok, text):
    ids = _ids(tok, text)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_unknown_characters_map_to_unk(tok):
    ids = _ids(tok, "aé€\nb")
    assert ids[0] != tok.unk_token_id and ids[-1] != tok.unk_token_id
    assert ids[1:4] == [tok.unk_token_id] * 3


def test_extra_chars_extend_vocabulary_without_changing_base_ids(tok):
    extended = build_char_tokenizer(extra_chars="é\na")  # "a" is a duplicate
    assert len(extended) == len(tok) + 2
    assert _ids(extended, "abc") == _ids(tok, "abc")
    assert extended.decode(_ids(extended, "é\né")) == "é\né"
    assert extended.unk_token_id not in _ids(extended, "é\n")


def test_vocabulary_is_deterministic():
    assert build_char_tokenizer("xyz!").get_vocab() == build_char_tokenizer("xyz!").get_vocab()


def test_save_and_load_with_plain_autotokenizer_tokenizes_identically(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in ["abc", "ad 37,25=", "sh abh=", "Zz 9?é"]:
        assert _ids(loaded, text) == _ids(tok, text)
        assert loaded.decode(_ids(loaded, text)) == tok.decode(_ids(tok, text))
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id)
    assert loaded.get_vocab() == tok.get_vocab()


# ---------------------------------------------------------------- encode_example


def test_encode_example_layout_is_bos_prompt_response_eos(tok):
    out = encode_example(tok, "ad 37,25=", "62", max_seq_len=64)
    prompt_ids, response_ids = _ids(tok, "ad 37,25="), _ids(tok, "62")
    assert out["input_ids"] == [tok.bos_token_id] + prompt_ids + response_ids + [tok.eos_token_id]
    assert out["response_start"] == 1 + len(prompt_ids)
    assert out["input_ids"][out["response_start"]] == response_ids[0]


def test_encode_prompt_matches_encode_example_prefix(tok):
    full = encode_example(tok, "rv abc=", "cba", max_seq_len=64)
    assert encode_prompt(tok, "rv abc=") == full["input_ids"][: full["response_start"]]


def test_encode_example_exact_limit_is_allowed(tok):
    # 1 bos + 3 prompt + 2 response + 1 eos = 7 tokens
    assert len(encode_example(tok, "ab=", "xy", max_seq_len=7)["input_ids"]) == 7


def test_encode_example_too_long_error_names_where_length_and_limit(tok):
    with pytest.raises(ValueError) as info:
        encode_example(tok, "ab=", "xy", max_seq_len=6, where="task 'add' train row 12")
    message = str(info.value)
    assert "task 'add' train row 12" in message and "7" in message and "6" in message


def test_encode_example_empty_response_error_names_where(tok):
    with pytest.raises(ValueError, match="task 'copy' test row 3.*empty"):
        encode_example(tok, "cp abc=", "", max_seq_len=64, where="task 'copy' test row 3")


def test_encode_example_requires_eos(tok):
    no_eos = build_char_tokenizer()
    no_eos.eos_token = None
    assert no_eos.eos_token_id is None
    with pytest.raises(ValueError, match="eos"):
        encode_example(no_eos, "a", "b", max_seq_len=64)


# ---------------------------------------------------------------- collate / positions


def _rows(tok):
    return [
        encode_example(tok, "ad 1,2=", "3", max_seq_len=64),      # 1 + 7 + 1 + 1 = 10
        encode_example(tok, "rv abcd=", "dcba", max_seq_len=64),  # 1 + 8 + 4 + 1 = 14
    ]


def test_collate_right_pads_and_masks(tok):
    rows = _rows(tok)
    batch = collate(rows, pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (2, 14)
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"][0, :10].tolist() == rows[0]["input_ids"]
    assert batch["input_ids"][0, 10:].tolist() == [tok.pad_token_id] * 4
    assert batch["attention_mask"].tolist() == [[1] * 10 + [0] * 4, [1] * 14]


def test_collate_labels_cover_response_and_eos_only(tok):
    rows = _rows(tok)
    labels = collate(rows, pad_id=tok.pad_token_id)["labels"]
    for b, row in enumerate(rows):
        start, n = row["response_start"], len(row["input_ids"])
        assert labels[b, :start].tolist() == [IGNORE_INDEX] * start
        assert labels[b, start:n].tolist() == row["input_ids"][start:]
        assert labels[b, n:].tolist() == [IGNORE_INDEX] * (labels.shape[1] - n)
    assert labels[0, 9].item() == tok.eos_token_id  # the model learns to stop


def test_collate_accepts_numpy_input_ids(tok):
    rows = _rows(tok)
    as_numpy = [{"input_ids": np.asarray(r["input_ids"]), "response_start": r["response_start"]} for r in rows]
    a, b = collate(rows, pad_id=0), collate(as_numpy, pad_id=0)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_collate_rejects_empty_batch_and_bad_response_start():
    with pytest.raises(ValueError):
        collate([], pad_id=0)
    with pytest.raises(ValueError, match="response_start"):
        collate([{"input_ids": [1, 2, 3], "response_start": 3}], pad_id=0)


def test_response_positions_are_previous_positions_in_row_major_order():
    labels = torch.tensor(
        [
            [IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX],
            [IGNORE_INDEX, 5, 6, 9, 4],
        ]
    )
    b_idx, t_idx = response_positions(labels)
    assert b_idx.tolist() == [0, 0, 1, 1, 1, 1]
    assert t_idx.tolist() == [1, 2, 0, 1, 2, 3]
    # Same order as flattening each row's response tokens in sequence, row by row.
    assert labels[b_idx, t_idx + 1].tolist() == [7, 8, 5, 6, 9, 4]


def test_response_positions_gather_matches_shifted_cross_entropy(tok):
    batch = collate(_rows(tok), pad_id=tok.pad_token_id)
    torch.manual_seed(0)
    logits = torch.randn(*batch["labels"].shape, 11 + len(tok))
    shifted = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    b_idx, t_idx = response_positions(batch["labels"])
    targets = batch["labels"][batch["labels"] != IGNORE_INDEX]
    gathered = torch.nn.functional.cross_entropy(logits[b_idx, t_idx], targets)
    assert torch.allclose(shifted, gathered)
    assert len(targets) == (1 + 1) + (4 + 1)


def test_response_positions_rejects_label_at_position_zero():
    with pytest.raises(ValueError):
        response_positions(torch.tensor([[3, IGNORE_INDEX]]))


def test_training_order_mixes_tasks_and_is_a_seeded_permutation():
    from dume_ray.data.encode import training_order
    rows = [{"task": t, "i": i} for t in ("copy", "reverse", "add") for i in range(100)]  # grouped, as encode_rows gives them
    mixed = training_order(rows, seed=0)
    key = lambda r: (r["task"], r["i"])  # noqa: E731
    assert sorted(mixed, key=key) == sorted(rows, key=key) and len(mixed) == len(rows)  # the same rows, each once
    assert len({r["task"] for r in mixed[:32]}) == 3  # a first batch already holds every task
    assert training_order(rows, seed=0) == mixed and training_order(rows, seed=1) != mixed
