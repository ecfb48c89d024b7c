"""The DUME MoE: forced (oracle) routing reproduces an expert (Llama and Qwen2); a mixture of copies of one
expert is that expert under every routing and top-k; the weight average is the mean of every weight; save/load
round trip, routing modes, KV-cache generation (equal to recomputing the sequence, no look-ahead), bad input
and unsupported architectures.

    .venv/bin/python -m pytest tests/unit/test_upcycle_moe.py -q
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from dume_ray.config import ModelConfig
from dume_ray.data.encode import collate, encode_example, encode_prompt
from dume_ray.data.tokenizer import build_char_tokenizer
from dume_ray.model import build_embedded_model
from dume_ray.training import greedy_generate
from dume_ray.upcycle.moe import (MOE_CLASSES, SUPPORTED_MODEL_TYPES, DumeMoEConfig, MoEBlock, average_weights,
                                  build_moe, check_compatible, check_supported_model_type, count_active_parameters,
                                  load_moe)
from dume_ray.upcycle.router import collect_group_stats, merge_stats, solve_router

TOKENIZER = build_char_tokenizer()
SMALL = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


def _experts(shared_trunk: bool, n: int = 3) -> dict:
    """n tiny Llamas; with shared_trunk, all non-MLP weights equal expert 0's (as after MLP-only training)."""
    experts = {f"g{i}": build_embedded_model(SMALL, TOKENIZER, seed=i) for i in range(n)}
    if shared_trunk:
        trunk = {k: v for k, v in experts["g0"].state_dict().items() if ".mlp." not in k}
        for model in experts.values():
            model.load_state_dict(trunk, strict=False)
    return experts


def _batch():
    rows = [encode_example(TOKENIZER, p, r, 32) for p, r in [("cp abc=", "abc"), ("rv abcd=", "dcba"), ("ad 1,2=", "3")]]
    return collate(rows, TOKENIZER.pad_token_id)


QWEN2 = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _qwen2_experts(n: int = 3) -> dict:
    """n tiny Qwen2s with one shared trunk (random q/k/v biases, so a dropped bias shows) and MLPs perturbed apart."""
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(QWEN2)
    experts = {}
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
        for e in range(n):
            experts[f"q{e}"] = copy.deepcopy(base)
            gen = torch.Generator().manual_seed(100 + e)
            for name, p in experts[f"q{e}"].named_parameters():
                if ".mlp." in name:
                    p.add_(0.5 * torch.randn(p.shape, generator=gen))
    return experts


def _left_padded(rows: list[list[int]], pad: int) -> dict:
    """{"input_ids", "attention_mask"} [b, width], left-padded as `greedy_generate` does."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for r, ids in enumerate(rows):
        input_ids[r, width - len(ids):], attention_mask[r, width - len(ids):] = torch.tensor(ids), 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _qwen2_inputs() -> dict:
    gen = torch.Generator().manual_seed(1)
    return _left_padded([torch.randint(3, 128, (n,), generator=gen).tolist() for n in (9, 5, 7)], QWEN2.pad_token_id)


def _routed(arch: str):
    """A tiny MoE of experts that differ everywhere, with a random router (routing varies token to token), and
    left-padded prompts for it."""
    if arch == "qwen2":
        moe, inputs = build_moe(_qwen2_experts()), _qwen2_inputs()
    else:
        moe = build_moe(_experts(shared_trunk=False))
        inputs = _left_padded([encode_prompt(TOKENIZER, p) for p in ("cp abcd=", "rv ab=", "ad 12,7=")], TOKENIZER.pad_token_id)
    blocks, width = len(moe.moe_blocks()), moe.config.hidden_size + 1
    moe.set_router(torch.randn(blocks, width, moe.config.num_local_experts, generator=torch.Generator().manual_seed(0)))
    return moe.eval(), inputs


def _generate(model, inputs: dict, use_cache: bool, steps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [b, steps] and each step's logits [b, steps, V]; eos suppressed so every row runs all steps."""
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, use_cache=use_cache,
                         pad_token_id=model.config.pad_token_id, return_dict_in_generate=True, output_logits=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)


