"""Teacher-forced scoring: what a model predicts at each position of text it did not choose.

Every comparison of two distributions in the method reads them here:

* training: the teacher's and the student's logits on the student's rollouts (stage 3);
* token selection: the teacher's and the base's log-probs on teacher rollouts (stage 2);
* evaluation: each model's KL from the base on the base's own replies;
* the token views: one prompt and reply, coloured position by position.

One function (:func:`teacher_forced_logits`) does it, so the stages cannot drift apart in
which positions they read or how the padding is masked. :func:`teacher_forced_log_probs` is
its batched, gradient-free float32 form for the stages that only measure.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from safesteer_lens.generation import Completions, FwdHook
from safesteer_lens.models import ChatModel


class _UnembeddingInput(torch.nn.Module):
    """Stands in for the unembedding: records what it is given and passes on one column.

    What follows the unembedding in a model's forward (Gemma's logit soft-capping) then works
    on a ``[..., 1]`` slice, not on the hidden states, and costs nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []

    def forward(self, hidden: Tensor) -> Tensor:
        self.seen.append(hidden)
        return hidden[..., :1]


@contextmanager
def _unembedding_inputs(model: ChatModel) -> Iterator[_UnembeddingInput]:
    unembed = model.bridge.unembed
    head, capture = unembed._original_component, _UnembeddingInput()
    unembed._original_component = capture
    try:
        yield capture
    finally:
        unembed._original_component = head


def teacher_forced_hidden(
    model: ChatModel,
    completions: Completions,
    hooks: Sequence[FwdHook] = (),
    start: int = 0,
    stop: int | None = None,
    group_size: int = 1,
) -> Float[Tensor, "batch n_completion d_model"]:
    """The final hidden states (after the last norm) that :func:`teacher_forced_logits` would unembed.

    Entry ``[b, j]`` times the unembedding is entry ``[b, j]`` of the logits, so a loss that
    needs only some columns of the logits (:mod:`safesteer_lens.fused_loss`) can form them in
    chunks and never hold ``[batch, n_completion, vocab]``.
    """
    return teacher_forced_logits(model, completions, hooks, start, stop, group_size, hidden=True)


def teacher_forced_logits(
    model: ChatModel,
    completions: Completions,
    hooks: Sequence[FwdHook] = (),
    start: int = 0,
    stop: int | None = None,
    group_size: int = 1,
    hidden: bool = False,
) -> Float[Tensor, "batch n_completion vocab"]:
    """Logits that predict each completion token of rows ``start:stop``, under ``hooks``.

    Entry ``[b, j]`` is the model's distribution over completion token ``j`` of row ``b``
    given its prompt and completion tokens ``0..j-1``. Only those positions go through the
    unembedding (``logits_to_keep``), which is about a fifth of a small model's forward when
    run at every position. Gradients flow when the caller enables them.

    Rows come in groups of ``group_size`` samples of the same prompt (the M rollouts of one
    training prompt). Then the prompt runs once per group and its KV cache is repeated for the
    group's completions: the same logits and the same gradients (the repeat is
    differentiable), with ``group_size`` times less prompt compute. Rows that do not form
    whole groups of identical prompts take the plain full-sequence path. Under sharding the
    choice must agree over ranks, since it sets the number of forwards; it does, as every
    rank's rows are whole groups of ``group_size``.

    Args:
        model: The model that scores (its device is used; the rows may live elsewhere).
        completions: Prompts and the tokens written after them.
        hooks: Forward hooks active during the pass (a teacher's steering hook).
        start: First row.
        stop: One past the last row (None: all).
        group_size: Rows per prompt group, for the shared-prompt path.
        hidden: Return the unembedding's inputs instead (:func:`teacher_forced_hidden`).
    """
    stop = len(completions) if stop is None else stop
    n_completion = completions.completion_ids.shape[1]
    device = model.device
    prompts = completions.prompt_ids[start:stop].to(device)
    attention = completions.attention_mask[start:stop].to(device)
    grouped = (
        group_size > 1
        and start % group_size == 0
        and (stop - start) % group_size == 0
        and torch.equal(prompts, prompts[::group_size].repeat_interleave(group_size, 0))
    )
    with ExitStack() as stack:
        stack.enter_context(model.bridge.hooks(fwd_hooks=list(hooks)))
        capture = stack.enter_context(_unembedding_inputs(model)) if hidden else None

        def scored(logits: Tensor) -> Tensor:
            """What a forward scored: its logits, or with ``hidden`` what went into the unembedding."""
            return logits if capture is None else capture.seen[-1]

        if not grouped:
            sequences = completions.sequences[start:stop].to(device)
            return scored(model.bridge(sequences, attention_mask=attention, logits_to_keep=n_completion + 1))[:, :-1]
        first, cache = model.bridge(
            prompts[::group_size], attention_mask=completions.prompt_mask[start:stop:group_size].to(device),
            return_type="logits_and_cache", use_cache=True, logits_to_keep=1,
        )
        first = scored(first)
        cache.batch_repeat_interleave(group_size)
        rest = scored(model.bridge(
            completions.completion_ids[start:stop].to(device), attention_mask=attention,
            past_key_values=cache, logits_to_keep=n_completion,
        ))
    return torch.cat([first[:, -1:].repeat_interleave(group_size, 0), rest[:, :-1]], dim=1)


@torch.no_grad()
def teacher_forced_log_probs(
    model: ChatModel,
    completions: Completions,
    hooks: Sequence[FwdHook] = (),
    batch_size: int = 32,
) -> Float[Tensor, "batch n_completion vocab"]:
    """:func:`teacher_forced_logits` as float32 log-probs on the CPU, ``batch_size`` rows at a time."""
    out = []
    for start in range(0, len(completions), batch_size):
        stop = min(start + batch_size, len(completions))
        logits = teacher_forced_logits(model, completions, hooks, start, stop)
        out.append(torch.log_softmax(logits.float(), -1).cpu())
    return torch.cat(out)


def single_completion(ids: Int[Tensor, "pos"], n_prompt: int) -> Completions:
    """One unpadded sequence as :class:`Completions`: its first ``n_prompt`` tokens are the prompt.

    With ``n_prompt=1`` the scored positions are every token after the first, which is what a
    view that colours the prompt too needs.
    """
    ids = ids.long()
    return Completions(
        prompt_ids=ids[None, :n_prompt],
        prompt_mask=torch.ones(1, n_prompt, dtype=torch.long),
        completion_ids=ids[None, n_prompt:],
        completion_mask=torch.ones(1, len(ids) - n_prompt, dtype=torch.bool),
        texts=[""],
    )
