"""The DUME mixture-of-experts: a Llama or Qwen2 whose every MLP is an MoE of the dense experts' MLPs of that layer.

Fanì & Ersoy 2026 (arXiv 2603.29765): every weight outside the MLP blocks (embeddings, attention, norms, LM head)
is the uniform average of the experts'; layer l's MLP becomes an MoE whose experts are the dense experts' layer-l
MLPs, routed by a per-layer linear router `W_l` [h+1, E] (solved in closed form, `router.py`).

Architectures (`SUPPORTED_MODEL_TYPES`): the experts' `config.model_type` picks the MoE class.
    "llama"  -> DumeMoEConfig / DumeMoEForCausalLM             (a LlamaForCausalLM, LlamaMLP experts)
    "qwen2"  -> DumeQwen2MoEConfig / DumeQwen2MoEForCausalLM   (a Qwen2ForCausalLM: q/k/v biases, Qwen2MLP experts)
Both share one `MoEBlock`, given the architecture's MLP class.

Routing modes (`model.set_routing(mode, expert=None)`). A forward "starts a sequence" when it gets no KV cache or
an empty one (a plain forward, `generate(use_cache=False)` at every step, the prompt of a cached `generate`);
otherwise it continues the cached sequence. Padding (attention_mask 0) never counts in a mean.
    "token"          per-token top-k of the router scores x W_l
    "sequence_mean"  top-k of the causal running mean of the scores over the non-padding tokens so far, so one
                     token's misrouting does not break an answer. Each block carries the running sum and count per
                     row across cached forwards (reset when a forward starts a sequence), so cached generation
                     routes as recomputing the whole sequence at every step would
    "whole_sequence" without a KV cache (a plain forward; generate(use_cache=False), at every step): every position
                     routed by the mean score over the whole input. Scoring a full sequence at once thus lets routing
                     look ahead; uncached generation re-reads and re-routes the prompt and the tokens so far at each
                     step, so the next token still depends on the past only.
                     With a KV cache (generate's default): the first forward (the prompt) routes every prompt
                     position by the mean score over the whole prompt; each later token by the running mean of all
                     tokens so far, itself included (the "sequence_mean" carry). The cached prompt is not re-routed,
                     so from the second generated token on the output can differ from the uncached run's.
                     Either way the first tokens (bos, the start of the prompt), which carry no task signal, are
                     routed with the whole prompt's evidence
    "prompt"         every position routed by the mean score over the prompt: the first forward of a sequence (the
                     prompt) as "whole_sequence"; later (cached, generated) tokens keep the prompt's choice, so one
                     expert answers the whole response. For instruction data, where the prompt says what to do, this
                     is the routing that never switches expert mid-answer. Like "whole_sequence", a full-sequence
                     forward routes by the whole input (it looks ahead): use it for generation
    "forced"         every token to expert `expert` (oracle routing, and the router statistics pass)
    "random"         every token to uniformly random experts (seeded baseline; per forward call, so cached and
                     uncached generation draw differently)
All modes generate with the KV cache (the default). The running mean assumes the rows stay in place between cached
forwards: greedy or sampled generation, not beam search (which reorders the cache rows but not the carry).

This file is self-contained (torch + transformers only): `save_pretrained` copies it next to the weights, so

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

loads the MoE without dume_ray (`load_moe(path)` does the same with this module's classes). Also here: `build_moe`,
`average_weights` (the weight-averaging baseline) and `check_supported_model_type` (the CLI's preflight check).
Pure: no Ray here. Tested in tests/unit/test_upcycle_moe.py.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedConfig, Qwen2Config,
                          Qwen2ForCausalLM)
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

ROUTING_MODES = ("token", "sequence_mean", "whole_sequence", "prompt", "forced", "random")
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")  # dense experts' config.model_type that can be upcycled
_MEAN_MODES = ("sequence_mean", "whole_sequence", "prompt")  # the modes that carry a mean across cached forwards


def check_supported_model_type(model_type: str, where: str) -> None:
    """Raise ValueError unless experts of `model_type` can be upcycled; `where` says which model (for the message)."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{where}: architecture (model_type) {model_type!r} cannot be upcycled into the DUME MoE; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


