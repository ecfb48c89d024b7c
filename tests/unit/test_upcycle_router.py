"""DUME's ridge router: the closed-form solve, merging and adding experts, routing of separable groups.

    .venv/bin/python -m pytest tests/unit/test_upcycle_router.py -q
"""

import pytest
import torch

from dume_ray.upcycle.router import (add_expert, finetune_router, group_stats, merge_stats, solve_router, stats_from_groups,
                                    with_bias)


def _groups(seed=0, n=200, h=6, num_groups=3, spread=0.3):
    """Per group, one layer of inputs around a well-separated centre."""
    gen = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.eye(num_groups, h)
    return [centres[g] + spread * torch.randn(n, h, generator=gen) for g in range(num_groups)]


def test_ridge_solve_equals_least_squares_reference():
    inputs = _groups(spread=1.0)
    stats = merge_stats([group_stats([x], g, len(inputs)) for g, x in enumerate(inputs)])
    lam = 0.5
    weights = solve_router(stats, ridge_lambda=lam)[0].double()
    # Reference: least squares on the augmented system [X; sqrt(lam) I] W = [Y; 0].
    x = with_bias(torch.cat(inputs).double())
    y = torch.cat([torch.nn.functional.one_hot(torch.full((len(xg),), g), len(inputs)) for g, xg in enumerate(inputs)]).double()
    x_aug = torch.cat([x, lam ** 0.5 * torch.eye(x.shape[1], dtype=torch.float64)])
    y_aug = torch.cat([y, torch.zeros(x.shape[1], len(inputs), dtype=torch.float64)])
    reference = torch.linalg.lstsq(x_aug, y_aug).solution
    assert torch.allclose(weights, reference, atol=1e-5)


def test_adding_an_expert_gives_the_batch_solution():
    inputs = _groups(num_groups=4)
    batch = merge_stats([group_stats([x], g, 4) for g, x in enumerate(inputs)])
    first_three = merge_stats([group_stats([x], g, 3) for g, x in enumerate(inputs[:3])])
    grown = add_expert(first_three, group_stats([inputs[3]], 3, 4))
    assert torch.allclose(solve_router(grown), solve_router(batch), atol=1e-6)
    assert grown.tokens == batch.tokens


@pytest.mark.parametrize("normalize", [False, True])
def test_separable_groups_are_routed_to_their_own_expert(normalize):
    inputs = _groups(seed=1)
    weights = solve_router(merge_stats([group_stats([x], g, 3) for g, x in enumerate(inputs)]),
                           normalize_columns=normalize)[0]
    for g, x in enumerate(_groups(seed=2)):  # fresh tokens from the same groups
        assert bool(((with_bias(x) @ weights).argmax(-1) == g).all())


def test_normalized_columns_have_unit_weight_part():
    inputs = _groups()
    weights = solve_router(merge_stats([group_stats([x], g, 3) for g, x in enumerate(inputs)]), normalize_columns=True)
    assert torch.allclose(weights[0, :-1].norm(dim=0), torch.ones(3), atol=1e-5)


def test_negative_lambda_and_empty_group_are_rejected():
    stats = group_stats([torch.randn(5, 4)], 0, 2)
    with pytest.raises(ValueError, match="ridge_lambda"):
        solve_router(stats, ridge_lambda=-1.0)
    with pytest.raises(ValueError, match=r"no tokens for expert\(s\) \[1\]"):
        solve_router(stats)


def test_dume_plus_refines_the_ridge_router_on_the_routing_objective():
    inputs = _groups(spread=2.5)  # overlapping groups: the ridge router misroutes some tokens
    weights = solve_router(merge_stats([group_stats([x], g, 3) for g, x in enumerate(inputs)]))
    refined, losses = finetune_router(weights, [[x] for x in inputs], steps=50, lr=0.05)
    assert refined.shape == weights.shape and losses[-1] < losses[0]
    labels = torch.cat([torch.full((len(x),), g) for g, x in enumerate(inputs)])
    x = with_bias(torch.cat(inputs))

    def accuracy(w):
        return float(((x @ w[0]).argmax(-1) == labels).float().mean())

    assert accuracy(refined) >= accuracy(weights)


@pytest.mark.parametrize("normalize", [False, True])
def test_statistics_stored_per_group_and_grown_expert_by_expert_equal_a_full_refit(normalize):
    """What `run_upcycle` does when a task is added to a finished run: each group's (gram, column, tokens) as
    stored, the router grown with `add_expert`, equals the solve from statistics gathered all at once (1e-5)."""
    torch.manual_seed(0)
    layers = [[torch.randn(40 + 7 * g, 6) + g for _ in range(3)] for g in range(4)]  # 4 groups x 3 layers of [n, h]
    full = merge_stats([group_stats(x, g, 4) for g, x in enumerate(layers)])
    stored = []
    for g, x in enumerate(layers):  # gathered as the stage gathers them: group g of 4, keep its own column
        s = group_stats(x, g, 4)
        stored.append((s.gram, s.cross[..., g], s.tokens[g]))
    grown = stats_from_groups(stored)
    assert grown.tokens == full.tokens
    assert torch.allclose(solve_router(grown, 1e-2, normalize), solve_router(full, 1e-2, normalize), atol=1e-5)
    three = stats_from_groups(stored[:3])  # the run before the fourth task: its router is the 3-group solve
    assert torch.allclose(solve_router(three, 1e-2, normalize),
                          solve_router(merge_stats([group_stats(x, g, 3) for g, x in enumerate(layers[:3])]), 1e-2,
                                       normalize), atol=1e-5)
