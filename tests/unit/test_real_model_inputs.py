"""Bad input on the real-model path stops before any training, names what is wrong and leaves the run folder as it
was; expert modes (MLP only, LoRA) train what they say; over-long examples are dropped or truncated and counted.

    .venv/bin/python -m pytest -q tests/unit/test_real_model_inputs.py

No Ray: `cli.main` returns before it starts Ray when the preflight fails. Tiny models only (no download).
"""

import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dume_ray.cli import main
from dume_ray.config import ModelConfig, TasksConfig
from dume_ray.data.encode import encode_example
from dume_ray.data.tokenizer import build_char_tokenizer
from dume_ray.model import (create_initial_model, enable_gradient_checkpointing, load_model, make_trainable,
                            merge_adapters, resolve_gguf)
from dume_ray.tasks import load_tasks
from dume_ray.training import ce_train_step, make_optimizer
from dume_ray.config import OptimConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOLLM2 = os.path.join(ROOT, "configs", "smollm2.yaml")


def _fails_and_leaves_run_folder(tmp_path, capsys, *overrides) -> str:
    """Run the CLI into a run folder that already holds a config.yaml; assert exit 2, the file untouched, and
    return the error line."""
    run_dir = tmp_path / "smollm2"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("an earlier run's config\n")
    code = main(["run", "--config", SMOLLM2, f"runs_dir={tmp_path}", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert (run_dir / "config.yaml").read_text() == "an earlier run's config\n"
    assert sorted(os.listdir(run_dir)) == ["config.yaml"]
    assert "Traceback" not in err
    return err


def test_missing_gguf_file_is_named(tmp_path, capsys):
    err = _fails_and_leaves_run_folder(tmp_path, capsys, "model.gguf=/nowhere/model.gguf")
    assert "no GGUF file at '/nowhere/model.gguf'" in err


def test_gguf_from_a_package_that_is_not_installed_names_the_package(tmp_path, capsys):
    err = _fails_and_leaves_run_folder(tmp_path, capsys, "model.gguf=no-such-wheel:model.gguf")
    assert "'no-such-wheel' is not installed" in err


def test_unreadable_gguf_file_is_named(tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a GGUF file" * 10)
    err = _fails_and_leaves_run_folder(tmp_path, capsys, f"model.gguf={bad}")
    assert str(bad) in err and "cannot" in err


def test_gguf_key_must_name_a_gguf_file(tmp_path, capsys):
    err = _fails_and_leaves_run_folder(tmp_path, capsys, "model.gguf=weights.bin")
    assert "model.gguf must name a .gguf file" in err


@pytest.fixture
def char_model_dir(tmp_path):
    """A local HF folder whose tokenizer (the character one) has no chat template."""
    return create_initial_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64), 0,
                                str(tmp_path / "char_model"))


def test_chat_template_asked_of_a_tokenizer_without_one_is_an_error(tmp_path, capsys, char_model_dir):
    err = _fails_and_leaves_run_folder(tmp_path, capsys, "model.gguf=null", f"model.name_or_path={char_model_dir}")
    assert "data.chat_template=true but the tokenizer of" in err and "has no chat template" in err


def test_unsupported_architecture_is_refused_before_training_when_upcycling(tmp_path, capsys):
    folder = tmp_path / "gpt2"
    tokenizer = build_char_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    err = _fails_and_leaves_run_folder(tmp_path, capsys, "model.gguf=null", f"model.name_or_path={folder}",
                                       "data.chat_template=false", "data.system_prompt=null")
    assert "'gpt2'" in err and "llama, qwen2" in err and "upcycle.enabled" in err


def test_resolve_gguf_finds_a_plain_path(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    assert resolve_gguf(str(path)) == (str(tmp_path), "m.gguf")


# ---- expert modes ----------------------------------------------------------------------------------------------

def _tiny(tmp_path):
    return load_model(create_initial_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
                                           0, str(tmp_path / "tiny")))


def _train_a_step(model, vocab: int = 80):
    optimizer, scheduler = make_optimizer(model, OptimConfig(steps=5, lr=1e-2, warmup_steps=0))
    ids = torch.randint(4, vocab, (4, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    for _ in range(3):
        ce_train_step(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
                      optimizer, scheduler, grad_clip=1.0)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("mode", ["mlp_only", "lora_mlp", "lora"])
def test_expert_modes_change_only_what_they_train_and_save_dense(tmp_path, mode, checkpointing):
    base = _tiny(tmp_path)
    if checkpointing:  # with frozen embeddings too (model.gradient_checkpointing)
        enable_gradient_checkpointing(base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    keywords = {"mlp_only": {"train_mlp_only": True}, "lora_mlp": {"train_mlp_only": True, "lora_rank": 4, "lora_alpha": 8.0},
                "lora": {"lora_rank": 4, "lora_alpha": 8.0}}[mode]
    model = make_trainable(base, **keywords)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in before.values())
    _train_a_step(model)
    merged = merge_adapters(model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    after = merged.state_dict()
    assert set(after) == set(before)  # LoRA merged away: the same dense weights, nothing extra
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "training changed nothing"
    if mode in ("mlp_only", "lora_mlp"):
        assert all(".mlp." in k for k in changed), sorted(changed)  # the trunk stays the base's: averageable
    else:
        assert any(".self_attn." in k for k in changed)
    assert not any("embed_tokens" in k or "norm" in k for k in changed)


# ---- over-long examples ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_too_long_examples_are_dropped_or_truncated_and_counted(policy):
    tokenizer = build_char_tokenizer()
    cfg = TasksConfig(builtin=["reverse_words"], num_train=40, num_validation=40, num_test=40, too_long=policy)
    original = load_tasks(TasksConfig(builtin=["reverse_words"], num_train=40, num_validation=40, num_test=40))
    lengths = [len(encode_example(tokenizer, e.prompt, e.response, 10_000)["input_ids"])
               for e in original["reverse_words"].examples("train")]
    max_len = sorted(lengths)[len(lengths) // 2]  # about half the examples fit
    fits = [n <= max_len for n in lengths]
    assert any(fits) and not all(fits)
    task = load_tasks(cfg, tokenizer, max_len)["reverse_words"]
    kept = task.examples("train")
    for example in kept:
        encode_example(tokenizer, example.prompt, example.response, max_len)  # fits, or this raises
    if policy == "drop":
        assert task.skipped_rows["train"] == fits.count(False) and len(kept) == fits.count(True)
        assert not task.truncated_rows
    else:
        assert task.truncated_rows["train"] + task.skipped_rows.get("train", 0) == fits.count(False)
        assert task.truncated_rows["train"] > 0
        by_prompt = {e.prompt: e.response for e in original["reverse_words"].examples("train")}
        assert all(by_prompt[e.prompt].startswith(e.response) for e in kept)  # a cut response is a prefix


def test_response_logits_through_the_lm_head_on_response_positions_only_equal_the_full_forward(tmp_path):
    from dume_ray.training import response_logits

    model = _tiny(tmp_path).eval()

    class FullLogitsOnly(torch.nn.Module):  # a causal LM whose forward has no logits_to_keep
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    ids = torch.randint(4, 80, (3, 10))
    labels = torch.full_like(ids, -100)
    labels[0, 6:] = ids[0, 6:]
    labels[1, 3:8] = ids[1, 3:8]  # starts earliest: the kept window begins at position 2
    labels[2, 9:] = ids[2, 9:]
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        kept, targets = response_logits(model, batch)
        full, full_targets = response_logits(FullLogitsOnly(model), batch)
    assert kept.shape == full.shape == (4 + 5 + 1, model.config.vocab_size)
    assert torch.equal(targets, full_targets)
    assert torch.allclose(kept, full, atol=1e-5)