@strict
class DumeMoEConfig(LlamaConfig):
    """A LlamaConfig plus the MoE's experts and routing."""

    model_type = "dume_moe"
    num_local_experts: int = 2  # E, one per dense expert
    num_experts_per_tok: int = 1  # top-k
    routing: str = "token"  # default routing mode after loading: "token" | "sequence_mean" | "whole_sequence"
    expert_names: list | None = None  # group name of each expert column, in order


@strict
class DumeQwen2MoEConfig(Qwen2Config):
    """A Qwen2Config plus the MoE's experts and routing (the same fields as DumeMoEConfig)."""

    model_type = "dume_qwen2_moe"
    num_local_experts: int = 2
    num_experts_per_tok: int = 1
    routing: str = "token"
    expert_names: list | None = None


class MoEBlock(nn.Module):
    """E experts (`mlp_class`, the architecture's MLP) and a linear router on [x, 1]; replaces one layer's MLP."""

    def __init__(self, config, mlp_class: type[nn.Module]):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.experts = nn.ModuleList(mlp_class(config) for _ in range(config.num_local_experts))
        # float32 router, [h+1, E]; a buffer-like parameter so it is saved and can be fine-tuned.
        self.router = nn.Parameter(torch.zeros(config.hidden_size + 1, config.num_local_experts))
        self.mode, self.expert, self.generator = config.routing, None, None
        # Set by the model's forward on every call: the current chunk's padding mask [b, s] (1 = real token) and
        # whether this call starts a sequence (no KV cache, or an empty one).
        self.padding_mask, self.new_sequence = None, True
        self.carry = None  # mean modes: (score sum [b, E], token count [b, 1]) of the tokens of earlier calls
        self.capture = None  # a list: forward appends (x [b, s, h], padding_mask) for router statistics

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Router scores [b, s, E] = [x, 1] W."""
        xb = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
        return xb.float() @ self.router.float()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen experts [b, s, k] and their mixing weights [b, s, k] (softmax over the chosen scores)."""
        b, s, _ = x.shape
        if self.mode == "forced":
            idx = torch.full((b, s, 1), int(self.expert), dtype=torch.long, device=x.device)
            return idx, torch.ones(b, s, 1, device=x.device)
        if self.mode == "random":
            gen = self.generator
            noise = torch.rand(b, s, self.router.shape[1], generator=gen, device="cpu" if gen is not None else x.device)
            idx = noise.to(x.device).topk(self.top_k, dim=-1).indices
            return idx, torch.full(idx.shape, 1.0 / self.top_k, device=x.device)
        if self.mode not in ("token", *_MEAN_MODES):
            raise ValueError(f"unknown routing mode {self.mode!r}; expected one of {ROUTING_MODES}")
        scores = self.scores(x)
        if self.mode in _MEAN_MODES:
            scores = self.mean_scores(scores)
        top = scores.topk(self.top_k, dim=-1)
        return top.indices, torch.softmax(top.values, dim=-1)

    def mean_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores [b, s, E] the mean modes route by (see the module docstring); updates the carry."""
        b, s, _ = scores.shape
        mask = self.padding_mask if self.padding_mask is not None else torch.ones(b, s, device=scores.device)
        mask = mask.to(scores.dtype)[..., None]  # [b, s, 1]
        past_sum, past_count = self.past_totals(scores)
        if self.mode == "prompt" and not self.new_sequence:  # generated tokens keep the prompt's mean
            return (past_sum / past_count.clamp_min(1.0))[:, None].expand_as(scores)
        sums = past_sum[:, None] + (scores * mask).cumsum(1)  # [b, s, E]: running sums including this chunk
        counts = past_count[:, None] + mask.cumsum(1)  # [b, s, 1]
        # Detached: the carry only feeds later (generation) calls and must not keep a training graph alive.
        self.carry = (sums[:, -1].detach(), counts[:, -1].detach())
        if self.mode in ("whole_sequence", "prompt") and self.new_sequence:  # the whole input (the prompt) by its mean
            return (sums[:, -1:] / counts[:, -1:].clamp_min(1.0)).expand_as(scores)
        return sums / counts.clamp_min(1.0)

    def past_totals(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score sum [b, E] and token count [b, 1] of the earlier tokens: zero when this call starts a sequence."""
        b, _, num_experts = scores.shape
        if self.new_sequence:
            return scores.new_zeros(b, num_experts), scores.new_zeros(b, 1)
        if self.carry is None or self.carry[0].shape[0] != b:
            raise ValueError(f"{self.mode!r} routing continues a cached sequence of batch {b} but holds no running "
                             f"mean for it: start with an empty cache, in this routing mode")
        return self.carry

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


