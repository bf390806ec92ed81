"""Batched chat generation with optional TransformerLens hooks.

Every SafeSteer stage generates: stage 1 compares steered and unsteered replies, stage 2
samples teacher rollouts, stage 3 samples student rollouts. They share this one function.

It runs Hugging Face ``generate`` on the model the bridge wraps. The bridge replaced that
model's modules in place, so hooks registered with ``bridge.hooks`` fire on every forward,
the prompt pass and each KV-cached decode step (where activations are ``[batch, 1, d_model]``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from safesteer_lens.errors import SafeSteerError
from safesteer_lens.models import ChatModel

FwdHook = tuple[str, Callable[..., Any]]


@dataclass
class Completions:
    """Prompts and what the model wrote after them.

    Attributes:
        prompt_ids: Left-padded prompt tokens.
        prompt_mask: 1 for real prompt tokens.
        completion_ids: Generated tokens; rows that stopped early are padded after the
            end-of-turn token.
        completion_mask: True for generated tokens up to and including the first end-of-turn
            token, False after it.
        texts: Decoded completions without special tokens.
    """

    prompt_ids: Int[Tensor, "batch prompt_pos"]
    prompt_mask: Int[Tensor, "batch prompt_pos"]
    completion_ids: Int[Tensor, "batch new_pos"]
    completion_mask: Bool[Tensor, "batch new_pos"]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, rows: slice) -> "Completions":
        """The completions of a slice of rows (e.g. one prompt's samples)."""
        if not isinstance(rows, slice):
            raise TypeError("index Completions with a slice, e.g. completions[0:4]")
        return Completions(
            self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows],
            self.completion_mask[rows], self.texts[rows],
        )

    @property
    def sequences(self) -> Int[Tensor, "batch pos"]:
        """Prompt and completion concatenated (what a teacher-forced pass reads)."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Int[Tensor, "batch pos"]:
        """Attention mask over :attr:`sequences` (completion padding masked out)."""
        return torch.cat([self.prompt_mask, self.completion_mask.long()], dim=1)


def completion_mask(
    completion_ids: Int[Tensor, "batch new_pos"], eot_ids: Sequence[int]
) -> Bool[Tensor, "batch new_pos"]:
    """Mark generated tokens up to and including each row's first end-of-turn token."""
    is_eot = torch.isin(completion_ids, torch.tensor(list(eot_ids), device=completion_ids.device))
    eots_before = torch.cumsum(is_eot.long(), dim=1) - is_eot.long()
    return eots_before == 0


def generate(
    model: ChatModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int | None = None,
    fwd_hooks: Sequence[FwdHook] = (),
    system: str | None = None,
    batch_size: int = 32,
    use_cache: bool = True,
) -> Completions:
    """Generate chat replies, stopping each row at its end-of-turn token.

    Args:
        model: The chat model.
        prompts: User messages.
        max_new_tokens: Upper bound on reply length.
        do_sample: Sample (True) or greedy (False).
        temperature: Sampling temperature (ignored when greedy).
        seed: Seeds torch's global generator before sampling, for repeatable rollouts.
        fwd_hooks: ``(hook_name, fn)`` pairs active during generation, e.g. a steering hook.
        system: Optional system message.
        batch_size: Prompts per ``generate`` call.
        use_cache: Decode with the KV cache (the default); False recomputes the whole
            sequence at every step, which is slow but useful to check hooks against.

    Returns:
        :class:`Completions` for all prompts, in order.
    """
    check_decoding(max_new_tokens, do_sample, temperature)
    if seed is not None:
        torch.manual_seed(seed)
    pad_id = model.tokenizer.pad_token_id
    settings = policy_generation_config(model, max_new_tokens, do_sample, temperature)
    settings.use_cache = use_cache
    chunks: list[Completions] = []
    for start in range(0, len(prompts), batch_size):
        batch = model.tokenize(list(prompts[start : start + batch_size]), system=system)
        with torch.no_grad(), model.bridge.hooks(fwd_hooks=list(fwd_hooks)), decoding_with(model.hf_model, settings):
            out = model.hf_model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        chunks.append(split_output(model, batch.input_ids, batch.attention_mask, out))
    return _concat(chunks, pad_id)


