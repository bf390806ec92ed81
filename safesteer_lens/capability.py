"""Capability: multiple-choice accuracy scored by lm-evaluation-harness, offline.

What SafeSteer must not cost is general capability. This module measures it the way the field
does, with lm-evaluation-harness (``lm_eval``) itself: its ``HFLM`` computes each option's
log-likelihood as a continuation of the question, and its multiple-choice task computes

* ``acc``: the option with the highest summed log-likelihood is the prediction;
* ``acc_norm``: the same after dividing each log-likelihood by the option's length in
  characters (``len(choice)``, the target delimiter not counted).

lm-eval runs offline here because the questions reach it as an in-memory dataset
(``custom_dataset``) and the model as a loaded ``HFLM``; nothing is downloaded. A steered
teacher is scored under its hooks, which fire inside the Hugging Face model the bridge wraps.

Every question, whatever its source, becomes one :class:`MCQuestion`: the full text the options
continue (``context``, including any instruction line), the options, and the index of the right
one. Sources:

* the shipped set (``safesteer_lens/prompts/mcq.jsonl``), written for this project: 240 easy
  questions in 6 subjects, with fixed validation and test splits;
* public sets by hub id or local file: MMLU (lm-eval's letter format, ``mmlu``, and its cloze
  variant, ``mmlu-continuation``), ARC-Easy, ARC-Challenge and HellaSwag, each formatted as
  lm-eval's own task formats it.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

from safesteer_lens.data import LOCAL_FORMATS, groups_in_turn, read_hub_rows, read_rows
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.generation import FwdHook
from safesteer_lens.models import ChatModel
from safesteer_lens.stats import Rate

SHIPPED_SUBJECTS: tuple[str, ...] = (
    "science", "arithmetic", "commonsense", "geography_history", "word_meaning", "code_reading",
)


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question in the form lm-eval scores.

    Attributes:
        id: Stable identifier (``science-07``, ``arc-easy-12``...).
        subject: Subject or category.
        context: The text each option continues, e.g. ``"Question: ...\\nAnswer:"``.
        choices: The options, without the leading space lm-eval adds as target delimiter.
        answer: Index of the right option.
        split: ``"val"`` or ``"test"``.
        source: ``builtin`` or the public set's name.
    """

    id: str
    subject: str
    context: str
    choices: tuple[str, ...]
    answer: int
    split: str = "test"
    source: str = "builtin"

    def __post_init__(self) -> None:
        if len(self.choices) < 2 or not 0 <= self.answer < len(self.choices):
            raise SafeSteerError(
                f"question {self.id} needs at least 2 choices and an answer index among them "
                f"(got {len(self.choices)} choices, answer {self.answer})"
            )


def cloze_context(question: str) -> str:
    """ARC's format in lm-eval: the options continue ``Question: ...\\nAnswer:``."""
    return f"Question: {question.strip()}\nAnswer:"


def load_builtin_mcq(split: str | None = None, subjects: Sequence[str] | None = None) -> list[MCQuestion]:
    """The shipped question set, optionally one split (``val`` or ``test``) and some subjects."""
    if split not in (None, "val", "test"):
        raise SafeSteerError(f"unknown split {split!r} for the shipped questions: use 'val' or 'test'")
    unknown = set(subjects or ()) - set(SHIPPED_SUBJECTS)
    if unknown:
        raise SafeSteerError(f"unknown subject(s) {', '.join(sorted(unknown))}: use {', '.join(SHIPPED_SUBJECTS)}")
    text = resources.files("safesteer_lens").joinpath("prompts/mcq.jsonl").read_text()
    out = []
    for line in text.splitlines():
        row = json.loads(line)
        if (split is None or row["split"] == split) and (not subjects or row["subject"] in subjects):
            out.append(MCQuestion(row["id"], row["subject"], cloze_context(row["question"].strip()), tuple(row["choices"]),
                                  int(row["answer"]), row["split"]))
    return out


def interleave_subjects(questions: Sequence[MCQuestion], n: int | None) -> list[MCQuestion]:
    """The first ``n`` questions taking subjects in turn, so a short run covers every subject."""
    return groups_in_turn(questions, lambda q: q.subject, n)