@torch.no_grad()
def test_forced_routing_gives_exactly_the_experts_logits_when_trunks_are_shared():
    experts = _experts(shared_trunk=True)
    moe, batch = build_moe(experts).eval(), _batch()
    for i, expert in enumerate(experts.values()):
        want = expert.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = moe.set_routing("forced", expert=i)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.allclose(got, want, atol=1e-5)
    prompts = ["cp abc=", "rv ab="]  # generation (KV cache, left padding) agrees too
    moe.set_routing("forced", expert=2)
    assert greedy_generate(moe, TOKENIZER, prompts, 6) == greedy_generate(experts["g2"], TOKENIZER, prompts, 6)


@torch.no_grad()
def test_forced_routing_gives_exactly_the_qwen2_experts_logits():
    experts = _qwen2_experts()
    moe, inputs = build_moe(experts).eval(), _qwen2_inputs()
    assert type(moe).__name__ == "DumeQwen2MoEForCausalLM" and moe.model.layers[0].self_attn.q_proj.bias is not None
    wants = [expert.eval()(**inputs).logits for expert in experts.values()]
    assert not torch.allclose(wants[0], wants[1], atol=1e-2)  # the experts really differ
    for i, want in enumerate(wants):
        assert torch.allclose(moe.set_routing("forced", expert=i)(**inputs).logits, want, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@torch.no_grad()
def test_saved_moe_loads_with_one_call_and_reproduces_logits(tmp_path, arch):
    moe, inputs = _routed(arch)
    moe.config.routing = "sequence_mean"
    moe.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    name = type(moe).__name__
    assert type(loaded).__name__ == name and not type(loaded).__module__.startswith("dume_ray")  # the copied file
    assert loaded.config.auto_map["AutoModelForCausalLM"] == f"moe.{name}"
    assert loaded.config.routing == "sequence_mean" and loaded.config.expert_names == list(moe.config.expert_names)
    ours = load_moe(str(tmp_path)).eval()
    assert type(ours) is type(moe)
    other = next(cls for cls in MOE_CLASSES.values() if cls is not type(moe))
    with pytest.raises(ValueError, match="load it with load_moe"):  # not silently the wrong architecture
        other.from_pretrained(tmp_path)
    for mode in ("sequence_mean", "token"):
        want = moe.set_routing(mode)(**inputs).logits
        assert torch.equal(loaded.set_routing(mode)(**inputs).logits, want)
        assert torch.equal(ours.set_routing(mode)(**inputs).logits, want)


@torch.no_grad()
def test_router_from_statistics_routes_each_groups_tokens_mostly_to_its_expert():
    experts = _experts(shared_trunk=True, n=2)
    moe = build_moe(experts).eval()
    # Two groups with disjoint inputs: string tasks vs arithmetic.
    data = [[("cp abcd=", "abcd"), ("rv hgf=", "fgh"), ("cp bad=", "bad")], [("ad 12,34=", "46"), ("ad 5,61=", "66")]]
    batches = [collate([encode_example(TOKENIZER, p, r, 32) for p, r in rows], TOKENIZER.pad_token_id) for rows in data]
    stats = merge_stats([collect_group_stats(moe, [b], g, 2) for g, b in enumerate(batches)])
    assert stats.tokens[0] == int(batches[0]["attention_mask"].sum())
    moe.set_router(solve_router(stats, ridge_lambda=1e-3))
    for g, batch in enumerate(batches):
        block = moe.moe_blocks()[0]
        block.capture = []
        moe.set_routing("token")(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        x, _ = block.capture.pop()
        block.capture = None
        chosen = block.scores(x).argmax(-1)[batch["attention_mask"].bool()]
        assert (chosen == g).float().mean() > 0.9


def test_router_stats_of_a_groups_tasks_are_the_same_in_memory_and_in_the_stages_task(tmp_path):
    """`router.task_router_stats` (a MoE in memory: benchmarks/regime.py) and the upcycle stage's per-group Ray
    task body (`launch.group_router_stats`: the MoE saved, loaded, tasks from their config) gather the same
    statistics: the first `per_task` training rows of each of the group's tasks, in the group's column."""
    from dume_ray.config import TasksConfig
    from dume_ray.tasks import encode_rows, load_tasks
    from dume_ray.upcycle.launch import group_router_stats
    from dume_ray.upcycle.router import task_router_stats

    tasks_cfg = TasksConfig(builtin=["copy", "add"], num_train=12, num_validation=2, num_test=2)
    tasks = load_tasks(tasks_cfg)
    moe = build_moe(_experts(shared_trunk=True, n=2)).eval()
    moe.save_pretrained(tmp_path)
    TOKENIZER.save_pretrained(tmp_path)
    in_memory = task_router_stats(moe, TOKENIZER, tasks, ["copy", "add"], 1, 2, per_task=5, batch_size=4, max_seq_len=32)
    staged = group_router_stats(str(tmp_path), tasks_cfg, ["copy", "add"], 1, 2, 5, 4, 32)
    assert torch.equal(in_memory.gram, staged.gram) and torch.equal(in_memory.cross, staged.cross)
    rows = [r for n in ("copy", "add") for r in encode_rows({n: tasks[n]}, TOKENIZER, "train", 32, {n: n})[:5]]
    batches = [collate(rows[i:i + 4], TOKENIZER.pad_token_id) for i in range(0, len(rows), 4)]
    by_hand = collect_group_stats(moe, batches, 1, 2)
    assert in_memory.tokens == staged.tokens == by_hand.tokens == [0, sum(int(b["attention_mask"].sum()) for b in batches)]
    assert torch.equal(in_memory.gram, by_hand.gram) and torch.equal(in_memory.cross, by_hand.cross)
    assert in_memory.cross[..., 0].abs().sum() == 0  # every token in the group's own column


@torch.no_grad()
def test_routing_modes_run_and_random_is_seeded():
    moe, batch = build_moe(_experts(shared_trunk=False)).eval(), _batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    first = moe.set_routing("random", seed=3)(**inputs).logits
    assert torch.equal(moe.set_routing("random", seed=3)(**inputs).logits, first)
    prompts = ["cp abc=", "rv ab="]  # cached generation is seeded too
    assert greedy_generate(moe.set_routing("random", seed=3), TOKENIZER, prompts, 5) == \
        greedy_generate(moe.set_routing("random", seed=3), TOKENIZER, prompts, 5)
    assert torch.isfinite(moe.set_routing("sequence_mean")(**inputs).logits).all()
    with pytest.raises(ValueError, match="forced routing needs an expert index"):
        moe.set_routing("forced", expert=7)


def test_weight_average_and_parameter_counts():
    experts = _experts(shared_trunk=False, n=2)
    averaged = average_weights(experts)
    states = [e.state_dict() for e in experts.values()]
    assert averaged.state_dict().keys() == states[0].keys()
    for key, value in averaged.state_dict().items():  # every weight, trunk and MLP alike, is the mean
        assert torch.allclose(value, (states[0][key] + states[1][key]) / 2), key
    moe = build_moe(experts)
    total, active = count_active_parameters(moe)
    mlp = sum(p.numel() for n, p in experts["g0"].named_parameters() if ".mlp." in n)
    dense = sum(p.numel() for p in experts["g0"].parameters())
    routers = 2 * 33 * 2
    assert total == dense + mlp + routers and active == dense + routers


def test_bad_experts_are_rejected_naming_the_cause():
    with pytest.raises(ValueError, match="at least 2 experts"):
        build_moe(_experts(shared_trunk=False, n=1))
    wider = build_embedded_model(ModelConfig(hidden_size=48, num_layers=2, num_heads=4, intermediate_size=64), TOKENIZER, 0)
    with pytest.raises(ValueError, match="different architectures.*hidden_size"):
        build_moe({"a": build_embedded_model(SMALL, TOKENIZER, 0), "b": wider})
    other = build_embedded_model(SMALL, TOKENIZER, 1)
    other.resize_token_embeddings(len(TOKENIZER) + 5)
    with pytest.raises(ValueError, match="different vocabularies"):
        build_moe({"a": build_embedded_model(SMALL, TOKENIZER, 0), "b": other})


@torch.no_grad()
def test_whole_sequence_routing_uses_one_expert_per_row_and_ignores_padding():
    moe, batch = build_moe(_experts(shared_trunk=False)).eval(), _batch()
    moe.set_router(torch.randn(2, 33, 3, generator=torch.Generator().manual_seed(0)))
    moe.set_routing("whole_sequence")
    block = moe.moe_blocks()[0]
    block.capture = []
    moe(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    x, mask = block.capture.pop()
    block.padding_mask = mask
    chosen = block.route(x)[0][..., 0]  # [b, s]
    assert all(len(set(chosen[b].tolist())) == 1 for b in range(chosen.shape[0]))
    # Row 2 is the shortest: its padding does not change its choice.
    short = int(mask[2].sum())
    block.padding_mask = mask[2:, :short]
    assert block.route(x[2:, :short])[0][0, 0, 0] == chosen[2, 0]


def test_unsupported_architectures_are_refused_naming_them():
    assert set(SUPPORTED_MODEL_TYPES) == set(MOE_CLASSES)
    gpt2 = {f"g{i}": GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=128, n_positions=64))
            for i in range(2)}
    for step in (check_compatible, build_moe, average_weights):
        with pytest.raises(ValueError, match="expert g0: architecture .*'gpt2'.*supported: llama, qwen2"):
            step(gpt2)
    with pytest.raises(ValueError, match="upcycle.experts: architecture .*'mistral'.*supported: llama, qwen2"):
        check_supported_model_type("mistral", "upcycle.experts")
    for model_type in SUPPORTED_MODEL_TYPES:
        check_supported_model_type(model_type, "upcycle.experts")


def test_mean_routing_carries_the_running_mean_across_cached_calls():
    """The block alone: a prompt chunk, then one token at a time (what a cached generate feeds it)."""
    config = DumeMoEConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           num_local_experts=3, num_experts_per_tok=2)
    block = MoEBlock(config, LlamaMLP)
    with torch.no_grad():
        block.router.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])  # row 1 left-padded

    def route(mode, chunks):  # chunks: (start, end) of each call; the first starts the sequence
        block.mode, picks = mode, []
        for start, end in chunks:
            block.padding_mask, block.new_sequence = mask[:, start:end], start == 0
            picks.append(block.route(x[:, start:end]))
        return torch.cat([p[0] for p in picks], 1), torch.cat([p[1] for p in picks], 1)

    def by_mean(upto):  # top-2 of the mean score of the non-padding tokens [0, upto)
        m = mask[:, :upto, None].float()
        top = ((block.scores(x[:, :upto]) * m).sum(1) / m.sum(1)).topk(2, dim=-1)
        return top.indices, torch.softmax(top.values, -1)

    whole = route("sequence_mean", [(0, 6)])
    cached = route("sequence_mean", [(0, 4), (4, 5), (5, 6)])
    assert torch.equal(cached[0], whole[0]) and torch.allclose(cached[1], whole[1], atol=1e-6)
    idx, weight = route("whole_sequence", [(0, 4), (4, 5), (5, 6)])
    for position, upto in [(0, 4), (3, 4), (4, 5), (5, 6)]:  # the prompt by its mean; later tokens, running mean
        want = by_mean(upto)
        assert torch.equal(idx[:, position], want[0]) and torch.allclose(weight[:, position], want[1], atol=1e-6)
    idx, weight = route("prompt", [(0, 4), (4, 5), (5, 6)])
    for position in range(6):  # every position, prompt and generated, by the prompt's mean
        want = by_mean(4)
        assert torch.equal(idx[:, position], want[0]) and torch.allclose(weight[:, position], want[1], atol=1e-6)
    assert not torch.allclose(by_mean(4)[1], by_mean(6)[1], atol=1e-3)  # a running mean would weigh differently
    block.carry = None
    with pytest.raises(ValueError, match="holds no running mean"):
        route("sequence_mean", [(4, 5)])


