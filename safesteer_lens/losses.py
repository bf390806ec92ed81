"""Distillation losses between student and teacher next-token distributions.

All losses take raw logits ``[batch, time, vocab]`` at the completion positions and a mask of
the tokens that count, and return one scalar: the mean over each sequence's counted tokens,
then the mean over sequences (so a long reply does not outweigh a short one).

* ``safesteer``: the localized reverse KL of SafeSteer, over the safety tokens S only, with
  full-softmax probabilities (no renormalisation over S)::

      L_t = sum_{v in S} p_s(v) * (log p_s(v) - log p_t(v))

  It needs only each model's log-sum-exp and the |S| gathered logits, never a full float32
  log-softmax. It is *not* bounded below by 0: each term is smallest at ``p_s = p_t / e``.
* ``safesteer-bounded``: the reverse KL between the two distributions coarsened to S plus one
  "rest" bucket holding everything outside S (``r = 1 - sum_{v in S} p(v)``)::

      L_t = sum_{v in S} p_s(v) log(p_s(v) / p_t(v)) + r_s log(r_s / r_t)

  A true KL divergence, so it is >= 0 and zero exactly when ``p_s = p_t`` on every token of S.
  The paper's loss above has no such floor: on a small model where S holds ~1% of the
  student's mass it barely pulls, while AdamW still moves every weight by about lr per step.
  The rest bucket is what the student may not keep: mass it holds outside S costs it in
  proportion to how much the teacher moved there.
* ``full-reverse``: KL(p_s || p_t) over the whole vocabulary (plain on-policy distillation).
* ``forward``: KL(p_t || p_s).
* ``jsd``: generalised Jensen-Shannon divergence with weight ``beta`` on the teacher
  (``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)``, ``m = beta p_t + (1 - beta) p_s``).
* ``renorm``: reverse KL between the distributions renormalised over S (the paper's ablation).

Full-vocabulary losses are computed in chunks over time so only one chunk's float32
``[batch, chunk, vocab]`` log-softmax of each model exists at once.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from safesteer_lens.errors import SafeSteerError

LOSSES = ("safesteer", "safesteer-bounded", "full-reverse", "forward", "jsd", "renorm")
Logits = Float[Tensor, "batch time vocab"]
Mask = Bool[Tensor, "batch time"]


def sequence_mean(per_token: Float[Tensor, "batch time"], mask: Mask) -> Float[Tensor, ""]:
    """Mean over each sequence's masked tokens, then over sequences with any token."""
    m = mask.to(per_token.dtype)
    counts = m.sum(1)
    per_seq = (per_token * m).sum(1) / counts.clamp(min=1)
    has_tokens = counts > 0
    if not has_tokens.any():
        return per_token.sum() * 0.0
    return per_seq[has_tokens].mean()


def kl_terms(log_p: Float[Tensor, "... vocab"], log_q: Float[Tensor, "... vocab"]) -> Float[Tensor, "..."]:
    """``sum_v p(v) (log p(v) - log q(v))`` over the last dimension, from log-probabilities.

    Over the whole vocabulary this is KL(p || q); over gathered columns (S) it is the
    localized sum, with the probabilities left unnormalised.
    """
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def safety_mass(logits: Float[Tensor, "... vocab"], safety_ids: Sequence[int] | Tensor) -> Float[Tensor, "..."]:
    """Total probability of the safety tokens per position, from log-sum-exp and |S| gathers.

    Accepts logits or log-probabilities (whose log-sum-exp is 0).
    """
    ids = torch.as_tensor(safety_ids, device=logits.device, dtype=torch.long)
    return (logits[..., ids].float() - torch.logsumexp(logits.float(), -1, keepdim=True)).exp().sum(-1)


def localized_reverse_kl_terms(
    student: Logits, teacher: Logits, safety_ids: Tensor
) -> Float[Tensor, "batch time"]:
    """Per-token ``sum_{v in S} p_s(v) (log p_s(v) - log p_t(v))`` from log-sum-exp + gathers."""
    log_ps = student[..., safety_ids].float() - torch.logsumexp(student.float(), -1, keepdim=True)
    log_pt = teacher[..., safety_ids].float() - torch.logsumexp(teacher.float(), -1, keepdim=True)
    return kl_terms(log_ps, log_pt)


def renormalised_reverse_kl_terms(
    student: Logits, teacher: Logits, safety_ids: Tensor
) -> Float[Tensor, "batch time"]:
    """Per-token reverse KL between the two distributions renormalised over S."""
    log_qs = torch.log_softmax(student[..., safety_ids].float(), -1)
    log_qt = torch.log_softmax(teacher[..., safety_ids].float(), -1)
    return kl_terms(log_qs, log_qt)


