"""Evaluation: does a model refuse harmful requests, over-refuse harmless ones, and stay itself?

A row of a pandas table per model (base, teacher, SafeSteer student, ablation students). Every
rate comes with its n and a 95% Wilson interval (``<rate>_low``, ``<rate>_high``, ``<rate>_n``):

* **refusal**: ``harmful_refusal`` and ``harmless_refusal`` are the shares of greedy replies
  to held-out prompts that open as refusals (pinned markers, :mod:`safesteer_lens.refusal`);
  extra prompt sets add ``<name>_refusal`` or ``<name>_over_refusal``; the look-alike study's
  sets, when asked for (``n_lookalike``, ``n_tasks``), add ``lookalike_refusal`` (harmless
  requests in a harmful request's words: an over-refusal rate) and ``tasks_refusal`` (harmful
  requests in benchmark phrasing), each with ``_degenerate``;
* **three classes** (:func:`~safesteer_lens.refusal.classify_reply`): for every set,
  ``<set>_full_refusal``, ``<set>_partial_refusal`` and ``<set>_apology`` (replies that open
  with an apology, helping or not), which the marker rule cannot tell apart;
* **judge** (when one is given, e.g. Llama Guard 3): ``judge_harmful_unsafe`` is the attack
  success rate, harmful replies judged unsafe; ``judge_harmless_unsafe`` the same on harmless
  replies; ``judge_harmless_refused`` where the judge also reports refusals;
* **coherence** (:mod:`safesteer_lens.coherence`): ``harmless_degenerate`` and
  ``harmful_degenerate`` (looping, repetitive, fragmented or empty replies),
  ``harmless_ended`` (replies that stop at the end-of-turn token) and
  ``harmless_reply_tokens`` (mean length);
* **capability** (:mod:`safesteer_lens.capability`, scored by lm-evaluation-harness):
  ``mcq_acc`` and ``mcq_acc_norm`` on the shipped questions, ``<set>_acc`` and
  ``<set>_acc_norm`` for public sets;
* **closeness to the base**: ``harmful_score`` / ``harmless_score`` (mean logit refusal score
  at the last prompt position), ``kl_from_base`` (per-token KL(model || base) over the base's
  own replies to harmless prompts) and ``perplexity`` on shipped general text.

A second table, :attr:`Evaluation.comparison`, has one row per held-out prompt with every
model's reply and its refusal, class, apology, degeneracy and judge flags, so a rate can be
traced to replies; a third, :attr:`Evaluation.by_category`, has every rate per category of
every set (per kind of trap for the look-alikes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from safesteer_lens.capability import MCQScores, MCQuestion, interleave_subjects, load_builtin_mcq, score_mcq
from safesteer_lens.coherence import coherence
from safesteer_lens.data import (
    Label, Prompt, check_prompt_lengths, first_prompts, load_builtin_prompts, load_study_set, prompt_texts,
)
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.generation import Completions, FwdHook, generate, last_token_logits
from safesteer_lens.judges import Judge, Verdict
from safesteer_lens.losses import kl_terms
from safesteer_lens.models import ChatModel
from safesteer_lens.refusal import ReplyLabel, classify_reply, is_refusal, refusal_score, refusal_token_ids
from safesteer_lens.scoring import teacher_forced_log_probs
from safesteer_lens.stats import Rate


@dataclass
class Subject:
    """A model to evaluate: a loaded model plus the hooks that make it what it is.

    The teacher is the base model with the steering hook, so it needs no second copy.
    """

    name: str
    model: ChatModel
    hooks: list[FwdHook] = field(default_factory=list)


@dataclass(frozen=True)
class EvalConfig:
    """Settings of :func:`evaluate_models`.

    Attributes:
        n_harmful: Held-out harmful prompts (built-in prompts of ``split``).
        n_harmless: Held-out harmless prompts (built-in prompts of ``split``).
        mix_categories: Take the held-out prompts categories in turn
            (:func:`~safesteer_lens.data.categories_in_turn`), so 40 of a split's 65 ask about
            all 13 categories; the file's first 40 cover only 8, and a recipe that over-refuses
            in the other five would go unseen. False takes the file's order.
        max_new_tokens: Greedy reply length; long enough that a reply reads as a whole.
        n_kl_prompts: Harmless prompts whose base replies measure the KL.
        n_general: General-text paragraphs for perplexity.
        n_examples: Sample completions kept per prompt set for the report.
        n_mcq: Shipped multiple-choice questions (subjects in turn); None for the whole split.
        split: Split of the held-out prompts and of the shipped questions: ``test`` for
            reported numbers, ``val`` while choosing settings (a number measured on the
            prompts settings were tuned on is not a result).
        batch_size: Prompts per greedy ``generate`` call. The harmful and harmless prompts go
            through together, so the short last batch of each set is not paid twice; padding
            is masked, so the greedy replies do not depend on the batching
            (benchmarks/README.md has the measurement).
        n_lookalike: Look-alike harmless prompts of ``split`` (kinds of trap in turn;
            :func:`~safesteer_lens.data.load_study_set`); 0 leaves the set out.
        n_tasks: Harmful prompts in public benchmarks' phrasing of ``split`` (categories in
            turn); 0 leaves the set out.
    """

    n_harmful: int = 65
    n_harmless: int = 65
    mix_categories: bool = True
    max_new_tokens: int = 48
    n_kl_prompts: int = 24
    n_general: int = 24
    n_examples: int = 6
    n_mcq: int | None = 60
    split: str = "test"
    batch_size: int = 80
    n_lookalike: int = 0
    n_tasks: int = 0

    def __post_init__(self) -> None:
        for name in ("n_harmful", "n_harmless", "max_new_tokens", "n_kl_prompts", "n_general", "batch_size"):
            if getattr(self, name) < 1:
                raise SafeSteerError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("n_examples", "n_lookalike", "n_tasks"):
            if getattr(self, name) < 0:
                raise SafeSteerError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.n_mcq is not None and self.n_mcq < 0:
            raise SafeSteerError(f"n_mcq must be 0 (no capability check) or more, got {self.n_mcq}")
        if self.split not in ("val", "test"):
            raise SafeSteerError(f"split must be 'val' (choosing settings) or 'test' (reporting), got {self.split!r}")


def check_counts(config: EvalConfig) -> None:
    """Fail in one line when ``config`` asks for more shipped prompts or questions than its split has.

    A count above what exists would otherwise be cut silently, and the table would report a
    smaller n than the command asked for.
    """
    from safesteer_lens.capability import load_builtin_mcq
    from safesteer_lens.data import load_builtin_prompts

    for label, asked in (("harmful", config.n_harmful), ("harmless", config.n_harmless)):
        have = len(load_builtin_prompts(label, config.split))
        if asked > have:
            raise SafeSteerError(f"{asked} {label} prompts asked for but the {config.split} split has {have}; "
                                 f"ask for {have} or fewer (--n)")
    for name, asked in (("lookalike", config.n_lookalike), ("tasks", config.n_tasks)):
        have = len(load_study_set(name, config.split))
        if asked > have:
            raise SafeSteerError(f"{asked} {name} prompts asked for but the {config.split} split has {have}; "
                                 f"ask for {have} or fewer (--n-{name})")
    if config.n_mcq:
        have = len(load_builtin_mcq(config.split))
        if config.n_mcq > have:
            raise SafeSteerError(f"{config.n_mcq} questions asked for but the {config.split} split has {have}; "
                                 f"ask for {have} or fewer (--n-mcq)")


# The demo's evaluation (2 CPU cores, 135M model): 40 + 40 held-out prompts, a kind-balanced
# subset of the look-alike and benchmark-phrased sets (4 per kind of trap, 2 per harm category)
# and 60 questions. `safesteer run --preset demo` reports it on the test split; sweeps choose
# settings with it on the validation split. The look-alike study reads the whole splits.
DEMO_EVAL = EvalConfig(n_harmful=40, n_harmless=40, max_new_tokens=48, n_kl_prompts=16, n_general=12, n_mcq=60,
                       n_lookalike=40, n_tasks=26)


@dataclass
class Evaluation:
    """What :func:`evaluate_models` measured.

    Attributes:
        table: One row per model (pandas, indexed by model name); see the module docstring.
        comparison: One row per held-out prompt: its id, label, category and text, then per
            model ``"<model>: reply"``, ``": refused"``, ``": degenerate"`` and, with a judge,
            ``": unsafe"``.
        examples: Per prompt set, the first prompts with every model's reply (for the report).
        mcq: Per model, per question set, the :class:`MCQScores` with per-question results.
        by_category: One row per model, prompt set and category (a harm, a topic, a kind of
            trap): the marker rule's refusal rate and the three classes, each with its interval.
    """

    table: Any
    comparison: Any
    examples: dict[str, list[dict[str, str]]]
    mcq: dict[str, dict[str, MCQScores]]
    by_category: Any = None


def general_text(n: int | None = None) -> list[str]:
    """The shipped general-text paragraphs (written for this project) used for perplexity."""
    text = resources.files("safesteer_lens").joinpath("prompts/general_text.txt").read_text()
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    return paragraphs[:n] if n else paragraphs


@torch.no_grad()
def perplexity(model: ChatModel, texts: Sequence[str], hooks: Sequence[FwdHook] = (), batch_size: int = 8) -> float:
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


def mean_refusal_score(model: ChatModel, prompts: Sequence[str], hooks: Sequence[FwdHook] = ()) -> float:
    """Mean logit refusal score at the last prompt position."""
    logits = last_token_logits(model, prompts, hooks)
    return float(refusal_score(logits, refusal_token_ids(model.tokenizer, model.family.refusal_openings)).mean())


def _reply_log_probs(
    model: ChatModel, replies: Completions, hooks: Sequence[FwdHook], batch_size: int = 16
) -> list[Float[Tensor, "reply_pos vocab"]]:
    """Log-probs over the vocabulary at each reply position, one tensor per row (masked rows)."""
    logp = teacher_forced_log_probs(model, replies, hooks, batch_size)
    return [row[mask] for row, mask in zip(logp, replies.completion_mask)]


def kl_from_base(subject: Subject, base: ChatModel, base_replies: Completions) -> float:
    """Mean per-token KL(subject || base) over the base model's own replies."""
    ours = _reply_log_probs(subject.model, base_replies, subject.hooks)
    theirs = _reply_log_probs(base, base_replies, [])
    per_token = torch.cat([kl_terms(a, b) for a, b in zip(ours, theirs)])
    return float(per_token.mean()) if per_token.numel() else 0.0