def check_decoding(max_new_tokens: int, do_sample: bool, temperature: float) -> None:
    """Reject decoding settings that cannot work, before any compute."""
    if max_new_tokens < 1:
        raise SafeSteerError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise SafeSteerError(f"temperature must be positive when sampling, got {temperature}")


def policy_generation_config(
    model: ChatModel, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0
) -> Any:
    """Decoding settings that read the model's own distribution and nothing else.

    A fresh ``GenerationConfig`` rather than the model's: shipped configs carry decoding
    preferences (Qwen2.5-Instruct's ``repetition_penalty=1.05``, top-k/top-p, beam counts,
    cache types) that ``generate`` would apply on top of the logits. Refusal measurements and
    on-policy rollouts both need the policy itself: greedy, or plain temperature sampling.
    Use it through :func:`decoding_with`.
    """
    from transformers import GenerationConfig

    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample else {"do_sample": False}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_beams=1,
        eos_token_id=model.eot_token_ids,
        pad_token_id=model.tokenizer.pad_token_id,
        bos_token_id=model.hf_model.generation_config.bos_token_id,
        **sampling,
    )


@contextmanager
def decoding_with(hf_model: Any, config: Any) -> Iterator[None]:
    """Make ``config`` the model's generation config for the block.

    Passing a config to ``generate`` is not enough: ``generate`` fills every field left at
    None from the model's own config, and neutral values (no repetition penalty, no banned
    words) are None. With the model's config swapped out there is nothing to inherit.
    """
    saved = hf_model.generation_config
    hf_model.generation_config = config
    try:
        yield
    finally:
        hf_model.generation_config = saved


def split_output(
    model: ChatModel,
    prompt_ids: Int[Tensor, "batch prompt_pos"],
    prompt_mask: Int[Tensor, "batch prompt_pos"],
    output: Int[Tensor, "batch pos"],
) -> Completions:
    """Turn ``generate``'s output (prompt followed by new tokens) into :class:`Completions`."""
    new = output[:, prompt_ids.shape[1] :]
    mask = completion_mask(new, model.eot_token_ids)
    pad_id = model.tokenizer.pad_token_id
    texts = model.tokenizer.batch_decode(new.masked_fill(~mask, pad_id), skip_special_tokens=True)
    return Completions(prompt_ids, prompt_mask, new, mask, texts)


@torch.no_grad()
def last_token_logits(
    model: ChatModel, prompts: Sequence[str], fwd_hooks: Sequence[FwdHook] = (), batch_size: int = 32
) -> Float[Tensor, "batch vocab"]:
    """Next-token logits at the end of each chat-formatted prompt (float32), under hooks.

    What refusal scores and next-token KLs read: the distribution over the reply's first token.
    """
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = model.tokenize(list(prompts[start : start + batch_size]))
        with model.bridge.hooks(fwd_hooks=list(fwd_hooks)):
            # logits_to_keep: unembed only the last position (the unembedding is ~20% of a
            # small model's forward when run at every position)
            logits = model.bridge(batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1)
        out.append(logits[:, -1, :].float())
    return torch.cat(out)


def _left_pad(t: Tensor, width: int, value: int) -> Tensor:
    return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)


def _right_pad(t: Tensor, width: int, value: int | bool) -> Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


def _concat(chunks: list[Completions], pad_id: int) -> Completions:
    """Join per-batch results, re-padding prompts on the left and completions on the right."""
    if len(chunks) == 1:
        return chunks[0]
    p_width = max(c.prompt_ids.shape[1] for c in chunks)
    c_width = max(c.completion_ids.shape[1] for c in chunks)
    return Completions(
        torch.cat([_left_pad(c.prompt_ids, p_width, pad_id) for c in chunks]),
        torch.cat([_left_pad(c.prompt_mask, p_width, 0) for c in chunks]),
        torch.cat([_right_pad(c.completion_ids, c_width, pad_id) for c in chunks]),
        torch.cat([_right_pad(c.completion_mask, c_width, False) for c in chunks]),
        [t for c in chunks for t in c.texts],
    )
