"""DUME's closed-form router: per-layer ridge regression from MLP inputs to one-hot expert labels.

Fanì & Ersoy 2026, "Training-Free Dynamic Upcycling of Expert Language Models" (arXiv 2603.29765). For each
layer l, with x the MLP input (after the post-attention norm) and a 1 appended for the bias, over the tokens of
every group's data (each token's own group expert forced at every layer):

    A_l = sum x x^T          [h+1, h+1]
    B_l = sum x onehot(g)^T  [h+1, E]
    W_l = (A_l + lambda I)^-1 B_l

Statistics are sums, so each group's can be gathered on its own (a Ray task per group in `launch.py`) and
added; adding an expert adds its A and appends its column to B, then re-solves. Accumulation and the solve
are in float64. Routing scores are x W_l.

    stats = group_stats(captured_inputs)           # per group, from `collect_group_inputs`
    total = merge_stats([stats_g0, stats_g1, ...])
    weights = solve_router(total, ridge_lambda=1e-2, normalize_columns=False)
    losses = finetune_router(moe, batches, steps=50, lr=1e-2)   # optional DUME+

Pure: no Ray here. Tested in tests/unit/test_upcycle_router.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dume_ray.distill.losses import cross_entropy
from dume_ray.training import response_logits


@dataclass
class RouterStats:
    """Sufficient statistics of the ridge router, one entry per layer.

    Attributes:
        gram: [L, h+1, h+1] float64, sum of x x^T over counted tokens (x with a 1 appended).
        cross: [L, h+1, E] float64, sum of x onehot(group)^T; column e is the sum of group e's inputs.
        tokens: counted tokens per group, [E].
    """

    gram: torch.Tensor
    cross: torch.Tensor
    tokens: list[int]

    @property
    def num_experts(self) -> int:
        return self.cross.shape[-1]


def with_bias(x: torch.Tensor) -> torch.Tensor:
    """[..., h] -> [..., h+1] with a trailing 1 for the bias."""
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def group_stats(layer_inputs: list[torch.Tensor], group: int, num_groups: int) -> RouterStats:
    """Statistics of one group's tokens.

    Args:
        layer_inputs: per layer, the MLP inputs of the counted (non-padding) tokens, [n, h].
        group: this group's expert index (its column in B).
        num_groups: E, the number of experts.
    """
    if not 0 <= group < num_groups:
        raise ValueError(f"group index {group} out of range for {num_groups} experts")
    grams, crosses = [], []
    for x in layer_inputs:
        xb = with_bias(x.double())  # [n, h+1]
        grams.append(xb.T @ xb)
        cross = torch.zeros(xb.shape[1], num_groups, dtype=torch.float64)
        cross[:, group] = xb.sum(0)
        crosses.append(cross)
    tokens = [0] * num_groups
    tokens[group] = int(layer_inputs[0].shape[0]) if layer_inputs else 0
    return RouterStats(torch.stack(grams), torch.stack(crosses), tokens)


def merge_stats(parts: list[RouterStats]) -> RouterStats:
    """Sum of statistics gathered separately (per group, per shard, per worker)."""
    if not parts:
        raise ValueError("merge_stats: nothing to merge")
    shapes = {(tuple(p.gram.shape), tuple(p.cross.shape)) for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"merge_stats: statistics of different shapes {sorted(shapes)}")
    return RouterStats(sum(p.gram for p in parts), sum(p.cross for p in parts),
                       [sum(t) for t in zip(*(p.tokens for p in parts))])


def add_expert(stats: RouterStats, new: RouterStats) -> RouterStats:
    """Append one expert: `new` holds the new group's statistics in its last column (from `group_stats` with
    group = stats.num_experts and num_groups = stats.num_experts + 1). Re-solve after this."""
    if new.num_experts != stats.num_experts + 1:
        raise ValueError(f"add_expert: new statistics have {new.num_experts} columns, expected {stats.num_experts + 1}")
    if bool(new.cross[..., :-1].abs().sum() > 0):
        raise ValueError("add_expert: the new statistics must only fill the new (last) column")
    cross = torch.cat([stats.cross, new.cross[..., -1:]], dim=-1)
    return RouterStats(stats.gram + new.gram, cross, stats.tokens + [new.tokens[-1]])


def solve_router(stats: RouterStats, ridge_lambda: float = 1e-2, normalize_columns: bool = False) -> torch.Tensor:
    """W_l = (A_l + lambda I)^-1 B_l for every layer, in float64.

    Args:
        normalize_columns: scale each expert's column so its weight part (all rows but the bias) has unit
            length; the bias row is scaled by the same factor.

    Returns:
        [L, h+1, E] float32 router weights; scores are `with_bias(x) @ W[l]`.
    """
    if ridge_lambda < 0:
        raise ValueError(f"upcycle.ridge_lambda must be >= 0, got {ridge_lambda}")
    if any(t == 0 for t in stats.tokens):
        empty = [i for i, t in enumerate(stats.tokens) if t == 0]
        raise ValueError(f"router statistics have no tokens for expert(s) {empty}")
    eye = torch.eye(stats.gram.shape[-1], dtype=torch.float64)
    weights = torch.linalg.solve(stats.gram + ridge_lambda * eye, stats.cross)  # [L, h+1, E]
    if normalize_columns:
        norms = weights[:, :-1, :].norm(dim=1, keepdim=True).clamp_min(1e-12)  # [L, 1, E]
        weights = weights / norms
    return weights.float()


@torch.no_grad()
def collect_group_stats(model, batches, group: int, num_groups: int) -> RouterStats:
    """Router statistics of one group: run `model` (a `DumeMoEForCausalLM`) with `group`'s expert forced at
    every layer over `batches` ({"input_ids", "attention_mask"} [b, s]) and sum over the non-padding tokens."""
    model.eval()
    model.set_routing("forced", expert=group)
    blocks = model.moe_blocks()
    parts = []
    try:
        for block in blocks:
            block.capture = []
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            keep = batch["attention_mask"].bool()  # [b, s]; prompt and response tokens, no padding
            parts.append(group_stats([block.capture.pop()[0][keep] for block in blocks], group, num_groups))
    finally:
        for block in blocks:
            block.capture = None
        model.set_routing(model.config.routing)
    return merge_stats(parts)


def finetune_router(model, batches, steps: int, lr: float) -> list[float]:
    """DUME+: a few AdamW steps on the routers only (everything else frozen), from the closed-form solution,
    with cross-entropy on response tokens of mixed-task `batches` (collated rows: input_ids, attention_mask,
    labels). The gradient reaches the top-k choice through the straight-through gate of `MoEBlock.route`.

    Returns:
        the loss of every step.
    """
    routers = [block.router for block in model.moe_blocks()]
    for param in model.parameters():
        param.requires_grad = False
    for router in routers:
        router.requires_grad = True
    optimizer = torch.optim.AdamW(routers, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _, batch in zip(range(steps), batches):
        logits, targets = response_logits(model, batch)
        loss = cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for router in routers:
        router.requires_grad = False
    model.eval()
    return losses
