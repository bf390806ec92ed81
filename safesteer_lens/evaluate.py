"""Evaluation: does a model refuse harmful requests, over-refuse harmless ones, and stay itself?

For each model (base, teacher, SafeSteer student, ablation students) one row of a pandas
table:

* ``harmful_refusal``: share of greedy replies to held-out harmful prompts that open as
  refusals (pinned marker list in :mod:`safesteer_lens.refusal`), plus the same for any extra
  benchmark files (AdvBench, HarmBench, JailbreakBench...);
* ``harmless_refusal``: the same on held-out harmless prompts (over-refusal; XSTest's safe
  prompts when given);
* ``harmful_score`` / ``harmless_score``: mean logit refusal score at the last prompt position;
* ``kl_from_base``: mean per-token KL(model || base) over the base model's own greedy replies
  to the harmless prompts (how far ordinary behaviour moved);
* ``perplexity``: on a general-text sample the project ships;
* ``judge_*``: when a judge callable is given (e.g. a Llama Guard wrapper), its verdicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from safesteer_lens.data import Prompt, load_builtin_prompts, prompt_texts
from safesteer_lens.generation import Completions, completion_position_logits, generate, last_token_logits
from safesteer_lens.losses import kl_terms
from safesteer_lens.models import ChatModel
from safesteer_lens.refusal import refusal_rate, refusal_score, refusal_token_ids

Judge = Callable[[Sequence[str], Sequence[str]], Sequence[bool]]
"""``judge(prompts, replies) -> flags``: True where the reply is a refusal / safe answer."""


@dataclass
class Subject:
    """A model to evaluate: a loaded model plus the hooks that make it what it is.

    The teacher is the base model with the steering hook, so it needs no second copy.
    """

    name: str
    model: ChatModel
    hooks: list = field(default_factory=list)


@dataclass
class EvalConfig:
    """Settings of :func:`evaluate_models`.

    Attributes:
        n_harmful: Held-out harmful prompts (built-in test split).
        n_harmless: Held-out harmless prompts (built-in test split).
        max_new_tokens: Greedy reply length.
        n_kl_prompts: Harmless prompts whose base replies measure the KL.
        n_general: General-text paragraphs for perplexity.
        n_examples: Sample completions kept per prompt set.
    """

    n_harmful: int = 65
    n_harmless: int = 65
    max_new_tokens: int = 32
    n_kl_prompts: int = 24
    n_general: int = 24
    n_examples: int = 6


def general_text(n: int | None = None) -> list[str]:
    """The shipped general-text paragraphs (written for this project) used for perplexity."""
    text = resources.files("safesteer_lens").joinpath("prompts/general_text.txt").read_text()
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    return paragraphs[:n] if n else paragraphs


@torch.no_grad()
def perplexity(model: ChatModel, texts: Sequence[str], hooks: Sequence = (), batch_size: int = 8) -> float:
    """Token-weighted perplexity of plain text (no chat template)."""
    total_nll, total_tokens = 0.0, 0
    tok = model.tokenizer
    for start in range(0, len(texts), batch_size):
        enc = tok(list(texts[start : start + batch_size]), return_tensors="pt", padding=True).to(model.device)
        with model.bridge.hooks(fwd_hooks=list(hooks)):
            logits = model.bridge(enc["input_ids"], attention_mask=enc["attention_mask"])
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        target = enc["input_ids"][:, 1:]
        mask = enc["attention_mask"][:, 1:].bool() & enc["attention_mask"][:, :-1].bool()
        nll = -logp.gather(-1, target.unsqueeze(-1))[..., 0]
        total_nll += float(nll[mask].sum())
        total_tokens += int(mask.sum())
    return math.exp(total_nll / max(total_tokens, 1))


def mean_refusal_score(model: ChatModel, prompts: Sequence[str], hooks: Sequence = ()) -> float:
    """Mean logit refusal score at the last prompt position."""
    logits = last_token_logits(model, prompts, hooks)
    return float(refusal_score(logits, refusal_token_ids(model.tokenizer)).mean())


@torch.no_grad()
def _reply_log_probs(model: ChatModel, replies: Completions, hooks: Sequence, batch_size: int = 16) -> list[Tensor]:
    """Log-probs over the vocabulary at each reply position, one tensor per row (masked rows)."""
    out = []
    for start in range(0, len(replies.texts), batch_size):
        seq = replies.sequences[start : start + batch_size]
        mask = replies.attention_mask[start : start + batch_size]
        with model.bridge.hooks(fwd_hooks=list(hooks)):
            logits = completion_position_logits(model, seq, mask, replies.completion_ids.shape[1])
        logp = torch.log_softmax(logits.float(), -1)
        for row, m in zip(logp, replies.completion_mask[start : start + batch_size]):
            out.append(row[m])
    return out


def kl_from_base(subject: Subject, base: ChatModel, base_replies: Completions) -> float:
    """Mean per-token KL(subject || base) over the base model's own replies."""
    ours = _reply_log_probs(subject.model, base_replies, subject.hooks)
    theirs = _reply_log_probs(base, base_replies, [])
    per_token = torch.cat([kl_terms(a, b) for a, b in zip(ours, theirs)])
    return float(per_token.mean()) if per_token.numel() else 0.0


