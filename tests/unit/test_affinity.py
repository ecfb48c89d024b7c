"""Gradient affinity: a symmetric cosine matrix with ones on the diagonal that sees engineered conflict, and
groupings ranked by within-group affinity.

    .venv/bin/python -m pytest tests/unit/test_affinity.py -q
"""

import torch

from dume_ray.config import OptimConfig
from dume_ray.data.encode import collate, encode_example
from dume_ray.model import load_model, load_tokenizer
from dume_ray.search.affinity import affinity_matrix, grouping_score, rank_groupings, save_heatmap, task_gradients
from dume_ray.training import ce_train_step, make_optimizer


def _batches(tokenizer, pairs):
    rows = [encode_example(tokenizer, p, r, 32) for p, r in pairs]
    return [collate(rows, tokenizer.pad_token_id)]


def _conflict_matrix(tiny_model_dir):
    tokenizer, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    prompts = ["ab=", "cd=", "ef=", "gh="]
    tasks = {  # same inputs: "first" and "again" want the same output, "opposite" wants a different one
        "first": _batches(tokenizer, [(p, "x") for p in prompts]),
        "again": _batches(tokenizer, [(p, "x") for p in prompts]),
        "opposite": _batches(tokenizer, [(p, "y") for p in prompts]),
    }
    # Like the pipeline's base, pretrain briefly on the mixture: what the tasks share (format, eos) is learned,
    # and what is left is the pull of each task's own targets, x against y on the same inputs.
    mixture = _batches(tokenizer, [(p, r) for p in prompts for r in ("x", "y")])[0]
    optimizer, scheduler = make_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=1, steps=60))
    for _ in range(60):
        ce_train_step(model, mixture, optimizer, scheduler, grad_clip=1.0)
    grads = task_gradients(model, tasks)
    return affinity_matrix([grads[t] for t in tasks])


def test_affinity_is_symmetric_with_unit_diagonal_and_detects_conflict(tiny_model_dir):
    matrix = _conflict_matrix(tiny_model_dir)
    assert torch.equal(matrix, matrix.T)
    assert torch.all(matrix.diagonal() == 1.0)
    assert bool(((matrix >= -1) & (matrix <= 1)).all())
    assert matrix[0, 1] > 0.99  # identical tasks agree
    assert matrix[0, 2] < -0.5  # same inputs, opposite targets: gradient conflict


def test_ranking_groups_agreeing_tasks_and_separates_conflicting_ones():
    matrix = torch.tensor([[1.0, 0.9, -0.5], [0.9, 1.0, -0.4], [-0.5, -0.4, 1.0]])
    assert grouping_score((0, 0, 1), matrix) > grouping_score((0, 1, 2), matrix) == 0.0 > grouping_score((0, 0, 0), matrix)
    best = rank_groupings(matrix, top=2, max_groups=3)
    assert best[0][1] == (0, 0, 1)  # the agreeing pair shares an expert, the conflicting task is alone
    assert rank_groupings(matrix, top=1, max_groups=1)[0][1] == (0, 0, 0)  # the cap is respected
    assert rank_groupings(matrix, top=5, candidates=[(0, 1, 2), (0, 1, 1)])[0][1] == (0, 1, 2)


def test_ranking_is_relative_to_the_mean_affinity_so_all_positive_cosines_do_not_merge_everything():
    # copy/reverse/sort agree strongly, add/sub moderately, shift with nobody: all cosines positive.
    names = ["copy", "reverse", "sort", "shift", "add", "sub"]
    matrix = torch.full((6, 6), 0.1)
    for i, j, v in [(0, 1, 0.8), (0, 2, 0.7), (1, 2, 0.9), (4, 5, 0.5)]:
        matrix[i, j] = matrix[j, i] = v
    matrix.fill_diagonal_(1.0)
    best = rank_groupings(matrix, top=1, max_groups=6)[0][1]
    assert best == (0, 0, 0, 1, 2, 2), [names[k] for k in best]  # copy+reverse+sort | shift | add+sub


def test_heatmap_png_is_written(tmp_path):
    path = save_heatmap(torch.eye(3), ["a", "b", "c"], str(tmp_path / "affinity.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
