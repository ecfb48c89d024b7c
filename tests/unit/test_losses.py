"""Hand-checkable identities of the top-k + tail distillation losses (CPU only).

Run: cd /work/main && .venv/bin/python -m pytest tests/unit/test_losses.py -q
"""

import math

import pytest
import torch

from dume_ray.distill.losses import (
    annealed_alpha,
    cross_entropy,
    distill_objective,
    forward_kl,
    generalized_jsd,
    kd_loss,
    reverse_kl,
    student_bucket_logprobs,
    teacher_bucket_logprobs,
)

N, V, K = 6, 11, 4


def _teacher_targets(gen, n=N, vocab=V, k=K, scale=2.0):
    """Top-k targets from a random teacher; returns (full logp [n,V], ids, topk logp, tail)."""
    logp = torch.log_softmax(torch.randn(n, vocab, generator=gen) * scale, dim=-1)  # [n, V]
    topk_logp, ids = torch.topk(logp, k, dim=-1)  # [n, k]
    if k == vocab:
        tail = torch.full((n,), float("-inf"))
    else:
        rest = logp.scatter(-1, ids, float("-inf"))  # [n, V]
        tail = torch.logsumexp(rest, dim=-1)  # [n]
    return logp, ids, topk_logp, tail


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _random_logp(gen, n=N, m=K + 1):
    return torch.log_softmax(torch.randn(n, m, generator=gen) * 2, dim=-1)


# ---------------------------------------------------------------- divergences


@pytest.mark.parametrize(
    "div", [forward_kl, reverse_kl, generalized_jsd, lambda t, s: generalized_jsd(t, s, 0.3)]
)
def test_divergence_of_distribution_with_itself_is_zero(gen, div):
    p = _random_logp(gen)
    p[0, -1] = float("-inf")  # a zero-probability bucket must not produce NaN
    p = torch.log_softmax(p, dim=-1)
    assert torch.allclose(div(p, p), torch.zeros(N), atol=1e-6)


def test_jsd_at_beta_0_and_1_equals_forward_and_reverse_kl(gen):
    t, s = _random_logp(gen), _random_logp(gen)
    assert torch.equal(generalized_jsd(t, s, beta=0.0), forward_kl(t, s))
    assert torch.equal(generalized_jsd(t, s, beta=1.0), reverse_kl(t, s))


def test_jsd_is_symmetric_at_beta_half(gen):
    t, s = _random_logp(gen), _random_logp(gen)
    assert torch.allclose(generalized_jsd(t, s, 0.5), generalized_jsd(s, t, 0.5), atol=1e-6)


def test_jsd_matches_definition_with_explicit_mixture(gen):
    t, s = _random_logp(gen), _random_logp(gen)
    beta = 0.3
    pt, ps = t.exp(), s.exp()
    m = beta * pt + (1 - beta) * ps
    expected = beta * (pt * (t - m.log())).sum(-1) + (1 - beta) * (ps * (s - m.log())).sum(-1)
    assert torch.allclose(generalized_jsd(t, s, beta), expected, atol=1e-6)


def test_reverse_kl_is_forward_kl_with_arguments_swapped(gen):
    t, s = _random_logp(gen), _random_logp(gen)
    assert torch.allclose(reverse_kl(t, s), forward_kl(s, t))


# ---------------------------------------------------------------- buckets


def test_student_bucket_rows_logsumexp_to_zero(gen):
    logits = torch.randn(N, V, generator=gen) * 3
    _, ids, _, _ = _teacher_targets(gen)
    for temp in (0.5, 1.0, 2.0):
        b = student_bucket_logprobs(logits, ids, temp)
        assert b.shape == (N, K + 1)
        assert torch.allclose(torch.logsumexp(b, -1), torch.zeros(N), atol=1e-5)


def test_student_tail_is_neg_inf_when_k_equals_vocab(gen):
    logits = torch.randn(N, V, generator=gen)
    _, ids, _, _ = _teacher_targets(gen, k=V)
    b = student_bucket_logprobs(logits, ids, 1.0)
    assert torch.isneginf(b[:, -1]).all()


@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0, 4.0])
def test_teacher_bucket_rows_logsumexp_to_zero(gen, temp):
    _, _, topk_logp, tail = _teacher_targets(gen)
    b = teacher_bucket_logprobs(topk_logp, tail, temp, V)
    assert torch.allclose(torch.logsumexp(b, -1), torch.zeros(N), atol=1e-5)


