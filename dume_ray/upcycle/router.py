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
    stats = task_router_stats(moe, tokenizer, tasks, ["copy"], group=0, num_groups=2, per_task=64,
                              batch_size=16, max_seq_len=64)   # the same from a group's tasks' training rows
    total = merge_stats([stats_g0, stats_g1, ...])
    weights = solve_router(total, ridge_lambda=1e-2, normalize_columns=False)
    weights_plus, losses = finetune_router(weights, per_group_inputs, steps=50, lr=1e-2)   # optional DUME+

Pure: no Ray here. Tested in tests/unit/test_upcycle_router.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dume_ray.data.encode import collate
from dume_ray.tasks import encode_rows


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


def stats_from_groups(parts: list[tuple[torch.Tensor, torch.Tensor, int]]) -> RouterStats:
    """Router statistics of E groups gathered (and stored) one group at a time: each part is (gram [L, h+1, h+1],
    that group's column of B [L, h+1], its token count), in expert order. Grown one expert at a time with
    `add_expert`, so an expert added to a finished run costs its own statistics only."""
    gram, column, tokens = parts[0]
    stats = RouterStats(gram, column[..., None], [tokens])
    for gram, column, tokens in parts[1:]:
        cross = torch.zeros(*column.shape, stats.num_experts + 1, dtype=column.dtype)
        cross[..., -1] = column
        stats = add_expert(stats, RouterStats(gram, cross, [0] * stats.num_experts + [tokens]))
    return stats


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
    # A + lambda I is symmetric positive (semi)definite: Cholesky, one layer at a time. (A batched
    # torch.linalg.solve in float64 fails inside oneMKL's LU on 2 threads for h = 576: "Pivots given to lu_solve".)
    weights = torch.stack([_solve_spd(gram + ridge_lambda * eye, cross)
                           for gram, cross in zip(stats.gram, stats.cross)])  # [L, h+1, E]
    if normalize_columns:
        norms = weights[:, :-1, :].norm(dim=1, keepdim=True).clamp_min(1e-12)  # [L, 1, E]
        weights = weights / norms
    return weights.float()


def _solve_spd(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """matrix^-1 rhs for a symmetric positive semi-definite matrix; falls back to least squares when it is
    singular (lambda = 0 with fewer tokens than dimensions)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.lstsq(matrix, rhs).solution


@torch.no_grad()
def collect_group_inputs(model, batches, group: int):
    """Yield, per batch, the MLP inputs of every layer ([n, h] each, non-padding tokens: prompt and response)
    of `model` (a `DumeMoEForCausalLM`) run with `group`'s expert forced at every layer."""
    model.eval()
    model.set_routing("forced", expert=group)
    blocks = model.moe_blocks()
    try:
        for block in blocks:
            block.capture = []
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            keep = batch["attention_mask"].bool()  # [b, s]
            yield [block.capture.pop()[0][keep] for block in blocks]
    finally:
        for block in blocks:
            block.capture = None
        model.set_routing(model.config.routing)


def collect_group_stats(model, batches, group: int, num_groups: int, keep_inputs: int = 0):
    """Router statistics of one group (its expert forced at every layer) over `batches` ({"input_ids",
    "attention_mask"} [b, s]), summed over non-padding tokens.

    Returns:
        RouterStats; with keep_inputs > 0, (RouterStats, per-layer inputs [<= keep_inputs, h]) for DUME+.
    """
    parts, kept = [], []
    for inputs in collect_group_inputs(model, batches, group):
        parts.append(group_stats(inputs, group, num_groups))
        if sum(len(k[0]) for k in kept) < keep_inputs:
            kept.append(inputs)
    stats = merge_stats(parts)
    if keep_inputs <= 0:
        return stats
    return stats, [torch.cat([k[layer] for k in kept])[:keep_inputs] for layer in range(len(kept[0]))]


def task_router_stats(moe, tokenizer, tasks: dict, names: list[str], group: int, num_groups: int, per_task: int,
                      batch_size: int, max_seq_len: int, keep_inputs: int = 0):
    """`collect_group_stats` of one group over its tasks' training examples: the first `per_task` of each task
    in `names` (`tasks`: {name: Task}), in batches of `batch_size`, through `moe` (a `DumeMoEForCausalLM` in
    memory). The upcycle stage's Ray task (`launch.group_router_stats`) and benchmarks/regime.py both use it."""
    rows = []
    for name in names:
        rows += encode_rows({name: tasks[name]}, tokenizer, "train", max_seq_len, {name: "g"})[:per_task]
    batches = (collate(rows[i:i + batch_size], tokenizer.pad_token_id) for i in range(0, len(rows), batch_size))
    return collect_group_stats(moe, batches, group, num_groups, keep_inputs)


def finetune_router(weights: torch.Tensor, inputs: list[list[torch.Tensor]], steps: int, lr: float) -> tuple[torch.Tensor, list[float]]:
    """DUME+: refine the closed-form router for a few steps on the routing objective itself: softmax
    cross-entropy of x W_l against the token's own group (multinomial logistic regression, full batch,
    AdamW), starting from the ridge solution. The trunk and experts are frozen, so the inputs gathered
    with each group's expert forced are the features.

    Args:
        weights: [L, h+1, E] from `solve_router`.
        inputs: per group (in expert order), per layer, MLP inputs [n_g, h].

    Returns:
        the refined weights [L, h+1, E] float32, and the loss of every step (mean over layers).
    """
    labels = torch.cat([torch.full((len(group[0]),), g) for g, group in enumerate(inputs)])
    features = [with_bias(torch.cat([group[layer] for group in inputs]).float()) for layer in range(weights.shape[0])]
    w = weights.clone().float().requires_grad_(True)
    optimizer = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = sum(torch.nn.functional.cross_entropy(x @ w[layer], labels) for layer, x in enumerate(features)) / len(features)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return w.detach(), losses