# --------------------------------------------------------------- public sets
def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up: WikiHow's bracketed artefacts go, double spaces close."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _as_list(value: Any) -> Any:
    """A list or dict column that a CSV file stores as its Python/JSON text."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return json.loads(value)
    return value


def _mmlu(row: dict, i: int, name: str) -> MCQuestion:
    """MMLU as lm-eval's ``mmlu`` (letters) or ``mmlu_continuation`` (cloze) task prompts it, zero-shot."""
    subject = str(row["subject"])
    choices = [str(c) for c in _as_list(row["choices"])]
    if len(choices) != 4:
        raise SafeSteerError(f"{name} row {i} has {len(choices)} choices; MMLU rows need 4 (check the choices column)")
    answer = row["answer"]
    answer = ("A", "B", "C", "D").index(answer) if answer in ("A", "B", "C", "D") else int(answer)
    topic = subject.replace("_", " ")
    if name == "mmlu":
        context = (f"The following are multiple choice questions (with answers) about {topic}.\n\n"
                   f"{str(row['question']).strip()}\n" + "".join(f"{letter}. {c}\n" for letter, c in zip("ABCD", choices))
                   + "Answer:")
        return MCQuestion(f"{name}-{i}", subject, context, ("A", "B", "C", "D"), answer, "test", name)
    context = f"The following are questions (with answers) about {topic}.\n\n" + cloze_context(str(row["question"]).strip())
    return MCQuestion(f"{name}-{i}", subject, context, tuple(choices), answer, "test", name)


def _arc(row: dict, i: int, name: str) -> MCQuestion:
    """ARC as lm-eval's ``arc_easy``/``arc_challenge`` prompt it: cloze over the choices' texts."""
    choices = _as_list(row["choices"])
    labels, texts = list(choices["label"]), [str(t) for t in choices["text"]]
    return MCQuestion(f"{name}-{i}", name, cloze_context(str(row["question"])), tuple(texts),
                      labels.index(str(row["answerKey"])), "test", name)


def _hellaswag(row: dict, i: int, name: str) -> MCQuestion:
    """HellaSwag as lm-eval's ``hellaswag`` task prompts it (its ``process_docs``)."""
    ctx = f"{row['ctx_a']} {str(row.get('ctx_b') or '').capitalize()}"
    context = _hellaswag_preprocess(f"{row['activity_label']}: {ctx}")
    endings = [_hellaswag_preprocess(str(e)) for e in _as_list(row["endings"])]
    return MCQuestion(f"{name}-{i}", str(row["activity_label"]), context, tuple(endings), int(row["label"]), "test", name)


@dataclass(frozen=True)
class PublicMCQ:
    """Where a public multiple-choice set lives on the hub and how its rows map to :class:`MCQuestion`."""

    hub_id: str
    hub_config: str | None
    hub_split: str
    columns: tuple[str, ...]
    convert: Callable[[dict, int, str], MCQuestion]


PUBLIC_MCQ: dict[str, PublicMCQ] = {
    "mmlu": PublicMCQ("cais/mmlu", "all", "test", ("question", "subject", "choices", "answer"), _mmlu),
    "mmlu-continuation": PublicMCQ("cais/mmlu", "all", "test", ("question", "subject", "choices", "answer"), _mmlu),
    "arc-easy": PublicMCQ("allenai/ai2_arc", "ARC-Easy", "test", ("question", "choices", "answerKey"), _arc),
    "arc-challenge": PublicMCQ("allenai/ai2_arc", "ARC-Challenge", "test", ("question", "choices", "answerKey"), _arc),
    "hellaswag": PublicMCQ("Rowan/hellaswag", None, "validation",
                           ("activity_label", "ctx_a", "ctx_b", "endings", "label"), _hellaswag),
}


def load_public_mcq(name: str, source: str | Path | None = None, limit: int | None = None) -> list[MCQuestion]:
    """Load a public multiple-choice set by hub id (default) or from a local file.

    Args:
        name: ``mmlu``, ``mmlu-continuation``, ``arc-easy``, ``arc-challenge`` or ``hellaswag``.
        source: A local json/jsonl/csv/parquet file with the hub version's columns (MMLU:
            question, choices, answer; ARC: question, choices {text, label}, answerKey;
            HellaSwag: activity_label, ctx_a, ctx_b, endings, label), or a hub id overriding
            the default. None uses the default hub id (needs the network).
        limit: Keep at most this many questions, taking subjects in turn (MMLU's rows are
            sorted by subject, so the first rows would be one subject).
    """
    key = name.lower()
    if key not in PUBLIC_MCQ:
        raise SafeSteerError(f"unknown multiple-choice set {name!r}: use one of {', '.join(PUBLIC_MCQ)}")
    if limit is not None and limit < 1:
        raise SafeSteerError(f"limit must be at least 1, got {limit}")
    spec = PUBLIC_MCQ[key]
    if source is not None and Path(source).suffix.lower() in LOCAL_FORMATS:
        rows = read_rows(Path(source))
    else:
        rows = read_hub_rows(str(source) if source else spec.hub_id, spec.hub_config, spec.hub_split, key,
                             f"--mcq {key}=FILE.parquet")
    missing = [c for c in spec.columns if c not in rows[0]]
    if missing:
        raise SafeSteerError(
            f"{source or spec.hub_id} is not {key} data: missing column(s) {', '.join(missing)} "
            f"(found {', '.join(rows[0])}); {key} needs {', '.join(spec.columns)}"
        )
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(spec.convert(row, i, key))
        except (KeyError, ValueError, TypeError, SyntaxError) as exc:
            raise SafeSteerError(f"{key} row {i} of {source or spec.hub_id} cannot be read ({exc}); "
                                 f"check that its columns hold what {key} holds") from exc
    return interleave_subjects(out, limit)


