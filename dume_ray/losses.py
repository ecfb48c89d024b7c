"""Knowledge-distillation losses on top-k teacher soft targets.

The teacher's full next-token distribution is too large to store for every
response token, so the soft-target pipeline keeps, per token, the teacher's k
most likely token ids S, their log-probs at temperature 1 (float16) and the
log of the probability mass left outside S (the "tail"). Notation below:
z_t, z_s teacher/student logits, p_T = softmax(z_t / T), q_T = softmax(z_s / T),
w_T = p_T(V \ S) the teacher's tempered tail mass, p̂_T = p_T restricted to S and
renormalised (likewise q̂_T), and δ = z_s - z_t with range R = max δ - min δ
over the whole vocabulary (a per-row constant shift of either model's logits
does not change R).

What is compared, by temperature
--------------------------------
T == 1: the (k+1)-bucket distributions, the k kept tokens plus one tail
    bucket: teacher ``cat(topk_logprobs, tail_logmass)`` exactly as stored (no
    renormalisation, so the stored targets are used bit for bit), student
    ``log_softmax(z_s)`` at S plus its exact log-mass outside S.

T != 1: the tempered distributions restricted to S and renormalised, for both
    models: teacher ``log_softmax(topk_logprobs / T)`` over the k entries
    (= p̂_T exactly, since p_T(i) ∝ p_1(i)^(1/T)), student
    ``log_softmax(z_s[S] / T)`` over the same k entries (= q̂_T). The tail
    bucket is returned as -inf on both sides, i.e. dropped.

Why the tail is dropped at T != 1: the teacher's tempered tail mass is
sum_{j∉S} p_1(j)^(1/T) / Z, which depends on how the stored tail mass is split
among the V - k tail tokens, not only on its sum. For a fixed tail mass m it
ranges from m^(1/T) (all on one token) to (V-k)^(1-1/T) m^(1/T) (uniform), a
factor ≈ 46 apart at V = 87, k = 8, T = 8. The previous version assumed a uniform
tail for the teacher while using the student's true tail, so a student equal
to its teacher got KD loss 0.279 instead of 0 on the demo (V = 87, k = 8,
T = 8). Storing what exact tempering needs (sum p^(1/T) over the tail) would
need one number per temperature, and the search samples T from a continuous
range after the targets are written, so it is not stored. Renormalising both
sides over S treats teacher and student identically.

Properties (all tested in tests/unit/test_losses.py)
----------------------------------------------------
* Student == teacher gives loss 0 for every T, divergence, alpha and k, up to
  the float16 rounding of the stored log-probs (asserted ≤ 1e-4, measured
  ≤ 6e-6; at T != 1 both sides are normalised over the same support, so the
  rounding enters only at second order).
* Adaptive-k targets (a variable number kept per token, padded to a fixed
  width with log-prob -inf and a repeated id by ``data.soft_targets.pad_top_k``):
  padded entries are dropped on both sides, so a row is the loss of its kept
  tokens + tail alone; student == teacher is still 0 at every T.
* k == V: the tail is empty (-inf) and the loss is the full-vocabulary loss
  at every T.
* Lower bounds (chain rule / data processing): at T == 1 the bucket
  divergence is ≤ the full-vocabulary one for all three divergences; at
  T != 1, (1 - w_T) · L_T ≤ L_full for forward KL (for reverse KL with the
  student's tempered tail mass in place of w_T).
* Two-sided bound (proved for forward KL; for reverse KL with the student's
  tempered tail mass in place of w_T), with L = T² · divergence:

      T == 1:   0 ≤ L_full - L ≤ w_1 · R² / 8
      any T:    |L_full - L| ≤ ½ · w_T · R² · e^(R/T)

  Proof sketch: q_T is p_T tilted by u = δ/T, so KL(p_T‖q_T) = f(p_T) with
  f(P) = log E_P e^u - E_P u, and KL(p̂_T‖q̂_T) = f(p̂_T). At T == 1 the
  difference is w_1 · f(p̌_1) (chain rule; p̌ = the renormalised tail), and
  Hoeffding's lemma gives f ≤ R²/8. For any T write p_T = (1-w) p̂ + w p̌ and
  differentiate f along P_t = (1-t) p̂ + t p̌: df/dt = E_p̌ φ - E_p̂ φ with
  φ = e^u / E_{P_t} e^u - u; shifting u so that E_{P_t} e^u = 1 puts 0 inside
  the range of u, so 0 ≤ φ - 1 ≤ (R/T)² e^(R/T) / 2; integrate over [0, w_T] and
  multiply by T².
  Measured on the test's cases (V = 87, Gaussian and Zipf teachers, students
  z_t + N(0, σ²) with σ ∈ {0.1, 0.3, 1}, k ∈ {8, 32}, T ∈ {1, 2, 8}, exact
  float32 targets), the largest per-row error is 0.10 of the any-T bound
  (0.43 of the T == 1 one) for forward/reverse KL, and 0.03 of the any-T bound
  for generalized JSD (β ∈ {0.2, 0.5}, with w = max(teacher, student tempered
  tail mass); this one is measured, not proved). The test asserts the bounds.
  The bound is loose when the student is far from the teacher (large R); it
  says the error vanishes with the tempered tail mass, not that it is small
  in absolute terms for a random student.
* float16 storage of the teacher's top-k log-probs (relative rounding
  ≤ 2^-11) is a separate, pre-existing error: on the same cases it moves a row's
  loss by at most 9.1e-4 (largest for students far from the teacher).

Caveats of the choice:
* The loss is discontinuous at T = 1: at T == 1 the tail bucket (the
  student's mass outside S) is penalised, at any T != 1 it is not, so the KD
  term alone gives no pressure on the student's tail mass there (the CE term
  with alpha < 1 still does). The T == 1 treatment is kept as it was so that
  results measured at T = 1 stay valid.
* With k == 1 and T != 1 the renormalised support has a single token, so the
  KD term is identically 0 (no signal); use k ≥ 2 with T != 1.

Everything is pure torch (no Ray), so it runs inside any training worker. It sits below the stages
(next to model.py and training.py, which builds its steps on it): the distill workers, the search proxy and
the affinity search all reach it through `training` or directly, never through a stage package.
Test with:

    .venv/bin/python -m pytest tests/unit/test_losses.py -q
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "generalized_jsd")

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------
# Bucket distributions
# --------------------------------------------------------------------------


def teacher_bucket_logprobs(
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    temperature: float,
    vocab_size: int,
) -> Tensor:
    """Teacher log-probs at temperature T over the k kept tokens plus the tail.

    At T == 1 this is exactly ``cat(topk_logprobs, tail_logmass)`` (no
    renormalisation, so stored targets are used bit for bit).

    At T != 1 it is ``log_softmax(topk_logprobs / T)`` over the k kept tokens,
    i.e. the teacher's tempered distribution restricted to its top k and
    renormalised, followed by a -inf tail bucket: the tempered tail mass
    cannot be recovered from the stored T=1 tail mass (see the module
    docstring). ``student_bucket_logprobs`` does the same for the student, so
    the two are compared on the same support at every T.

    Args:
        topk_logprobs: Teacher log-probs of its top-k tokens at T=1, [n, k].
            float16 input is upcast to float32.
        tail_logmass: Log of the teacher's mass outside the top k at T=1, [n];
            -inf when k == vocab_size. Only used at T == 1.
        temperature: Softmax temperature T > 0.
        vocab_size: Vocabulary size V (>= k).

    Returns:
        Float32 log-probs over the k+1 buckets, [n, k+1]; each row
        logsumexps to 0 (up to the precision of the stored targets at T=1).
        At T != 1 the last column is -inf.

    Raises:
        ValueError: If temperature <= 0 or vocab_size < k.
    """
    _check_temperature(temperature)
    topk = topk_logprobs.float()  # [n, k]
    tail = tail_logmass.float()  # [n]
    k = topk.shape[-1]
    if vocab_size < k:
        raise ValueError(f"vocab_size {vocab_size} is smaller than top_k {k}")

    if temperature == 1.0:
        return torch.cat([topk, tail.unsqueeze(-1)], dim=-1)  # [n, k+1]

    top = torch.log_softmax(topk / temperature, dim=-1)  # [n, k]
    return torch.cat([top, torch.full_like(tail, _NEG_INF).unsqueeze(-1)], dim=-1)  # [n, k+1]


def student_bucket_logprobs(
    student_logits: Tensor, topk_ids: Tensor, temperature: float, kept: Optional[Tensor] = None
) -> Tensor:
    """Student log-probs at temperature T over the teacher's top-k tokens + tail.

    Args:
        student_logits: Student logits, [n, V]. Upcast to float32 because the
            tail bucket sums many small probabilities that bf16 would round.
        topk_ids: The teacher's top-k token ids, [n, k], distinct per row.
        temperature: Softmax temperature T > 0.
        kept: Optional bool [n, k]; False marks padding of an adaptive-k
            shard (its id repeats one kept at the position), whose entry is
            set to -inf (at T != 1 before renormalising, so the repeated id is
            not counted twice). None = all kept.

    Returns:
        Float32 log-probs, [n, k+1]. At T == 1: ``log_softmax(logits)``
        gathered at the k ids, then the log of the mass on all other tokens
        (-inf when k == V). At T != 1: ``log_softmax(logits[ids] / T)`` over
        the k ids (the tempered distribution restricted to the teacher's top k
        and renormalised), then a constant -inf tail bucket, matching
        ``teacher_bucket_logprobs``.
    """
    _check_temperature(temperature)
    ids = topk_ids.long()  # [n, k]
    if temperature != 1.0:
        gathered = student_logits.float().gather(-1, ids)  # [n, k]
        if kept is not None:
            gathered = gathered.masked_fill(~kept, _NEG_INF)
        top = torch.log_softmax(gathered / temperature, dim=-1)  # [n, k]
        return torch.cat([top, top.new_full((top.shape[0], 1), _NEG_INF)], dim=-1)  # [n, k+1]

    logp = torch.log_softmax(student_logits.float(), dim=-1)  # [n, V]
    top = logp.gather(-1, ids)  # [n, k]
    if kept is not None:
        top = top.masked_fill(~kept, _NEG_INF)
    n, vocab = logp.shape
    if ids.shape[-1] >= vocab and (kept is None or bool(kept.all())):
        # Nothing is left outside the top k. Skipping logsumexp over an all
        # -inf row also avoids its NaN backward (exp(-inf - -inf)).
        tail = logp.new_full((n,), _NEG_INF)  # [n]
    else:
        # Exact logsumexp over the non-top-k tokens; log1p(-sum(p_topk))
        # would cancel catastrophically when the top k hold almost all mass.
        # Padding repeats a kept id, so a padded row of width >= V still has
        # tokens outside; a row with none gets a constant dummy, then -inf.
        in_topk = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, ids, True)  # [n, V]
        outside = ~in_topk.all(dim=-1)  # [n]
        masked = logp.masked_fill(in_topk, _NEG_INF)  # [n, V]
        if not bool(outside.all()):
            dummy = ~outside.unsqueeze(-1) & (torch.arange(vocab, device=logp.device) == 0)  # [n, V]
            masked = masked.masked_fill(dummy, 0.0)
        tail = torch.where(outside, torch.logsumexp(masked, dim=-1), logp.new_full((n,), _NEG_INF))  # [n]
    return torch.cat([top, tail.unsqueeze(-1)], dim=-1)  # [n, k+1]


# --------------------------------------------------------------------------
# Divergences between two log-prob tensors over the same buckets
# --------------------------------------------------------------------------


def _kl(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """KL(p‖q) per row, [n, m] x [n, m] -> [n], with 0·log 0 = 0.

    Buckets where p is -inf are replaced by zeros *before* any arithmetic:
    masking only the result with torch.where would still back-propagate
    0 * NaN = NaN through the discarded branch (-inf - -inf).
    """
    support = p_logp > _NEG_INF  # [n, m]
    p_safe = torch.where(support, p_logp, torch.zeros_like(p_logp))
    q_safe = torch.where(support, q_logp, torch.zeros_like(q_logp))
    terms = torch.where(
        support, p_safe.exp() * (p_safe - q_safe), torch.zeros_like(p_safe)
    )  # [n, m]
    return terms.sum(dim=-1)


def forward_kl(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    """KL(teacher‖student) = sum_i p_i (log p_i - log q_i) per row.

    Args:
        teacher_logp: Teacher log-probs, [n, m].
        student_logp: Student log-probs, [n, m].

    Returns:
        Per-row divergence, [n]. Buckets with teacher -inf contribute 0.
    """
    return _kl(teacher_logp, student_logp)


def reverse_kl(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    """KL(student‖teacher) = sum_i q_i (log q_i - log p_i) per row.

    Args:
        teacher_logp: Teacher log-probs, [n, m].
        student_logp: Student log-probs, [n, m].

    Returns:
        Per-row divergence, [n]. Buckets with student -inf contribute 0.
    """
    return _kl(student_logp, teacher_logp)


def generalized_jsd(
    teacher_logp: Tensor, student_logp: Tensor, beta: float = 0.5
) -> Tensor:
    """Generalized Jensen-Shannon divergence of GKD, per row.

    From Agarwal et al. 2024, "On-Policy Distillation of Language Models:
    Learning from Self-Generated Mistakes" (GKD), as implemented in TRL's
    ``GKDTrainer.generalized_jsd_loss``: with the mixture
    ``m = beta * p_teacher + (1 - beta) * p_student``,

        JSD(beta) = beta * KL(teacher‖m) + (1 - beta) * KL(student‖m).

    The endpoints are defined (as in TRL) rather than taken from the formula,
    which would give 0 there: beta == 0 returns exactly forward KL
    (teacher‖student) and beta == 1 exactly reverse KL (student‖teacher).
    At beta == 0.5 the divergence is symmetric in its arguments.

    Args:
        teacher_logp: Teacher log-probs, [n, m].
        student_logp: Student log-probs, [n, m].
        beta: Mixture weight on the teacher, in [0, 1].

    Returns:
        Per-row divergence, [n].

    Raises:
        ValueError: If beta is outside [0, 1].
    """
    _check_beta(beta)
    if beta == 0.0:
        return forward_kl(teacher_logp, student_logp)
    if beta == 1.0:
        return reverse_kl(teacher_logp, student_logp)
    # Zero out buckets where both sides are -inf before logaddexp, whose
    # backward is NaN there; one-sided -inf is fine and kept.
    either = (teacher_logp > _NEG_INF) | (student_logp > _NEG_INF)  # [n, m]
    t_safe = torch.where(either, teacher_logp, torch.zeros_like(teacher_logp))
    s_safe = torch.where(either, student_logp, torch.zeros_like(student_logp))
    mixture = torch.logaddexp(
        t_safe + math.log(beta), s_safe + math.log(1.0 - beta)
    )  # [n, m]
    mixture = torch.where(either, mixture, torch.full_like(mixture, _NEG_INF))
    return beta * _kl(teacher_logp, mixture) + (1.0 - beta) * _kl(student_logp, mixture)


# --------------------------------------------------------------------------
# Losses used by the trainer
# --------------------------------------------------------------------------


def kd_loss(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    temperature: float,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Distillation loss: T² · mean over kept rows of D(teacher_T, student_T).

    D is taken over the (k+1) buckets of ``teacher_bucket_logprobs`` and
    ``student_bucket_logprobs``: at T == 1 the top k plus the tail bucket, at
    T != 1 the top k only, both models tempered and renormalised there (see
    the module docstring for why, and for the bound against the
    full-vocabulary loss). A student equal to its teacher gets 0 at every T.

    The T² factor (Hinton et al. 2015) keeps gradient magnitudes comparable
    across temperatures, so alpha means the same thing at every T.

    Args:
        student_logits: Student logits at the response positions, [n, V].
        topk_ids: Teacher top-k token ids, [n, k].
        topk_logprobs: Teacher top-k log-probs at T=1, [n, k] (float16 ok).
            -inf marks padding (adaptive-k shards, ``pad_top_k``): that
            entry is dropped on both sides; each row needs one finite entry.
        tail_logmass: Teacher log tail mass at T=1, [n].
        temperature: Softmax temperature T > 0 applied to both models.
        divergence: One of "forward_kl", "reverse_kl", "generalized_jsd".
        jsd_beta: beta of generalized_jsd (ignored otherwise).
        mask: Optional bool [n]; True marks rows that count. Rows with False
            are dropped before any computation, so padding garbage in them
            cannot leak NaNs into the loss.

    Returns:
        Scalar float32 loss. If no row counts (empty input or all masked)
        returns exactly 0.0, still attached to student_logits' graph so
        ``backward()`` works uniformly across ranks/micro-batches.

    Raises:
        ValueError: On temperature <= 0, an unknown divergence, a bad
            jsd_beta, mismatched shapes, or a top-k id outside [0, V).
    """
    _check_kd_args(temperature, divergence, jsd_beta)
    n, vocab = student_logits.shape
    if topk_ids.shape != topk_logprobs.shape or topk_ids.shape[0] != n:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs "
            f"{tuple(topk_logprobs.shape)} must both be [n={n}, k]"
        )
    if tail_logmass.shape != (n,):
        raise ValueError(f"tail_logmass shape {tuple(tail_logmass.shape)} must be [n={n}]")

    if mask is not None:
        keep = _as_row_mask(mask, n)  # [n]
        student_logits = student_logits[keep]
        topk_ids = topk_ids[keep]
        topk_logprobs = topk_logprobs[keep]
        tail_logmass = tail_logmass[keep]
    if student_logits.shape[0] == 0:
        return _zero_with_graph(student_logits)

    # An out-of-range id would otherwise be a silent CUDA gather error.
    max_id, min_id = int(topk_ids.max()), int(topk_ids.min())
    if max_id >= vocab:
        raise ValueError(f"topk_ids has id {max_id} >= vocab_size {vocab}")
    if min_id < 0:
        raise ValueError(f"topk_ids has negative id {min_id}")

    padded = topk_logprobs == _NEG_INF  # [n, k]: adaptive-k padding
    kept = ~padded if bool(padded.any()) else None
    teacher = teacher_bucket_logprobs(topk_logprobs, tail_logmass, temperature, vocab)  # [n, k+1]
    student = student_bucket_logprobs(student_logits, topk_ids, temperature, kept)  # [n, k+1]
    per_row = _divergence_fn(divergence, jsd_beta)(teacher, student)  # [n]
    return temperature**2 * per_row.mean()


