"""The DUME mixture-of-experts: a Llama whose every MLP is an MoE of the dense experts' MLPs of that layer.

Fanì & Ersoy 2026 (arXiv 2603.29765): every weight outside the MLP blocks (embeddings, attention, norms, LM head)
is the uniform average of the experts'; layer l's MLP becomes an MoE whose experts are the dense experts' layer-l
MLPs, routed by a per-layer linear router `W_l` [h+1, E] (solved in closed form, `router.py`).

Routing modes (`model.set_routing(mode, expert=None)`), all working with `generate` (without a KV cache):
    "token"          per-token top-k of the router scores x W_l
    "sequence_mean"  top-k of the causal running mean of the scores over the sequence so far (padding excluded),
                     so one token's misrouting does not break an answer; generation still works (causal)
    "whole_sequence" every position routed by the mean score over the whole input (padding excluded). Without a
                     KV cache each generation step re-reads the prompt and the tokens generated so far, so the
                     next token still depends on the past only; scoring a full sequence at once would let
                     routing look ahead (use it for generation). Also routes the first tokens (bos, the start
                     of the prompt), which carry no task signal, with the whole prompt's evidence
    "forced"         every token to expert `expert` (oracle routing, and the router statistics pass)
    "random"         every token to uniformly random experts (seeded baseline)

This file is self-contained (torch + transformers only): `save_pretrained` copies it next to the weights, so

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

loads the MoE without dume_ray. Also here: `build_moe` and `average_weights` (the weight-averaging baseline).
Pure: no Ray here. Tested in tests/unit/test_upcycle_moe.py.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

ROUTING_MODES = ("token", "sequence_mean", "whole_sequence", "forced", "random")


@strict
class DumeMoEConfig(LlamaConfig):
    """A LlamaConfig plus the MoE's experts and routing."""

    model_type = "dume_moe"
    num_local_experts: int = 2  # E, one per dense expert
    num_experts_per_tok: int = 1  # top-k
    routing: str = "token"  # default routing mode after loading: "token" | "sequence_mean" | "whole_sequence"
    expert_names: list | None = None  # group name of each expert column, in order