@pytest.mark.parametrize("arch,mode", [("llama", "token"), ("llama", "forced"), ("llama", "sequence_mean"),
                                       ("qwen2", "sequence_mean")])
@torch.no_grad()
def test_cached_generation_equals_recomputing_the_sequence(arch, mode):
    moe, inputs = _routed(arch)
    moe.set_routing(mode, expert=1 if mode == "forced" else None)
    tokens, logits = _generate(moe, inputs, use_cache=True)
    uncached_tokens, uncached_logits = _generate(moe, inputs, use_cache=False)
    assert torch.equal(tokens, uncached_tokens) and torch.allclose(logits, uncached_logits, atol=1e-4)
    for r, real in enumerate(inputs["attention_mask"].bool()):  # left padding changes nothing: each row alone
        alone = _generate(moe, {k: v[r:r + 1, real] for k, v in inputs.items()}, use_cache=True)
        assert torch.equal(alone[0], tokens[r:r + 1]) and torch.allclose(alone[1], logits[r:r + 1], atol=1e-4)


@torch.no_grad()
def test_generation_uses_the_kv_cache_by_default():
    moe, _ = _routed("llama")
    lengths = []
    hook = moe.model.embed_tokens.register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
    try:
        greedy_generate(moe.set_routing("sequence_mean"), TOKENIZER, ["cp abcd=", "rv ab="], 5)
    finally:
        hook.remove()
    assert lengths[0] == len(encode_prompt(TOKENIZER, "cp abcd=")) and set(lengths[1:]) == {1}