def bounded_localized_reverse_kl_terms(
    student: Logits, teacher: Logits, safety_ids: Tensor, chunk: int = 64
) -> Float[Tensor, "batch time"]:
    """Per-token reverse KL over S plus one bucket for the rest of the vocabulary.

    The rest's log-probability is the log-sum-exp of the logits outside S minus the full
    log-sum-exp, not ``log(1 - P(S))``, so it stays exact when S holds nearly all the mass.
    Computed in time chunks: each needs one float32 copy of a chunk's logits with S masked out.
    """
    out = []
    for start in range(0, student.shape[1], chunk):
        parts = []
        for logits in (student[:, start : start + chunk].float(), teacher[:, start : start + chunk].float()):
            lse = torch.logsumexp(logits, -1, keepdim=True)
            log_s = logits[..., safety_ids] - lse
            log_rest = torch.logsumexp(logits.index_fill(-1, safety_ids, float("-inf")), -1, keepdim=True) - lse
            parts.append(torch.cat([log_s, log_rest], -1))
        out.append(kl_terms(parts[0], parts[1]))
    return torch.cat(out, 1)


def _full_vocab_terms(
    student: Logits, teacher: Logits, kind: str, beta: float, chunk: int
) -> Float[Tensor, "batch time"]:
    out = []
    for start in range(0, student.shape[1], chunk):
        log_ps = torch.log_softmax(student[:, start : start + chunk].float(), -1)
        log_pt = torch.log_softmax(teacher[:, start : start + chunk].float(), -1)
        if kind == "full-reverse":
            terms = kl_terms(log_ps, log_pt)
        elif kind == "forward":
            terms = kl_terms(log_pt, log_ps)
        else:  # generalised JSD
            log_m = torch.logsumexp(
                torch.stack([log_pt + math.log(beta), log_ps + math.log(1 - beta)]), 0
            )
            terms = beta * kl_terms(log_pt, log_m) + (1 - beta) * kl_terms(log_ps, log_m)
        out.append(terms)
    return torch.cat(out, 1)


def distillation_loss(
    kind: str,
    student: Logits,
    teacher: Logits,
    mask: Mask,
    safety_ids: Sequence[int] | Tensor | None = None,
    beta: float = 0.5,
    chunk: int = 64,
) -> Float[Tensor, ""]:
    """One of :data:`LOSSES` as a scalar; gradients flow through ``student`` only.

    Args:
        kind: ``safesteer``, ``safesteer-bounded``, ``full-reverse``, ``forward``, ``jsd`` or ``renorm``.
        student: Student logits at the completion positions.
        teacher: Teacher logits at the same positions (detached here).
        mask: True at tokens that count (completion up to and including end of turn).
        safety_ids: The safety token ids S (``safesteer``, ``safesteer-bounded`` and ``renorm``).
        beta: Teacher weight of the generalised JSD, strictly between 0 and 1.
        chunk: Time steps per chunk for full-vocabulary losses.
    """
    if student.shape != teacher.shape:
        raise SafeSteerError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    teacher = teacher.detach()
    if kind in ("safesteer", "safesteer-bounded", "renorm"):
        if safety_ids is None or len(safety_ids) == 0:
            raise SafeSteerError(f"the {kind} loss needs the safety token ids S")
        ids = torch.as_tensor(safety_ids, device=student.device, dtype=torch.long)
        if int(ids.max()) >= student.shape[-1] or int(ids.min()) < 0:
            raise SafeSteerError(
                f"safety token id {int(ids.max())} is outside the vocabulary of size {student.shape[-1]}; "
                "the tokens were chosen for another model: rerun `safesteer tokens`"
            )
        terms_fn: Callable[..., Tensor] = {
            "safesteer": localized_reverse_kl_terms,
            "safesteer-bounded": bounded_localized_reverse_kl_terms,
            "renorm": renormalised_reverse_kl_terms,
        }[kind]
        terms = terms_fn(student, teacher, ids)
    elif kind in ("full-reverse", "forward", "jsd"):
        if kind == "jsd" and not 0 < beta < 1:
            raise SafeSteerError(f"jsd beta must be strictly between 0 and 1, got {beta}")
        terms = _full_vocab_terms(student, teacher, kind, beta, chunk)
    else:
        raise SafeSteerError(f"unknown loss {kind!r}: use one of {', '.join(LOSSES)}")
    return sequence_mean(terms, mask)