class MoEBlock(nn.Module):
    """E experts (LlamaMLP) and a linear router on [x, 1]; replaces one layer's MLP."""

    def __init__(self, config: DumeMoEConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.experts = nn.ModuleList(LlamaMLP(config) for _ in range(config.num_local_experts))
        # float32 router, [h+1, E]; a buffer-like parameter so it is saved and can be fine-tuned.
        self.router = nn.Parameter(torch.zeros(config.hidden_size + 1, config.num_local_experts))
        self.mode, self.expert, self.generator = config.routing, None, None
        self.padding_mask = None  # [b, s] 1 = real token; set by DumeMoEForCausalLM.forward per call
        self.capture = None  # a list: forward appends (x [b, s, h], padding_mask) for router statistics

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Router scores [b, s, E] = [x, 1] W."""
        xb = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
        return xb.float() @ self.router.float()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen experts [b, s, k] and their mixing weights [b, s, k] (softmax over the chosen scores)."""
        b, s, _ = x.shape
        num_experts = self.router.shape[1]
        if self.mode == "forced":
            idx = torch.full((b, s, 1), int(self.expert), dtype=torch.long, device=x.device)
            return idx, torch.ones(b, s, 1, device=x.device)
        if self.mode == "random":
            gen = self.generator
            noise = torch.rand(b, s, num_experts, generator=gen, device="cpu" if gen is not None else x.device)
            idx = noise.to(x.device).topk(self.top_k, dim=-1).indices
            return idx, torch.full(idx.shape, 1.0 / self.top_k, device=x.device)
        scores = self.scores(x)
        if self.mode in ("sequence_mean", "whole_sequence"):
            mask = self.padding_mask if self.padding_mask is not None else torch.ones(b, s, device=x.device)
            mask = mask.to(scores.dtype)[..., None]  # [b, s, 1]
            if self.mode == "sequence_mean":
                scores = (scores * mask).cumsum(1) / mask.cumsum(1).clamp_min(1.0)
            else:
                scores = ((scores * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1.0)).expand_as(scores)
        elif self.mode != "token":
            raise ValueError(f"unknown routing mode {self.mode!r}; expected one of {ROUTING_MODES}")
        top = scores.topk(self.top_k, dim=-1)
        return top.indices, torch.softmax(top.values, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.capture is not None:
            self.capture.append((x.detach(), self.padding_mask))
        idx, weight = self.route(x)  # [b, s, k]
        out = torch.zeros_like(x)
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
        flat_idx, flat_w = idx.reshape(-1, idx.shape[-1]), weight.reshape(-1, idx.shape[-1]).to(x.dtype)
        for e, expert in enumerate(self.experts):
            rows, slot = (flat_idx == e).nonzero(as_tuple=True)
            if rows.numel():
                flat_out.index_add_(0, rows, expert(flat_x[rows]) * flat_w[rows, slot, None])
        return out


class DumeMoEForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with every layer's MLP an `MoEBlock`. Generation runs without a KV cache (sequence-mean
    routing needs the whole prefix; the models this is built for are small)."""

    config_class = DumeMoEConfig

    def __init__(self, config: DumeMoEConfig):
        config.use_cache = False
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = MoEBlock(config)
        self.generation_config.use_cache = False
        self.post_init()

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.model.layers]

    def set_routing(self, mode: str, expert: int | None = None, seed: int = 0) -> "DumeMoEForCausalLM":
        """Route every layer by `mode` (see module docstring); `expert` for "forced", `seed` for "random"."""
        if mode not in ROUTING_MODES:
            raise ValueError(f"unknown routing mode {mode!r}; expected one of {ROUTING_MODES}")
        if mode == "forced" and not (expert is not None and 0 <= expert < self.config.num_local_experts):
            raise ValueError(f"forced routing needs an expert index in [0, {self.config.num_local_experts}), got {expert}")
        for block in self.moe_blocks():
            block.mode, block.expert = mode, expert
            block.generator = torch.Generator().manual_seed(seed) if mode == "random" else None
        return self

    def set_router(self, weights: torch.Tensor) -> None:
        """Install router weights [L, h+1, E] (from `router.solve_router`)."""
        blocks = self.moe_blocks()
        if tuple(weights.shape) != (len(blocks), *blocks[0].router.shape):
            raise ValueError(f"router weights of shape {tuple(weights.shape)} do not fit "
                             f"{(len(blocks), *blocks[0].router.shape)}")
        with torch.no_grad():
            for block, w in zip(blocks, weights):
                block.router.copy_(w)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        kwargs["use_cache"] = False
        kwargs.pop("past_key_values", None)
        for block in self.moe_blocks():
            block.padding_mask = attention_mask
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


DumeMoEConfig.register_for_auto_class()
DumeMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")


# ---------------------------------------------------------------------------------------------------------
# Building: check the experts fit together, average the trunk, stack the MLPs.
# ---------------------------------------------------------------------------------------------------------

_NAME_KEYS = ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache")


def check_compatible(experts: dict[str, nn.Module]) -> None:
    """Raise ValueError naming the cause when the experts cannot be merged into one model."""
    if len(experts) < 2:
        raise ValueError(f"upcycling needs at least 2 experts (task groups, experts.groups), got {len(experts)}: "
                         f"{list(experts)}")
    names = list(experts)
    first = experts[names[0]].config.to_dict()
    for name in names[1:]:
        other = experts[name].config.to_dict()
        if other.get("vocab_size") != first.get("vocab_size"):
            raise ValueError(f"experts have different vocabularies: {names[0]} has vocab_size {first.get('vocab_size')}, "
                             f"{name} has {other.get('vocab_size')}")
        diff = sorted(k for k in set(first) | set(other)
                      if k not in _NAME_KEYS and first.get(k) != other.get(k))
        if diff:
            raise ValueError(f"experts have different architectures: {names[0]} and {name} differ in "
                             + ", ".join(f"{k} ({first.get(k)} vs {other.get(k)})" for k in diff))
        if type(experts[name]) is not type(experts[names[0]]):
            raise ValueError(f"experts have different architectures: {type(experts[names[0]]).__name__} vs "
                             f"{type(experts[name]).__name__} ({name})")
    if not any(".mlp." in k for k in experts[names[0]].state_dict()):
        raise ValueError(f"expert {names[0]} has no '*.mlp.*' weights: only Llama-style MLPs can be upcycled")


def average_weights(experts: dict[str, nn.Module]) -> nn.Module:
    """The weight-averaging baseline: one dense model, every weight the uniform mean of the experts'."""
    check_compatible(experts)
    models = list(experts.values())
    averaged = AutoModelForCausalLM.from_config(models[0].config)
    states = [m.state_dict() for m in models]
    averaged.load_state_dict({k: sum(s[k].float() for s in states) / len(states) for k in states[0]})
    return averaged


def build_moe(experts: dict[str, nn.Module], top_k: int = 1, routing: str = "token") -> DumeMoEForCausalLM:
    """The MoE with the experts' averaged non-MLP weights and their MLPs as layer experts; router zero."""
    check_compatible(experts)
    if not 1 <= top_k <= len(experts):
        raise ValueError(f"upcycle.top_k must be in [1, {len(experts)}] (number of experts), got {top_k}")
    dense = experts[next(iter(experts))].config.to_dict()
    for key in _NAME_KEYS + ("model_type",):
        dense.pop(key, None)
    config = DumeMoEConfig(**dense, num_local_experts=len(experts), num_experts_per_tok=top_k, routing=routing,
                           expert_names=list(experts))
    moe = DumeMoEForCausalLM(config)
    states = [m.state_dict() for m in experts.values()]
    merged = {}
    for key in states[0]:
        if ".mlp." in key:  # model.layers.{l}.mlp.{proj}.weight -> model.layers.{l}.mlp.experts.{e}.{proj}.weight
            head, tail = key.split(".mlp.")
            merged.update({f"{head}.mlp.experts.{e}.{tail}": s[key].float() for e, s in enumerate(states)})
        else:
            merged[key] = sum(s[key].float() for s in states) / len(states)
    missing, unexpected = moe.load_state_dict(merged, strict=False)
    if unexpected or any(not k.endswith(".mlp.router") for k in missing):
        raise ValueError(f"expert weights do not fit the MoE: missing {missing}, unexpected {unexpected}")
    return moe


def count_active_parameters(model: DumeMoEForCausalLM) -> tuple[int, int]:
    """(total parameters, parameters one token uses: everything but the unchosen experts' MLPs)."""
    total = sum(p.numel() for p in model.parameters())
    per_expert = sum(sum(p.numel() for p in b.experts[0].parameters()) for b in model.moe_blocks())
    unused = (model.config.num_local_experts - model.config.num_experts_per_tok) * per_expert
    return total, total - unused
