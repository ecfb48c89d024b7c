"""Character-level tokenizer that saves and loads as a plain Hugging Face tokenizer.

The built-in tasks are tiny string/number puzzles, so one token per character
keeps the vocabulary small and makes every answer exactly learnable. The
tokenizer is built with the ``tokenizers`` library (a WordLevel model over
single characters and a pre-tokenizer that isolates every character) and
wrapped in ``transformers.PreTrainedTokenizerFast``; ``save_pretrained``
writes a standard ``tokenizer.json`` that ``AutoTokenizer.from_pretrained``
loads without importing ``dume_ray``.

The tokenizer adds no special tokens by itself (there is no post-processor);
:mod:`dume_ray.data.encode` adds BOS/EOS explicitly, so there is exactly one
place that decides the sequence layout.

Test with::

    .venv/bin/python -m pytest tests/unit/test_encode.py -q
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
#: Order fixes the ids: pad is 0, then bos 1, eos 2, unk 3.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

PUNCTUATION = " =+-*/,.:;|!?()[]'\"_#"
BASE_CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + PUNCTUATION


def char_vocabulary(extra_chars: str = "") -> dict[str, int]:
    """Returns the token -> id mapping used by :func:`build_char_tokenizer`.

    Args:
        extra_chars: Additional characters appended after the base set.

    Returns:
        Specials, then lowercase, uppercase, digits, space and punctuation,
        then ``extra_chars``, each character once (first occurrence wins), so
        the ids are deterministic.
    """
    tokens = list(SPECIAL_TOKENS)
    seen = set(tokens)
    for ch in BASE_CHARS + extra_chars:
        if ch not in seen:
            seen.add(ch)
            tokens.append(ch)
    return {token: index for index, token in enumerate(tokens)}


def build_char_tokenizer(extra_chars: str = "") -> PreTrainedTokenizerFast:
    """Builds the character-level tokenizer.

    Args:
        extra_chars: Characters to add to the vocabulary beyond the base set
            (e.g. ``"\\n"`` or accented letters used by a user task).

    Returns:
        A fast tokenizer with pad ``<pad>`` (id 0), bos ``<s>``, eos ``</s>``
        and unk ``<unk>``. Characters outside the vocabulary map to ``<unk>``.
        ``decode`` joins characters back without inserting spaces, so text
        made of known characters round-trips exactly.
    """
    model = models.WordLevel(vocab=char_vocabulary(extra_chars), unk_token=UNK_TOKEN)
    backend = Tokenizer(model)
    # "[\s\S]" rather than "." so newlines are split into single characters too
    # (an unmatched run would otherwise become one multi-character <unk>).
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(r"[\s\S]"), behavior="isolated")
    # Fuse concatenates the tokens as-is: no spaces added, none removed.
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="right",
        # Otherwise decode may "clean up" spaces before punctuation ("a ," -> "a,").
        clean_up_tokenization_spaces=False,
    )