def test_teacher_bucket_at_t1_is_exact_concatenation_upcast_from_float16(gen):
    _, _, topk_logp, tail = _teacher_targets(gen)
    half = topk_logp.half()
    b = teacher_bucket_logprobs(half, tail, 1.0, V)
    assert b.dtype == torch.float32
    assert torch.equal(b, torch.cat([half.float(), tail[:, None]], -1))


def test_teacher_bucket_with_k_equal_vocab_keeps_tail_neg_inf_without_nan(gen):
    logp, _, topk_logp, tail = _teacher_targets(gen, k=V)
    for temp in (0.5, 2.0):
        b = teacher_bucket_logprobs(topk_logp, tail, temp, V)
        assert not torch.isnan(b).any()
        assert torch.isneginf(b[:, -1]).all()
        # Tempering is exact here: matches log_softmax(logp / T) on sorted tokens.
        expected = torch.log_softmax(topk_logp / temp, -1)
        assert torch.allclose(b[:, :-1], expected, atol=1e-5)


def test_teacher_bucket_tempering_matches_uniform_tail_by_hand():
    # Two kept tokens and a tail spread uniformly over 2 tokens: tempering the
    # explicit 4-token distribution must give the same buckets.
    p = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
    logp = p.log()
    tail = torch.log(torch.tensor([0.2]))
    b = teacher_bucket_logprobs(logp[:, :2], tail, 2.0, vocab_size=4)
    tempered = torch.softmax(logp / 2.0, -1)  # [1, 4]
    expected = torch.cat([tempered[:, :2], tempered[:, 2:].sum(-1, keepdim=True)], -1).log()
    assert torch.allclose(b, expected, atol=1e-6)


# ---------------------------------------------------------------- kd_loss


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_kd_loss_with_k_equal_vocab_equals_full_vocab_kl_times_t_squared(gen, temp):
    t_logp, ids, topk_logp, tail = _teacher_targets(gen, k=V)
    logits = torch.randn(N, V, generator=gen) * 2
    loss = kd_loss(logits, ids, topk_logp, tail, temp)
    teacher_t = torch.log_softmax(t_logp / temp, -1)
    student_t = torch.log_softmax(logits / temp, -1)
    expected = (teacher_t.exp() * (teacher_t - student_t)).sum(-1).mean() * temp**2
    assert torch.allclose(loss, expected, atol=1e-5)


def test_kd_loss_at_t1_equals_hand_computed_bucket_kl(gen):
    t_logp, ids, topk_logp, tail = _teacher_targets(gen)
    logits = torch.randn(N, V, generator=gen)
    s_p = torch.softmax(logits, -1)  # [n, V]
    t_p = t_logp.exp()
    s_top = s_p.gather(-1, ids)
    t_top = t_p.gather(-1, ids)
    p = torch.cat([t_top, 1 - t_top.sum(-1, keepdim=True)], -1)  # [n, k+1]
    q = torch.cat([s_top, 1 - s_top.sum(-1, keepdim=True)], -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    loss = kd_loss(logits, ids, topk_logp, tail, 1.0)
    assert torch.allclose(loss, expected, atol=1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "generalized_jsd"])
def test_kd_loss_ignores_masked_rows(gen, divergence):
    _, ids, topk_logp, tail = _teacher_targets(gen)
    logits = torch.randn(N, V, generator=gen)
    mask = torch.tensor([True, False, True, True, False, True])
    before = kd_loss(logits, ids, topk_logp, tail, 2.0, divergence, mask=mask)
    changed = logits.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), V, generator=gen) * 10
    changed[1, 0] = float("nan")  # even garbage in a masked row must not leak
    after = kd_loss(changed, ids, topk_logp, tail, 2.0, divergence, mask=mask)
    assert torch.equal(before, after)
    only_kept = kd_loss(logits[mask], ids[mask], topk_logp[mask], tail[mask], 2.0, divergence)
    assert torch.allclose(before, only_kept)