def _judge(judge: Judge, prompts: Sequence[str], replies: Sequence[str]) -> list[Verdict]:
    """The judge's verdicts, checked: a plug-in that returns something else fails here, by name."""
    verdicts = list(judge(prompts, replies))
    if len(verdicts) != len(prompts) or not all(isinstance(v, Verdict) for v in verdicts):
        raise SafeSteerError(f"the judge must return one Verdict per reply (safesteer_lens.judges.Verdict); "
                             f"got {len(verdicts)} items for {len(prompts)} replies")
    return verdicts


def held_out_prompts(kind: Label, n: int, config: EvalConfig) -> list[Prompt]:
    """The ``n`` built-in ``kind`` prompts of ``config.split`` that an evaluation reads."""
    return first_prompts(load_builtin_prompts(kind, config.split), n, config.mix_categories)


def held_out_sets(config: EvalConfig) -> dict[str, list[Prompt]]:
    """Every prompt set an evaluation reads, by set name: harmful, harmless, then the study sets asked for.

    The study sets are always taken kinds (categories) in turn, so a short selection covers
    every kind of trap.
    """
    sets = {"harmful": held_out_prompts("harmful", config.n_harmful, config),
            "harmless": held_out_prompts("harmless", config.n_harmless, config)}
    for name, n in (("lookalike", config.n_lookalike), ("tasks", config.n_tasks)):
        if n:
            sets[name] = first_prompts(load_study_set(name, config.split), n, True)
    return sets