class _DumeMoEMixin:
    """Everything the MoE adds to a dense causal LM (put before it in the bases); `mlp_class` is its MLP."""

    mlp_class: type[nn.Module]

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = MoEBlock(config, self.mlp_class)
        self.post_init()

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        """PreTrainedModel's, refusing a folder of the other architecture's MoE, which would otherwise load with
        its mismatched weights dropped or left random (only warned about); `load_moe` picks the class."""
        config = kwargs.get("config")  # AutoModelForCausalLM passes the loaded one
        saved = (config.model_type if isinstance(config, PreTrainedConfig)
                 else PreTrainedConfig.get_config_dict(path)[0].get("model_type"))
        if saved != cls.config_class.model_type:
            raise ValueError(f"{path} holds a {saved!r} model, not a {cls.config_class.model_type!r} "
                             f"({cls.__name__}); load it with load_moe(path)")
        return super().from_pretrained(path, *args, **kwargs)

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.model.layers]

    def set_routing(self, mode: str, expert: int | None = None, seed: int = 0):
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

    # position_ids is named in the signature because generate only derives it from a left-padded attention_mask
    # for a forward that accepts it (as the dense models' does).
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)  # cache's older name, deprecated
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        # With a cache the attention_mask covers past + current tokens; the current chunk's are its last columns.
        # (A 4D / dict mask, from a compiled static cache, carries no padding row we can read: padding then counts.)
        chunk_mask = attention_mask[:, -length:] if torch.is_tensor(attention_mask) and attention_mask.dim() == 2 else None
        new_sequence = cache is None or cache.get_seq_length() == 0
        for block in self.moe_blocks():
            block.padding_mask, block.new_sequence = chunk_mask, new_sequence
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, inputs_embeds=inputs_embeds, **kwargs)


class DumeMoEForCausalLM(_DumeMoEMixin, LlamaForCausalLM):
    """LlamaForCausalLM with every layer's MLP an `MoEBlock` of LlamaMLPs."""

    config_class = DumeMoEConfig
    mlp_class = LlamaMLP


class DumeQwen2MoEForCausalLM(_DumeMoEMixin, Qwen2ForCausalLM):
    """Qwen2ForCausalLM (biased q/k/v projections) with every layer's MLP an `MoEBlock` of Qwen2MLPs."""

    config_class = DumeQwen2MoEConfig
    mlp_class = Qwen2MLP


# save_pretrained writes each config's auto_map to its own classes, so trust_remote_code loads the right twin.
DumeMoEConfig.register_for_auto_class()
DumeMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
DumeQwen2MoEConfig.register_for_auto_class()
DumeQwen2MoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")

MOE_CLASSES = {"llama": DumeMoEForCausalLM, "qwen2": DumeQwen2MoEForCausalLM}  # dense model_type -> its MoE