def test_kd_loss_all_masked_is_zero_and_backward_works(gen):
    _, ids, topk_logp, tail = _teacher_targets(gen)
    logits = torch.randn(N, V, generator=gen, requires_grad=True)
    loss = kd_loss(logits, ids, topk_logp, tail, 2.0, mask=torch.zeros(N, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(N, V))


def test_kd_loss_empty_input_is_zero():
    loss = kd_loss(
        torch.zeros(0, V), torch.zeros(0, K, dtype=torch.long), torch.zeros(0, K),
        torch.zeros(0), 1.0,
    )
    assert loss.item() == 0.0


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "generalized_jsd"])
@pytest.mark.parametrize("k", [K, V])
def test_kd_loss_gradients_are_finite(gen, divergence, k):
    _, ids, topk_logp, tail = _teacher_targets(gen, k=k)
    logits = (torch.randn(N, V, generator=gen) * 5).requires_grad_()
    kd_loss(logits, ids, topk_logp.half(), tail, 2.0, divergence).backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_kd_loss_rejects_out_of_range_id(gen):
    _, ids, topk_logp, tail = _teacher_targets(gen)
    ids = ids.clone()
    ids[2, 1] = V + 5
    with pytest.raises(ValueError, match=str(V + 5)):
        kd_loss(torch.randn(N, V), ids, topk_logp, tail, 1.0)


@pytest.mark.parametrize("temp", [0.0, -1.0])
def test_bad_temperature_raises_value_error_naming_it(gen, temp):
    _, ids, topk_logp, tail = _teacher_targets(gen)
    with pytest.raises(ValueError, match=f"temperature={temp}"):
        kd_loss(torch.randn(N, V), ids, topk_logp, tail, temp)


def test_bad_divergence_raises_value_error_naming_it(gen):
    _, ids, topk_logp, tail = _teacher_targets(gen)
    with pytest.raises(ValueError, match="'js_typo'"):
        kd_loss(torch.randn(N, V), ids, topk_logp, tail, 1.0, divergence="js_typo")


# ---------------------------------------------------------------- CE + objective


def test_cross_entropy_matches_torch_on_kept_rows_and_is_zero_when_none(gen):
    logits = torch.randn(N, V, generator=gen)
    targets = torch.randint(0, V, (N,), generator=gen)
    mask = torch.tensor([True, True, False, True, False, False])
    expected = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    assert torch.allclose(cross_entropy(logits, targets, mask), expected)
    assert cross_entropy(logits, targets, torch.zeros(N, dtype=torch.bool)).item() == 0.0


def test_distill_objective_alpha_0_is_cross_entropy_and_alpha_1_is_kd(gen):
    _, ids, topk_logp, tail = _teacher_targets(gen)
    logits = torch.randn(N, V, generator=gen)
    targets = torch.randint(0, V, (N,), generator=gen)
    ce = cross_entropy(logits, targets)
    kd = kd_loss(logits, ids, topk_logp, tail, 2.0)

    out0 = distill_objective(logits, targets, ids, topk_logp, tail, alpha=0.0, temperature=2.0)
    assert torch.equal(out0["loss"], ce)
    assert out0["kd_loss"].item() == 0.0  # skipped
    out1 = distill_objective(logits, targets, ids, topk_logp, tail, alpha=1.0, temperature=2.0)
    assert torch.equal(out1["loss"], kd)
    assert out1["ce_loss"].item() == 0.0  # skipped
    mid = distill_objective(logits, targets, ids, topk_logp, tail, alpha=0.25, temperature=2.0)
    assert torch.allclose(mid["loss"], 0.25 * kd + 0.75 * ce)


def test_distill_objective_alpha_0_needs_no_soft_targets(gen):
    logits = torch.randn(N, V, generator=gen)
    targets = torch.randint(0, V, (N,), generator=gen)
    out = distill_objective(logits, targets, None, None, None, alpha=0.0, temperature=1.0)
    assert torch.equal(out["loss"], cross_entropy(logits, targets))


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_bad_alpha_raises_value_error_naming_it(gen, alpha):
    _, ids, topk_logp, tail = _teacher_targets(gen)
    with pytest.raises(ValueError, match=f"alpha={alpha}"):
        distill_objective(
            torch.randn(N, V), torch.zeros(N, dtype=torch.long), ids, topk_logp, tail,
            alpha=alpha, temperature=1.0,
        )


# ---------------------------------------------------------------- annealing


def test_annealed_alpha_decays_linearly_from_alpha_to_zero():
    assert annealed_alpha(0.8, 0, 11, anneal=True) == 0.8
    assert math.isclose(annealed_alpha(0.8, 5, 11, anneal=True), 0.4)
    assert annealed_alpha(0.8, 10, 11, anneal=True) == 0.0
    assert annealed_alpha(0.8, 50, 11, anneal=True) == 0.0  # clamped past the end


def test_annealed_alpha_without_anneal_is_constant():
    assert all(annealed_alpha(0.7, s, 10, anneal=False) == 0.7 for s in range(10))
