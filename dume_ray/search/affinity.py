"""Gradient affinity between tasks on the base model: which tasks pull the shared weights the same way.

For each task, the gradient of its cross-entropy (response tokens) w.r.t. every trainable weight of the
base model, averaged over a few batches, flattened. The affinity of tasks i and j is the cosine of their
gradients: near 1 they agree, negative means gradient conflict (training one hurts the other). Groupings
are ranked like a correlation clustering: a grouping scores the sum, over the task pairs it puts together,
of their affinity minus the mean pairwise affinity. Centring matters: on a briefly trained base every
task shares a common direction (format, eos), so raw cosines are mostly positive and an uncentred sum
would always put everything in one group. Singletons score 0. (Cf. "Efficiently Identifying Task
Groupings for Multi-Task Learning", Fifty et al. 2021, which uses lookahead affinity.)

    grads = task_gradients(model, batches_by_task)          # {task: flat gradient [p]}
    matrix = affinity_matrix([grads[t] for t in names])     # [n, n], symmetric, ones on the diagonal
    best = rank_groupings(matrix, top=3, max_groups=4)      # [(score, rgs), ...]

Pure: torch + matplotlib, no Ray. Tested in tests/unit/test_affinity.py.
"""

from __future__ import annotations

import heapq
from typing import Iterable, Optional, Sequence

import torch

from dume_ray.losses import cross_entropy
from dume_ray.search.partitions import RGS, iter_rgs
from dume_ray.training import response_logits

MAX_ENUMERATED_TASKS = 12  # Bell(12) = 4.2 million groupings: enumerating more is not "cheap" any more


def task_gradient(model: torch.nn.Module, batches: Sequence[dict]) -> torch.Tensor:
    """Mean gradient of the response-token CE over `batches`, flattened over trainable weights: [p]."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros(sum(p.numel() for p in params))
    model.eval()  # no dropout noise in the direction we measure
    for batch in batches:
        logits, targets = response_logits(model, batch)
        grads = torch.autograd.grad(cross_entropy(logits, targets), params, allow_unused=True)
        total += torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float().cpu()
                            for g, p in zip(grads, params)])
    return total / max(1, len(batches))


def task_gradients(model: torch.nn.Module, batches_by_task: dict[str, Sequence[dict]]) -> dict[str, torch.Tensor]:
    return {task: task_gradient(model, batches) for task, batches in batches_by_task.items()}


def affinity_matrix(gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pairwise cosine similarity of the gradients: [n, n], symmetric, exactly 1 on the diagonal."""
    if not gradients:
        raise ValueError("affinity_matrix needs at least one gradient")
    stacked = torch.stack([g.double() for g in gradients])  # [n, p]
    norms = stacked.norm(dim=1, keepdim=True)  # [n, 1]
    if bool((norms == 0).any()):
        raise ValueError("a task has an all-zero gradient on the base model; its affinity is undefined")
    unit = stacked / norms
    matrix = (unit @ unit.T).clamp(-1.0, 1.0)
    matrix = (matrix + matrix.T) / 2  # exact symmetry despite rounding
    matrix.fill_diagonal_(1.0)
    return matrix.float()


def mean_pairwise(matrix: torch.Tensor) -> float:
    """Mean off-diagonal affinity (0 for a single task)."""
    n = matrix.shape[0]
    return float((matrix.sum() - matrix.diagonal().sum()) / (n * (n - 1))) if n > 1 else 0.0


def grouping_score(rgs: Sequence[int], matrix: torch.Tensor, center: Optional[float] = None) -> float:
    """Sum over task pairs sharing a group of (affinity - center); center = the mean pairwise affinity."""
    center = mean_pairwise(matrix) if center is None else center
    score = 0.0
    for i in range(len(rgs)):
        for j in range(i + 1, len(rgs)):
            if rgs[i] == rgs[j]:
                score += float(matrix[i, j]) - center
    return score


def rank_groupings(matrix: torch.Tensor, top: int, max_groups: Optional[int] = None,
                   candidates: Optional[Iterable[RGS]] = None) -> list[tuple[float, RGS]]:
    """The `top` groupings with the highest within-group affinity, best first: among `candidates`, or among
    every grouping with at most `max_groups` groups.

    Ties go to the grouping with fewer groups (fewer experts to train), then to the lexicographically first.
    """
    n = matrix.shape[0]
    if candidates is None:
        if n > MAX_ENUMERATED_TASKS:
            raise ValueError(f"ranking enumerates every grouping; {n} tasks > {MAX_ENUMERATED_TASKS} is too many "
                             f"(set search.seed_with_affinity=false or list search.groupings)")
        candidates = iter_rgs(n, max_groups or n)
    center = mean_pairwise(matrix)
    scored = ((round(grouping_score(rgs, matrix, center), 6), -max(rgs, default=-1), rgs) for rgs in candidates)
    best = heapq.nlargest(top, scored, key=lambda x: (x[0], x[1], tuple(-v for v in x[2])))
    return [(score, rgs) for score, _, rgs in best]


def save_heatmap(matrix: torch.Tensor, names: Sequence[str], path: str) -> str:
    """Annotated heatmap PNG of the affinity matrix (red = conflict, blue = agreement)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * n, 0.8 + 0.8 * n))
    image = ax.imshow(matrix.numpy(), cmap="RdBu", vmin=-1, vmax=1)
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{float(matrix[i, j]):.2f}", ha="center", va="center", fontsize=8)
    ax.set_title("gradient affinity on the base (cosine)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