def parse_mcq_specs(specs: Sequence[str], limit: int | None = None) -> dict[str, list[MCQuestion]]:
    """``NAME=FILE_OR_HUB_ID`` specs (``--mcq``; a bare NAME uses the default hub id), one set per name."""
    sets: dict[str, list[MCQuestion]] = {}
    for spec in specs:
        name, _, source = spec.partition("=")
        name = name.lower()
        if name in sets:
            raise SafeSteerError(f"--mcq names {name} twice; give each public set once")
        sets[name] = load_public_mcq(name, source or None, limit)
    return sets


# --------------------------------------------------------------- scoring
@dataclass
class MCQScores:
    """Accuracy on a set of questions.

    Attributes:
        acc: Share answered right by summed log-likelihood.
        acc_norm: Share answered right by log-likelihood per character.
        per_question: A pandas table, one row per question: ``id``, ``subject``, ``source``,
            ``answer``, ``correct``, ``correct_norm`` and the options' log-likelihoods
            (``loglikelihoods``, as lm-eval computed them).
    """

    acc: Rate
    acc_norm: Rate
    per_question: Any

    def by_subject(self) -> Any:
        """Accuracy per subject (pandas)."""
        return self.per_question.groupby("subject")[["correct", "correct_norm"]].mean()


def score_mcq(
    model: ChatModel,
    questions: Sequence[MCQuestion],
    hooks: Sequence[FwdHook] = (),
    batch_size: int = 16,
) -> MCQScores:
    """Score ``questions`` with lm-evaluation-harness's ``HFLM``, under ``hooks`` (e.g. the teacher's).

    Args:
        model: The model; its wrapped Hugging Face model goes to lm-eval's ``HFLM``.
        questions: The questions (see :func:`load_builtin_mcq`, :func:`load_public_mcq`).
        hooks: Forward hooks active while lm-eval runs the model.
        batch_size: lm-eval's batch size for log-likelihood requests.
    """
    from lm_eval.models.huggingface import HFLM

    _quiet_lm_eval()
    lm = HFLM(pretrained=model.hf_model, tokenizer=model.tokenizer, batch_size=batch_size)
    with model.bridge.hooks(fwd_hooks=list(hooks)):
        return evaluate_mcq(lm, questions)


def evaluate_mcq(lm: Any, questions: Sequence[MCQuestion]) -> MCQScores:
    """Run ``questions`` as one lm-eval multiple-choice task on any lm-eval ``LM``.

    The task is lm-eval's own ``ConfigurableTask`` over an in-memory dataset, so requests
    (``context`` and ``" " + choice``), tokenisation and the ``acc``/``acc_norm`` metrics are
    lm-eval's, not re-implemented here.
    """
    if not questions:
        raise SafeSteerError("no questions to score: pass at least one MCQuestion (e.g. load_builtin_mcq('test'))")
    import datasets
    import pandas
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    _quiet_lm_eval()
    rows = [{**asdict(q), "choices": list(q.choices)} for q in questions]
    task = {
        "task": "safesteer_mcq",
        "custom_dataset": lambda **_: datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}),
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": lambda doc: doc["context"],
        "doc_to_choice": lambda doc: doc["choices"],
        "doc_to_target": lambda doc: doc["answer"],
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }
    tasks = get_task_dict([task], TaskManager(include_defaults=False, verbosity="ERROR"))
    result = evaluate(lm, tasks, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    table = []
    for sample in sorted(result["samples"]["safesteer_mcq"], key=lambda s: s["doc_id"]):
        q = questions[sample["doc_id"]]
        lls = [float(r[0][0]) for r in sample["resps"]]
        table.append({"id": q.id, "subject": q.subject, "source": q.source, "answer": q.answer,
                      "correct": bool(sample["acc"]), "correct_norm": bool(sample["acc_norm"]), "loglikelihoods": lls})
    frame = pandas.DataFrame(table)
    return MCQScores(Rate.of(frame["correct"]), Rate.of(frame["correct_norm"]), frame)


def _quiet_lm_eval() -> None:
    """lm-eval logs every task's set-up at INFO/WARNING; the toolkit's own progress is enough."""
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
