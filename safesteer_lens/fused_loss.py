"""Distillation losses from final hidden states, in chunks: memory that does not grow with the vocabulary.

At the paper's shape (32 sequences of 512 new tokens per step) a 152k-token vocabulary makes
one float32 ``[batch, positions, vocab]`` logit tensor about 10 GB, and a step needs the
student's, the teacher's and the student's gradient. The localized losses need only each
model's log-sum-exp and the logits of S (plus, for the bounded loss, the log-sum-exp outside
S); every registered loss is a function of one position's logits. So the logits can be formed
from the final hidden states a chunk of positions at a time, reduced to per-token terms, and
dropped: the chunk is recomputed in the backward pass (activation checkpointing), so no more
than one chunk's logits exist at once. TRL's fused linear losses rest on the same idea.

:func:`fused_distillation_loss` equals :func:`~safesteer_lens.losses.distillation_loss` on the
logits the hidden states unembed to (``tests/test_fused_loss.py`` pins values and gradients in
float64 on every tiny family); ``TrainConfig.unembed_chunk`` switches training to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from safesteer_lens.losses import LossOptions, Mask, Terms, get_loss, loss_options, safety_mass, sequence_mean

Hidden = Float[Tensor, "batch time d_model"]


@dataclass(frozen=True)
class Unembedding:
    """What turns a final hidden state into logits: ``softcap(hidden @ weight.T + bias)``.

    Attributes:
        weight: The unembedding matrix (tied to the embedding in some families).
        bias: Its bias, where the family has one.
        softcap: Gemma 2's final logit soft-capping ``c * tanh(logits / c)``; None elsewhere.
    """

    weight: Float[Tensor, "vocab d_model"]
    bias: Float[Tensor, " vocab"] | None = None
    softcap: float | None = None

    def __call__(self, hidden: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
        logits = F.linear(hidden, self.weight, self.bias)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def to(self, device: torch.device) -> "Unembedding":
        """The same unembedding on ``device`` (itself when it is there already: no copy)."""
        if self.weight.device == device:
            return self
        return Unembedding(self.weight.to(device), None if self.bias is None else self.bias.to(device), self.softcap)

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])


def unembedding(model: Any) -> Unembedding:
    """The live unembedding of a :class:`~safesteer_lens.models.ChatModel` (its parameters, not copies).

    A student's unembedding trains with it (full fine-tuning), so the loss's gradient reaches
    the same tensor the optimizer updates.
    """
    head = model.bridge.unembed._original_component
    config = model.hf_model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(config, "final_logit_softcapping", None)
    return Unembedding(head.weight, getattr(head, "bias", None), float(softcap) if softcap else None)


def _chunk_terms(kind: str, options: LossOptions, student_head: Unembedding, teacher_head: Unembedding,
                 student: Hidden, teacher: Hidden) -> Terms:
    with torch.no_grad():
        teacher_logits = teacher_head(teacher)
    return get_loss(kind).terms(student_head(student), teacher_logits, options)


def fused_distillation_loss(
    kind: str,
    student: Hidden,
    teacher: Hidden,
    student_head: Unembedding,
    teacher_head: Unembedding,
    mask: Mask,
    safety_ids: Sequence[int] | Tensor | None = None,
    beta: float = 0.5,
    chunk: int = 64,
) -> Float[Tensor, ""]:
    """A registered loss from final hidden states; gradients flow through ``student`` and its head.

    Args:
        kind: A name in :data:`~safesteer_lens.losses.LOSS_REGISTRY`.
        student: The student's final hidden states at the completion positions.
        teacher: The teacher's at the same positions (no gradient).
        student_head: The student's :class:`Unembedding`.
        teacher_head: The teacher's.
        mask: True at tokens that count.
        safety_ids: The safety token ids S (the localized losses).
        beta: Teacher weight of the generalised JSD.
        chunk: Positions whose logits exist at once (each recomputed in the backward pass).
    """
    options = loss_options(kind, student_head.vocab_size, safety_ids, beta, student.device)
    teacher = teacher.detach()
    pieces = []
    for s in range(0, student.shape[1], chunk):
        args = (kind, options, student_head, teacher_head, student[:, s : s + chunk], teacher[:, s : s + chunk])
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_terms, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_terms(*args))
    return sequence_mean(torch.cat(pieces, 1), mask)


@torch.no_grad()
def fused_monitors(
    student: Hidden, teacher: Hidden, student_head: Unembedding, teacher_head: Unembedding, mask: Mask,
    safety_ids: Tensor, chunk: int = 64,
) -> dict[str, float]:
    """The step's monitors from hidden states, a chunk of positions at a time.

    Returns:
        ``kl_s`` (the paper's localized KL), ``kl_full`` (the whole-vocabulary reverse KL),
        ``s_mass_student`` and ``s_mass_teacher`` (the probability each puts on S), each a
        sequence mean as :func:`~safesteer_lens.losses.distillation_loss` gives it.
    """
    kl_s, kl_full, mass_s, mass_t = [], [], [], []
    localized = loss_options("safesteer", student_head.vocab_size, safety_ids, 0.5, student.device)
    for s in range(0, student.shape[1], chunk):
        s_logits, t_logits = student_head(student[:, s : s + chunk]), teacher_head(teacher[:, s : s + chunk])
        kl_s.append(get_loss("safesteer").terms(s_logits, t_logits, localized))
        kl_full.append(get_loss("full-reverse").terms(s_logits, t_logits, localized))
        mass_s.append(safety_mass(s_logits, localized.safety_ids))
        mass_t.append(safety_mass(t_logits, localized.safety_ids))
    return {name: float(sequence_mean(torch.cat(parts, 1), mask)) for name, parts in
            (("kl_s", kl_s), ("kl_full", kl_full), ("s_mass_student", mass_s), ("s_mass_teacher", mass_t))}