def cross_entropy(
    student_logits: Tensor, target_ids: Tensor, mask: Optional[Tensor] = None
) -> Tensor:
    """Mean token cross-entropy over kept rows.

    Args:
        student_logits: Student logits, [n, V] (upcast to float32).
        target_ids: Gold token ids, [n]. Ids equal to -100 (the PyTorch
            ignore_index convention) are treated as masked.
        mask: Optional bool [n]; True marks rows that count.

    Returns:
        Scalar float32 loss; exactly 0.0 (attached to the graph) when no row
        counts, instead of PyTorch's NaN.
    """
    n = student_logits.shape[0]
    if target_ids.shape != (n,):
        raise ValueError(f"target_ids shape {tuple(target_ids.shape)} must be [n={n}]")
    keep = target_ids != -100  # [n]
    if mask is not None:
        keep = keep & _as_row_mask(mask, n)
    logits = student_logits[keep]
    if logits.shape[0] == 0:
        return _zero_with_graph(student_logits)
    return F.cross_entropy(logits.float(), target_ids[keep].long())


def distill_objective(
    student_logits: Tensor,
    target_ids: Optional[Tensor],
    topk_ids: Optional[Tensor],
    topk_logprobs: Optional[Tensor],
    tail_logmass: Optional[Tensor],
    alpha: float,
    temperature: float,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    mask: Optional[Tensor] = None,
) -> Dict[str, Tensor]:
    """Training objective ``alpha * kd + (1 - alpha) * ce``.

    alpha == 0 skips the KD term entirely (the multitask baseline needs no
    soft targets; topk_* may be None) and alpha == 1 skips CE (target_ids may
    be None). temperature/divergence are validated even when unused so a
    misconfigured run fails at its first step, not when alpha changes.

    Args:
        student_logits: Student logits at response positions, [n, V].
        target_ids: Gold next-token ids, [n].
        topk_ids: Teacher top-k ids, [n, k].
        topk_logprobs: Teacher top-k log-probs at T=1, [n, k].
        tail_logmass: Teacher log tail mass at T=1, [n].
        alpha: Weight on the KD term, in [0, 1].
        temperature: KD temperature (> 0).
        divergence: See kd_loss.
        jsd_beta: See kd_loss.
        mask: Optional bool [n] of rows that count, applied to both terms.

    Returns:
        {"loss": differentiable scalar, "kd_loss": detached scalar,
        "ce_loss": detached scalar}; a skipped term is reported as 0.0.

    Raises:
        ValueError: If alpha is outside [0, 1], or as kd_loss.
    """
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got alpha={alpha!r}")
    _check_kd_args(temperature, divergence, jsd_beta)
    zero = torch.zeros((), dtype=torch.float32, device=student_logits.device)

    kd = None
    if alpha > 0.0:
        if topk_ids is None or topk_logprobs is None or tail_logmass is None:
            raise ValueError(f"alpha={alpha!r} > 0 needs topk_ids, topk_logprobs and tail_logmass")
        kd = kd_loss(
            student_logits, topk_ids, topk_logprobs, tail_logmass,
            temperature, divergence, jsd_beta, mask,
        )
    ce = None
    if alpha < 1.0:
        if target_ids is None:
            raise ValueError(f"alpha={alpha!r} < 1 needs target_ids")
        ce = cross_entropy(student_logits, target_ids, mask)

    if kd is None:
        loss = ce
    elif ce is None:
        loss = kd
    else:
        loss = alpha * kd + (1.0 - alpha) * ce
    return {
        "loss": loss,
        "kd_loss": kd.detach() if kd is not None else zero,
        "ce_loss": ce.detach() if ce is not None else zero,
    }