def reply_class_columns(labels: Sequence[ReplyLabel], prefix: str) -> dict[str, float | int]:
    """The three-class measure of one set's replies: full and partial refusals and apology openers, as rates."""
    out: dict[str, float | int] = {}
    out.update(Rate.of(label.kind == "full_refusal" for label in labels).columns(f"{prefix}_full_refusal"))
    out.update(Rate.of(label.kind == "partial_refusal" for label in labels).columns(f"{prefix}_partial_refusal"))
    out.update(Rate.of(label.apology_opener for label in labels).columns(f"{prefix}_apology"))
    return out


def by_category(prompts: Sequence[Prompt], refused: Sequence[bool], labels: Sequence[ReplyLabel],
                model: str, set_name: str) -> list[dict[str, Any]]:
    """One row per category of a set (a kind of trap, a harm): the marker rule and the three classes."""
    rows = []
    for category in dict.fromkeys(p.category for p in prompts):
        picked = [i for i, p in enumerate(prompts) if p.category == category]
        row: dict[str, Any] = {"model": model, "set": set_name, "category": category}
        row.update(Rate.of(refused[i] for i in picked).columns("refusal"))
        row.update(reply_class_columns([labels[i] for i in picked], "reply"))
        rows.append(row)
    return rows


def evaluate_models(
    subjects: Sequence[Subject],
    base: ChatModel,
    config: EvalConfig | None = None,
    extra_sets: dict[str, list[Prompt]] | None = None,
    judge: Judge | None = None,
    mcq_sets: dict[str, list[MCQuestion]] | None = None,
) -> Evaluation:
    """Evaluate each subject on held-out prompts and multiple-choice questions.

    Args:
        subjects: Models to compare (the base model itself can be one of them).
        base: The reference for ``kl_from_base``.
        config: Settings; defaults to :class:`EvalConfig`.
        extra_sets: Named extra prompt lists (e.g. ``{"advbench": load_public_prompts(...)}``);
            harmful ones add a ``<name>_refusal`` column, harmless ones ``<name>_over_refusal``.
        judge: Optional :class:`~safesteer_lens.judges.Judge` (e.g. Llama Guard 3) reading the
            held-out replies; adds the ``judge_*`` columns and the comparison's unsafe flags.
        mcq_sets: Named public question sets (:func:`~safesteer_lens.capability.load_public_mcq`),
            each adding ``<name>_acc`` and ``<name>_acc_norm``.

    Returns:
        An :class:`Evaluation`.
    """
    import pandas

    config = config or EvalConfig()
    names = [s.name for s in subjects]
    if len(set(names)) != len(names):
        raise SafeSteerError(f"subjects need distinct names, got {names}")
    check_prompt_lengths(base, [p for prompts in (extra_sets or {}).values() for p in prompts], config.max_new_tokens)
    if "mcq" in (mcq_sets or {}):
        raise SafeSteerError("'mcq' names the shipped question set; give the public set another name")
    sets = held_out_sets(config)
    texts = {name: [p.prompt for p in prompts] for name, prompts in sets.items()}
    questions = {"mcq": interleave_subjects(load_builtin_mcq(config.split), config.n_mcq)} if config.n_mcq != 0 else {}
    questions.update(mcq_sets or {})
    general = general_text(config.n_general)
    base_replies = generate(base, texts["harmless"][: config.n_kl_prompts], max_new_tokens=config.max_new_tokens)
    comparison = pandas.DataFrame([{"prompt_id": p.id, "label": p.label, "category": p.category, "prompt": p.prompt, "set": name}
                                   for name, prompts in sets.items() for p in prompts])
    examples: dict[str, list[dict[str, str]]] = {name: [{"prompt": p} for p in texts[name][: config.n_examples]]
                                                 for name in texts}
    rows, mcq, categories = [], {}, []
    for subject in subjects:
        every = generate(subject.model, [t for name in sets for t in texts[name]], max_new_tokens=config.max_new_tokens,
                         fwd_hooks=subject.hooks, batch_size=config.batch_size)
        replies, start = {}, 0
        for name in sets:
            replies[name], start = every[start : start + len(texts[name])], start + len(texts[name])
        refused = {name: [is_refusal(t) for t in out.texts] for name, out in replies.items()}
        labels = {name: [classify_reply(t) for t in out.texts] for name, out in replies.items()}
        coherent = {name: coherence(out, subject.model.eot_token_ids) for name, out in replies.items()}
        row: dict[str, float | int | str] = {"model": subject.name}
        for kind in ("harmful", "harmless"):
            row.update(Rate.of(refused[kind]).columns(f"{kind}_refusal"))
        row.update(coherent["harmless"].degenerate.columns("harmless_degenerate"))
        row.update(coherent["harmful"].degenerate.columns("harmful_degenerate"))
        row.update(coherent["harmless"].ended.columns("harmless_ended"))
        row["harmless_reply_tokens"] = coherent["harmless"].mean_tokens
        mcq[subject.name] = {name: score_mcq(subject.model, qs, subject.hooks) for name, qs in questions.items()}
        for name, scores in mcq[subject.name].items():
            row.update(scores.acc.columns(f"{name}_acc"))
            row.update(scores.acc_norm.columns(f"{name}_acc_norm"))
        row["harmful_score"] = mean_refusal_score(subject.model, texts["harmful"], subject.hooks)
        row["harmless_score"] = mean_refusal_score(subject.model, texts["harmless"], subject.hooks)
        row["kl_from_base"] = kl_from_base(subject, base, base_replies)
        row["perplexity"] = perplexity(subject.model, general, subject.hooks)
        for set_name, prompts in (extra_sets or {}).items():
            out = generate(subject.model, [p.prompt for p in prompts], max_new_tokens=config.max_new_tokens,
                           fwd_hooks=subject.hooks)
            harmful_share = sum(p.label == "harmful" for p in prompts) / max(len(prompts), 1)
            column = f"{set_name}_refusal" if harmful_share >= 0.5 else f"{set_name}_over_refusal"
            row.update(Rate.of(map(is_refusal, out.texts)).columns(column))
        for name in sets:  # the study sets' marker-rule rates, then every set's three classes
            if name not in ("harmful", "harmless"):
                row.update(Rate.of(refused[name]).columns(f"{name}_refusal"))
                row.update(coherent[name].degenerate.columns(f"{name}_degenerate"))
        for name in sets:
            row.update(reply_class_columns(labels[name], name))
            categories += by_category(sets[name], refused[name], labels[name], subject.name, name)
        comparison[f"{subject.name}: reply"] = [t.strip() for name in sets for t in replies[name].texts]
        comparison[f"{subject.name}: refused"] = [r for name in sets for r in refused[name]]
        comparison[f"{subject.name}: class"] = [label.kind for name in sets for label in labels[name]]
        comparison[f"{subject.name}: apology"] = [label.apology_opener for name in sets for label in labels[name]]
        comparison[f"{subject.name}: degenerate"] = [f for name in sets for f in coherent[name].degenerate_flags]
        if judge is not None:
            verdicts = {kind: _judge(judge, texts[kind], replies[kind].texts) for kind in ("harmful", "harmless")}
            for kind in ("harmful", "harmless"):  # over the answers the judge's reply could be read as
                parsed = [v.unsafe for v in verdicts[kind] if v.unsafe is not None]
                row.update(Rate.of(parsed).columns(f"judge_{kind}_unsafe"))
            if all(v.refused is not None for v in verdicts["harmless"]):
                row.update(Rate.of(v.refused for v in verdicts["harmless"]).columns("judge_harmless_refused"))
            row["judge_unparsed"] = sum(v.unsafe is None for vs in verdicts.values() for v in vs)
            unjudged = [None] * sum(len(texts[name]) for name in sets if name not in verdicts)  # the study sets
            judged = verdicts["harmful"] + verdicts["harmless"]
            comparison[f"{subject.name}: unsafe"] = [v.unsafe for v in judged] + unjudged
            comparison[f"{subject.name}: categories"] = [",".join(v.categories) for v in judged] + unjudged
        rows.append(row)
        for name in texts:
            for example, text in zip(examples[name], replies[name].texts):
                example[subject.name] = text.strip()
    return Evaluation(pandas.DataFrame(rows).set_index("model"), comparison, examples, mcq, pandas.DataFrame(categories))


