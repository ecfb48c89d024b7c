"""The DUME MoE: forced routing reproduces an expert, save/load round trip, routing modes, bad input.

    .venv/bin/python -m pytest tests/unit/test_upcycle_moe.py -q
"""

import pytest
import torch

from dume_ray.config import ModelConfig
from dume_ray.data.encode import collate, encode_example
from dume_ray.data.tokenizer import build_char_tokenizer
from dume_ray.model import build_embedded_model
from dume_ray.training import greedy_generate
from dume_ray.upcycle.moe import average_weights, build_moe, count_active_parameters
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


@torch.no_grad()
def test_forced_routing_gives_exactly_the_experts_logits_when_trunks_are_shared():
    experts = _experts(shared_trunk=True)
    moe, batch = build_moe(experts).eval(), _batch()
    for i, expert in enumerate(experts.values()):
        want = expert.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = moe.set_routing("forced", expert=i)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.allclose(got, want, atol=1e-5)
    prompts = ["cp abc=", "rv ab="]  # generation (no KV cache, left padding) agrees too
    moe.set_routing("forced", expert=2)
    assert greedy_generate(moe, TOKENIZER, prompts, 6) == greedy_generate(experts["g2"], TOKENIZER, prompts, 6)


@torch.no_grad()
def test_saved_moe_loads_with_one_call_and_reproduces_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    moe, batch = build_moe(_experts(shared_trunk=False), routing="sequence_mean").eval(), _batch()
    moe.set_router(torch.randn(2, 33, 3))
    moe.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert loaded.config.routing == "sequence_mean" and loaded.config.expert_names == ["g0", "g1", "g2"]
    for mode in ("sequence_mean", "token"):
        want = moe.set_routing(mode)(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
        got = loaded.set_routing(mode)(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
        assert torch.equal(got, want)


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


@torch.no_grad()
def test_routing_modes_run_and_random_is_seeded():
    moe, batch = build_moe(_experts(shared_trunk=False)).eval(), _batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    first = moe.set_routing("random", seed=3)(**inputs).logits
    assert torch.equal(moe.set_routing("random", seed=3)(**inputs).logits, first)
    assert torch.isfinite(moe.set_routing("sequence_mean")(**inputs).logits).all()
    with pytest.raises(ValueError, match="forced routing needs an expert index"):
        moe.set_routing("forced", expert=7)


def test_weight_average_and_parameter_counts():
    experts = _experts(shared_trunk=False, n=2)
    averaged = average_weights(experts)
    key = "model.layers.0.mlp.up_proj.weight"
    want = (experts["g0"].state_dict()[key] + experts["g1"].state_dict()[key]) / 2
    assert torch.allclose(averaged.state_dict()[key], want)
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