def load_moe(path: str, **kwargs) -> nn.Module:
    """A saved MoE as this module's class for its architecture (from_pretrained without trust_remote_code)."""
    model_type = PreTrainedConfig.get_config_dict(path)[0].get("model_type")
    by_type = {cls.config_class.model_type: cls for cls in MOE_CLASSES.values()}
    if model_type not in by_type:
        raise ValueError(f"{path}: not a DUME MoE (model_type {model_type!r}; expected one of {sorted(by_type)})")
    return by_type[model_type].from_pretrained(path, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Building: check the experts fit together, average the trunk, stack the MLPs.
# ---------------------------------------------------------------------------------------------------------

_NAME_KEYS = ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache")


def check_compatible(experts: dict[str, nn.Module]) -> None:
    """Raise ValueError naming the cause when the experts cannot be merged into one model."""
    if len(experts) < 2:
        raise ValueError(f"upcycling needs at least 2 experts (task groups, experts.groups), got {len(experts)}: "
                         f"{list(experts)}")
    for name, model in experts.items():
        check_supported_model_type(model.config.model_type, f"expert {name}")
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
        raise ValueError(f"expert {names[0]} has no '*.mlp.*' weights: only Llama or Qwen2 MLPs can be upcycled")


def average_weights(experts: dict[str, nn.Module]) -> nn.Module:
    """The weight-averaging baseline: one dense model, every weight the uniform mean of the experts'."""
    check_compatible(experts)
    models = list(experts.values())
    averaged = AutoModelForCausalLM.from_config(models[0].config)
    states = [m.state_dict() for m in models]
    averaged.load_state_dict({k: sum(s[k].float() for s in states) / len(states) for k in states[0]})
    return averaged


def build_moe(experts: dict[str, nn.Module], top_k: int = 1, routing: str = "token") -> nn.Module:
    """The MoE (the class for the experts' architecture, `MOE_CLASSES`) with the experts' averaged non-MLP weights
    and their MLPs as layer experts; router zero."""
    check_compatible(experts)
    if not 1 <= top_k <= len(experts):
        raise ValueError(f"upcycle.top_k must be in [1, {len(experts)}] (number of experts), got {top_k}")
    dense = experts[next(iter(experts))].config.to_dict()
    moe_class = MOE_CLASSES[dense.pop("model_type")]
    for key in _NAME_KEYS:
        dense.pop(key, None)
    config = moe_class.config_class(**dense, num_local_experts=len(experts), num_experts_per_tok=top_k,
                                    routing=routing, expert_names=list(experts))
    moe = moe_class(config)
    missing, unexpected = moe.load_state_dict(_moe_state(experts), strict=False)
    if unexpected or any(not k.endswith(".mlp.router") for k in missing):
        raise ValueError(f"expert weights do not fit the MoE: missing {missing}, unexpected {unexpected}")
    return moe


def _moe_state(experts: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The MoE's state dict (routers aside): MLP weights stacked as layer experts, everything else averaged."""
    states = [m.state_dict() for m in experts.values()]
    merged = {}
    for key in states[0]:
        if ".mlp." in key:  # model.layers.{l}.mlp.{proj}.weight -> model.layers.{l}.mlp.experts.{e}.{proj}.weight
            head, tail = key.split(".mlp.")
            merged.update({f"{head}.mlp.experts.{e}.{tail}": s[key].float() for e, s in enumerate(states)})
        else:
            merged[key] = sum(s[key].float() for s in states) / len(states)
    return merged


def count_active_parameters(model: nn.Module) -> tuple[int, int]:
    """(total parameters, parameters one token uses: everything but the unchosen experts' MLPs)."""
    total = sum(p.numel() for p in model.parameters())
    per_expert = sum(sum(p.numel() for p in b.experts[0].parameters()) for b in model.moe_blocks())
    unused = (model.config.num_local_experts - model.config.num_experts_per_tok) * per_expert
    return total, total - unused