REPRESENTATION = "representation.safetensors"  # final-layer states of base, teacher and student (the report's PCA)


@torch.no_grad()
def final_states(model: ChatModel, prompts: list[str], hooks: Sequence[FwdHook]) -> Float[torch.Tensor, "batch d_model"]:
    """Final-layer residual state at the last prompt position."""
    batch = model.tokenize(prompts)
    store: list[torch.Tensor] = []

    def grab(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        store.append(resid[:, -1].float().cpu())
        return resid

    name = f"blocks.{model.n_layers - 1}.hook_resid_post"
    with model.bridge.hooks(fwd_hooks=list(hooks) + [(name, grab)]):
        model.bridge(batch.input_ids, attention_mask=batch.attention_mask)
    return store[0]


def representation_states(models: dict[str, tuple[ChatModel, Sequence[FwdHook]]], n_prompts: int = 32,
                          split: str = "test") -> dict[str, Tensor]:
    """Each model's final-layer state at the last token of the first ``n_prompts`` harmless prompts.

    Args:
        models: Name to (model, hooks): the teacher is the base model with the direction's hooks.
        n_prompts: Harmless prompts of ``split``.
        split: The built-in split (the report's is the evaluation's).
    """
    harmless = prompt_texts(load_builtin_prompts("harmless", split))[:n_prompts]
    return {name: final_states(model, harmless, hooks) for name, (model, hooks) in models.items()}