def evaluate_models(
    subjects: Sequence[Subject],
    base: ChatModel,
    config: EvalConfig | None = None,
    extra_sets: dict[str, list[Prompt]] | None = None,
    judge: Judge | None = None,
) -> tuple["Any", dict[str, list[dict[str, str]]]]:
    """Evaluate each subject; return the results table and sample completions.

    Args:
        subjects: Models to compare (the base model itself can be one of them).
        base: The reference for ``kl_from_base``.
        config: Settings; defaults to :class:`EvalConfig`.
        extra_sets: Named extra prompt lists (e.g. ``{"advbench": load_public_prompts(...)}``);
            harmful ones add a ``<name>_refusal`` column, harmless ones ``<name>_over_refusal``.
        judge: Optional ``judge(prompts, replies) -> flags`` adding ``judge_harmful_refusal``
            and ``judge_harmless_refusal`` columns.

    Returns:
        ``(table, examples)``: a pandas DataFrame indexed by subject name, and per prompt set a
        list of ``{"prompt", <subject name>: reply, ...}`` rows for side-by-side display.
    """
    import pandas

    config = config or EvalConfig()
    harmful = prompt_texts(load_builtin_prompts("harmful", "test"))[: config.n_harmful]
    harmless = prompt_texts(load_builtin_prompts("harmless", "test"))[: config.n_harmless]
    general = general_text(config.n_general)
    base_replies = generate(base, harmless[: config.n_kl_prompts], max_new_tokens=config.max_new_tokens)
    rows, examples = [], {"harmful": [{"prompt": p} for p in harmful[: config.n_examples]],
                          "harmless": [{"prompt": p} for p in harmless[: config.n_examples]]}
    for subject in subjects:
        replies = {
            name: generate(subject.model, prompts, max_new_tokens=config.max_new_tokens, fwd_hooks=subject.hooks)
            for name, prompts in (("harmful", harmful), ("harmless", harmless))
        }
        row: dict[str, Any] = {
            "model": subject.name,
            "harmful_refusal": refusal_rate(replies["harmful"].texts),
            "harmless_refusal": refusal_rate(replies["harmless"].texts),
            "harmful_score": mean_refusal_score(subject.model, harmful, subject.hooks),
            "harmless_score": mean_refusal_score(subject.model, harmless, subject.hooks),
            "kl_from_base": kl_from_base(subject, base, base_replies),
            "perplexity": perplexity(subject.model, general, subject.hooks),
        }
        for set_name, prompts in (extra_sets or {}).items():
            texts = [p.prompt for p in prompts]
            out = generate(subject.model, texts, max_new_tokens=config.max_new_tokens, fwd_hooks=subject.hooks)
            harmful_share = sum(p.label == "harmful" for p in prompts) / max(len(prompts), 1)
            column = f"{set_name}_refusal" if harmful_share >= 0.5 else f"{set_name}_over_refusal"
            row[column] = refusal_rate(out.texts)
        if judge is not None:
            for name, prompts in (("harmful", harmful), ("harmless", harmless)):
                flags = list(judge(prompts, replies[name].texts))
                row[f"judge_{name}_refusal"] = sum(map(bool, flags)) / max(len(flags), 1)
        rows.append(row)
        for name in ("harmful", "harmless"):
            for example, text in zip(examples[name], replies[name].texts):
                example[subject.name] = text.strip()
    return pandas.DataFrame(rows).set_index("model"), examples
