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

Every loss is a per-token function registered by name in :data:`LOSS_REGISTRY` with
:func:`register_loss`; the CLI's ``--loss`` choices and help, :class:`TrainConfig`'s
validation and :func:`distillation_loss` all read the registry. Adding a loss is one decorated
function and its test against a reference formula (``tests/test_losses.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from safesteer_lens.errors import SafeSteerError

Logits = Float[Tensor, "batch time vocab"]
Mask = Bool[Tensor, "batch time"]
Terms = Float[Tensor, "batch time"]


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


@dataclass(frozen=True)
class LossOptions:
    """What a loss may need beyond the two models' logits.

    Attributes:
        safety_ids: The safety token ids S, on the logits' device (the localized losses).
        beta: Teacher weight of the generalised JSD.
    """

    safety_ids: Tensor | None = None
    beta: float = 0.5


@dataclass(frozen=True)
class Loss:
    """A registered loss: per-token terms from student and teacher logits.

    Attributes:
        name: What ``--loss`` and ``TrainConfig.loss`` call it.
        terms: ``(student, teacher, options) -> [batch, time]`` per-token terms.
        help: One line for the CLI's help.
        localized: Whether it needs the safety tokens S.
        chunked: Whether it takes float32 copies of whole-vocabulary logits, and so is computed
            in time chunks.
        check: Raises ``SafeSteerError`` for options the loss cannot use, so a config that
            names the loss fails when it is built, not at the first step.
    """

    name: str
    terms: Callable[[Tensor, Tensor, LossOptions], Tensor]
    help: str
    localized: bool = False
    chunked: bool = False
    check: Callable[[LossOptions], None] = lambda options: None


LOSS_REGISTRY: dict[str, Loss] = {}


def register_loss(name: str, help: str, localized: bool = False, chunked: bool = False,
                  check: Callable[[LossOptions], None] | None = None,
                  ) -> Callable[[Callable[[Tensor, Tensor, LossOptions], Tensor]], Callable[[Tensor, Tensor, LossOptions], Tensor]]:
    """Register a per-token loss under ``name`` (a decorator); ``check`` validates its options."""

    def add(terms: Callable[[Tensor, Tensor, LossOptions], Tensor]) -> Callable[[Tensor, Tensor, LossOptions], Tensor]:
        if name in LOSS_REGISTRY:
            raise ValueError(f"a loss named {name!r} is registered already")
        LOSS_REGISTRY[name] = Loss(name, terms, help, localized, chunked, *(() if check is None else (check,)))
        return terms

    return add


def get_loss(name: str) -> Loss:
    """The registered loss, or a one-line error listing the names there are."""
    if name not in LOSS_REGISTRY:
        raise SafeSteerError(f"unknown loss {name!r}: use one of {', '.join(LOSS_REGISTRY)}")
    return LOSS_REGISTRY[name]


def _log_probs(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits.float(), -1)


@register_loss("safesteer", "the paper's localized reverse KL over S (full-softmax probabilities, not bounded below)",
               localized=True)
def localized_reverse_kl_terms(student: Logits, teacher: Logits, options: LossOptions) -> Terms:
    """Per-token ``sum_{v in S} p_s(v) (log p_s(v) - log p_t(v))`` from log-sum-exp + gathers."""
    ids = options.safety_ids
    log_ps = student[..., ids].float() - torch.logsumexp(student.float(), -1, keepdim=True)
    log_pt = teacher[..., ids].float() - torch.logsumexp(teacher.float(), -1, keepdim=True)
    return kl_terms(log_ps, log_pt)


@register_loss("safesteer-bounded", "reverse KL over S plus one rest-of-vocabulary bucket: >= 0, zero when the student "
               "matches the teacher on S", localized=True, chunked=True)
def bounded_localized_reverse_kl_terms(student: Logits, teacher: Logits, options: LossOptions) -> Terms:
    """Per-token reverse KL over S plus one bucket for the rest of the vocabulary.

    The rest's log-probability is the log-sum-exp of the logits outside S minus the full
    log-sum-exp, not ``log(1 - P(S))``, so it stays exact when S holds nearly all the mass.
    """
    ids = options.safety_ids
    parts = []
    for logits in (student.float(), teacher.float()):
        lse = torch.logsumexp(logits, -1, keepdim=True)
        log_s = logits[..., ids] - lse
        log_rest = torch.logsumexp(logits.index_fill(-1, ids, float("-inf")), -1, keepdim=True) - lse
        parts.append(torch.cat([log_s, log_rest], -1))
    return kl_terms(parts[0], parts[1])


@register_loss("renorm", "reverse KL between the distributions renormalised over S (the paper's ablation)", localized=True)
def renormalised_reverse_kl_terms(student: Logits, teacher: Logits, options: LossOptions) -> Terms:
    """Per-token reverse KL between the two distributions renormalised over S."""
    ids = options.safety_ids
    return kl_terms(torch.log_softmax(student[..., ids].float(), -1), torch.log_softmax(teacher[..., ids].float(), -1))


@register_loss("full-reverse", "KL(student || teacher) over the whole vocabulary (plain on-policy distillation)",
               chunked=True)
def full_reverse_kl_terms(student: Logits, teacher: Logits, options: LossOptions) -> Terms:
    """Per-token KL(p_s || p_t) over the vocabulary."""
    return kl_terms(_log_probs(student), _log_probs(teacher))


@register_loss("forward", "KL(teacher || student) over the whole vocabulary", chunked=True)
def forward_kl_terms(student: Logits, teacher: Logits, options: LossOptions) -> Terms:
    """Per-token KL(p_t || p_s) over the vocabulary."""
    return kl_terms(_log_probs(teacher), _log_probs(student))


def _check_beta(options: LossOptions) -> None:
    if not (math.isfinite(options.beta) and 0 < options.beta < 1):
        raise SafeSteerError(f"jsd_beta must be strictly between 0 and 1 (at 0 or 1 the divergence is zero whatever "
                             f"the student does), got {options.beta}")


@register_loss("jsd", "generalised Jensen-Shannon divergence with weight jsd_beta on the teacher", chunked=True,
               check=_check_beta)
def jsd_terms(student: Logits, teacher: Logits, options: LossOptions) -> Terms:
    """Per-token ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)`` with ``m = beta p_t + (1 - beta) p_s``."""
    _check_beta(options)
    beta = options.beta
    log_ps, log_pt = _log_probs(student), _log_probs(teacher)
    log_m = torch.logsumexp(torch.stack([log_pt + math.log(beta), log_ps + math.log(1 - beta)]), 0)
    return beta * kl_terms(log_pt, log_m) + (1 - beta) * kl_terms(log_ps, log_m)


def _chunked(terms: Callable[[Tensor, Tensor, LossOptions], Tensor], student: Logits, teacher: Logits,
             options: LossOptions, chunk: int) -> Terms:
    """``terms`` over time chunks, so only one chunk's float32 copies of the logits exist at once."""
    return torch.cat([terms(student[:, s : s + chunk], teacher[:, s : s + chunk], options)
                      for s in range(0, student.shape[1], chunk)], 1)


LOSSES = tuple(LOSS_REGISTRY)


def loss_options(kind: str, vocab_size: int, safety_ids: Sequence[int] | Tensor | None, beta: float,
                 device: torch.device) -> LossOptions:
    """A loss's options, checked: S given where the loss needs it, and inside the vocabulary."""
    ids = None
    if get_loss(kind).localized:
        if safety_ids is None or len(safety_ids) == 0:
            raise SafeSteerError(f"the {kind} loss needs the safety token ids S")
        ids = torch.as_tensor(safety_ids, device=device, dtype=torch.long)
        if int(ids.max()) >= vocab_size or int(ids.min()) < 0:
            bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
            raise SafeSteerError(
                f"safety token id {bad} is outside the vocabulary of size {vocab_size}; "
                "the tokens were chosen for another model: rerun `safesteer tokens`"
            )
    return LossOptions(ids, beta)


def distillation_loss(
    kind: str,
    student: Logits,
    teacher: Logits,
    mask: Mask,
    safety_ids: Sequence[int] | Tensor | None = None,
    beta: float = 0.5,
    chunk: int = 64,
) -> Float[Tensor, ""]:
    """A registered loss as a scalar; gradients flow through ``student`` only.

    Args:
        kind: A name in :data:`LOSS_REGISTRY` (``safesteer``, ``safesteer-bounded``,
            ``full-reverse``, ``forward``, ``jsd``, ``renorm``).
        student: Student logits at the completion positions.
        teacher: Teacher logits at the same positions (detached here).
        mask: True at tokens that count (completion up to and including end of turn).
        safety_ids: The safety token ids S (the localized losses).
        beta: Teacher weight of the generalised JSD, strictly between 0 and 1.
        chunk: Time steps per chunk for the losses over S plus rest and the whole vocabulary.
    """
    loss = get_loss(kind)
    if student.shape != teacher.shape:
        raise SafeSteerError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    options = loss_options(kind, student.shape[-1], safety_ids, beta, student.device)
    teacher = teacher.detach()
    terms = _chunked(loss.terms, student, teacher, options, chunk) if loss.chunked else loss.terms(student, teacher, options)
    return sequence_mean(terms, mask)