@pytest.mark.parametrize("mode,causal", [("token", True), ("sequence_mean", True), ("forced", True),
                                         ("whole_sequence", False)])
@torch.no_grad()
def test_causal_routing_does_not_look_ahead(mode, causal):
    """Changing a late token leaves every earlier position's logits unchanged (whole_sequence shows the test bites)."""
    moe, inputs = _routed("llama")
    moe.set_routing(mode, expert=0 if mode == "forced" else None)
    t = inputs["input_ids"].shape[1] - 2
    changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
    changed["input_ids"][:, t] = (changed["input_ids"][:, t] + 7) % len(TOKENIZER)
    before, after = moe(**inputs).logits, moe(**changed).logits
    assert not torch.allclose(before[:, t:], after[:, t:], atol=1e-3)
    assert torch.allclose(before[:, :t], after[:, :t], atol=1e-6) == causal


@torch.no_grad()
def test_whole_sequence_generation_with_cache_routes_the_prompt_by_its_mean():
    moe, inputs = _routed("llama")
    one = {k: v[1:2] for k, v in inputs.items()}  # a batch of one, left-padded (its layer-0 running mean varies)
    real = one["attention_mask"][0].bool()
    blocks = moe.set_routing("whole_sequence").moe_blocks()
    for block in blocks:
        block.capture = []
    tokens, logits = _generate(moe, one, use_cache=True)
    assert tokens.shape == (1, 8)
    # Oracle: force each layer to the expert its prompt-mean score picks (from the first forward's MLP inputs).
    for block in blocks:
        prompt_x, block.capture = block.capture[0][0], None
        block.mode, block.expert = "forced", int(block.scores(prompt_x)[0, real].mean(0).argmax())
    assert torch.allclose(logits[:, 0], moe(**one, use_cache=False).logits[:, -1], atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("top_k", [1, 2])
@torch.no_grad()
def test_moe_of_copies_of_one_expert_is_that_expert_under_every_routing(arch, top_k):
    """Whatever the router picks and however it weighs its top-k, a mixture of equal experts is the expert:
    the routing weights sum to one and the averaged trunk is the expert's trunk."""
    if arch == "qwen2":
        expert, inputs = next(iter(_qwen2_experts(1).values())).eval(), _qwen2_inputs()
    else:
        expert, batch = build_embedded_model(SMALL, TOKENIZER, seed=5).eval(), _batch()
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    moe = build_moe({f"c{i}": copy.deepcopy(expert) for i in range(3)}, top_k=top_k).eval()
    moe.set_router(torch.randn(len(moe.moe_blocks()), moe.config.hidden_size + 1, 3,
                               generator=torch.Generator().manual_seed(0)))  # routing varies from token to token
    want = expert(**inputs).logits
    for mode in ("token", "sequence_mean", "whole_sequence", "prompt", "random"):
        assert torch.allclose(moe.set_routing(mode, seed=1)(**inputs).logits, want, atol=1e-5), mode
    for i in range(3):
        assert torch.allclose(moe.set_routing("forced", expert=i)(**inputs).logits, want, atol=1e-5)


@torch.no_grad()
def test_random_routing_depends_on_its_seed_and_forced_routing_differs_per_expert():
    moe, batch = build_moe(_experts(shared_trunk=False)).eval(), _batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    assert not torch.allclose(moe.set_routing("random", seed=3)(**inputs).logits,
                              moe.set_routing("random", seed=4)(**inputs).logits)
    forced = [moe.set_routing("forced", expert=i)(**inputs).logits for i in range(3)]
    assert not torch.allclose(forced[0], forced[1]) and not torch.allclose(forced[1], forced[2])
