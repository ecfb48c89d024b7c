"""Models and tokenizers: the embedded tiny Llama, or any Hugging Face causal LM by Hub name or local path.

Everything saved here is a plain Hugging Face checkpoint (`save_pretrained`), so users load our outputs
with `AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` and no dume_ray.

Pure: no Ray here. Tested in tests/unit/test_model_and_training.py.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dume_ray.config import ModelConfig
from dume_ray.data.tokenizer import build_char_tokenizer
from dume_ray.manifest import atomic_dir

EMBEDDED = "embedded"


def build_embedded_model(cfg: ModelConfig, tokenizer, seed: int) -> LlamaForCausalLM:
    """A tiny Llama sized by `cfg`, freshly initialised from `seed`, matching `tokenizer`'s vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(64, cfg.max_seq_len),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def check_model_path(name_or_path: str) -> None:
    """Fail early and clearly on a local-looking path that does not exist (Hub names pass through)."""
    # A Hub id is "name" or "org/name"; anything else (absolute, ./relative, deeper) must be a local folder.
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(f"model.name_or_path: no model folder at {name_or_path!r}")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Tokenizer of a saved or Hub model; adds a pad token (= eos) when the model has none.

    `trust_remote_code=True` only for our own folders that carry a modeling file (the upcycled MoE), where
    AutoTokenizer would otherwise stop to ask."""
    check_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {name_or_path!r} has no eos token; responses need one to end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    check_model_path(name_or_path)
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or torch.float32)


def create_initial_model(cfg: ModelConfig, seed: int, out_dir: str) -> str:
    """Save the starting model + tokenizer to `out_dir` and return it.

    The embedded default builds a character tokenizer and a tiny Llama; otherwise the named model is
    loaded (Hub or local path) and re-saved so every later stage reads one local folder.
    """
    if cfg.name_or_path == EMBEDDED:
        tokenizer = build_char_tokenizer()
        model = build_embedded_model(cfg, tokenizer, seed)
    else:
        tokenizer = load_tokenizer(cfg.name_or_path)
        model = load_model(cfg.name_or_path)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def check_same_vocab(teacher_dir: str, student_dir: str) -> None:
    """Distillation compares token ids: teacher and student must share one tokenizer."""
    teacher, student = load_tokenizer(teacher_dir), load_tokenizer(student_dir)
    if teacher.get_vocab() != student.get_vocab():
        raise ValueError(
            f"tokenizer mismatch: teacher {teacher_dir} has {len(teacher)} tokens, student {student_dir} has "
            f"{len(student)}; distillation needs the same vocabulary"
        )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def freeze_non_mlp(model: torch.nn.Module) -> int:
    """Train only the MLP blocks (`.mlp.` weights); returns the number of trainable parameters."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad = ".mlp." in name
        trainable += param.numel() if param.requires_grad else 0
    if trainable == 0:
        raise ValueError("experts.train_mlp_only: the model has no parameters named '*.mlp.*'")
    return trainable