def annealed_alpha(alpha: float, step: int, total_steps: int, anneal: bool) -> float:
    """Teacher weight under BAM! teacher annealing.

    Clark et al. 2019, "BAM! Born-Again Multi-Task Networks for Natural
    Language Understanding": the student starts by imitating the teacher and
    moves linearly towards the gold labels, so it can end up better than the
    teacher. Here the KD weight decays linearly from ``alpha`` at step 0 to 0
    at the last step (``total_steps - 1``; steps are 0-indexed and later steps
    are clamped to it). With a single step, step 0 wins and alpha is returned.

    Args:
        alpha: Base KD weight in [0, 1].
        step: Current optimiser step, >= 0.
        total_steps: Number of steps in the run, >= 1.
        anneal: If False, alpha is returned unchanged.

    Returns:
        The KD weight to use at this step.

    Raises:
        ValueError: On alpha outside [0, 1], step < 0 or total_steps < 1.
    """
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got alpha={alpha!r}")
    if not anneal:
        return alpha
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    last = total_steps - 1
    if last == 0:
        return alpha
    return alpha * (1.0 - min(step, last) / last)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(
            f"temperature must be a finite number > 0, got temperature={temperature!r}"
        )


def _check_beta(beta: float) -> None:
    if not (0.0 <= beta <= 1.0):
        raise ValueError(f"jsd_beta must be in [0, 1], got jsd_beta={beta!r}")


def _check_kd_args(temperature: float, divergence: str, jsd_beta: float) -> None:
    _check_temperature(temperature)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got divergence={divergence!r}")
    if divergence == "generalized_jsd":
        _check_beta(jsd_beta)


def _divergence_fn(divergence: str, jsd_beta: float) -> Callable[[Tensor, Tensor], Tensor]:
    if divergence == "forward_kl":
        return forward_kl
    if divergence == "reverse_kl":
        return reverse_kl
    return lambda t, s: generalized_jsd(t, s, jsd_beta)


def _as_row_mask(mask: Tensor, n: int) -> Tensor:
    # Converting to bool matters: an int mask used as an index would gather
    # rows 0/1 instead of selecting.
    if mask.shape != (n,):
        raise ValueError(f"mask shape {tuple(mask.shape)} must be [n={n}]")
    return mask.to(torch.bool)


def _zero_with_graph(x: Tensor) -> Tensor:
    # Summing an empty slice gives 0.0 with a grad_fn when x requires grad,
    # and unlike x.sum() * 0 cannot turn into NaN if x holds inf.
    return x.reshape(-1)[:0].float().sum()
