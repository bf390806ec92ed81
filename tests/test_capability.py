import json
import math

import pytest
import torch
from lm_eval.api.model import LM

from safesteer_lens.capability import (
    SHIPPED_SUBJECTS, MCQuestion, evaluate_mcq, interleave_subjects, load_builtin_mcq, load_public_mcq, score_mcq,
)
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.steering import add_hooks


def test_the_shipped_set_has_six_subjects_with_fixed_splits():
    questions = load_builtin_mcq()
    assert len(questions) == 240 and len({q.id for q in questions}) == 240
    assert {q.subject for q in questions} == set(SHIPPED_SUBJECTS)
    assert all(sum(q.subject == s for q in questions) == 40 for s in SHIPPED_SUBJECTS)
    assert len(load_builtin_mcq("val")) == 60 and len(load_builtin_mcq("test")) == 180
    assert {q.id for q in load_builtin_mcq("val")}.isdisjoint(q.id for q in load_builtin_mcq("test"))
    assert all(len(q.choices) == 4 and len(set(q.choices)) == 4 for q in questions)
    assert all(q.context.startswith("Question: ") and q.context.endswith("\nAnswer:") for q in questions)


def test_interleaving_covers_every_subject_in_a_short_run():
    first = interleave_subjects(load_builtin_mcq("test"), 12)
    assert [q.subject for q in first[:6]] == list(SHIPPED_SUBJECTS) and len(first) == 12


class FixedLM(LM):
    """An lm-eval LM whose log-likelihoods are written by hand, to check lm-eval's metrics on them."""

    def __init__(self, table):
        super().__init__()
        self.table, self.requests = table, []

    def loglikelihood(self, requests):
        self.requests += [r.args for r in requests]
        return [(self.table[r.args[1]], False) for r in requests]

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        raise NotImplementedError


def test_acc_and_acc_norm_follow_lm_evals_documented_formulas():
    # acc: argmax of summed log-likelihood; acc_norm: argmax of log-likelihood / len(choice) in characters
    lls = {" a": -2.0, " bbbbbbbb": -4.0, " cc": -3.0, " yes": -1.0, " no": -1.5}
    questions = [
        MCQuestion("q1", "s", "Question: one?\nAnswer:", ("a", "bbbbbbbb", "cc"), 1),   # acc picks a, acc_norm bbbbbbbb
        MCQuestion("q2", "s", "Question: two?\nAnswer:", ("yes", "no"), 0),             # both pick yes
        MCQuestion("q3", "s", "Question: three?\nAnswer:", ("cc", "a"), 1),             # acc picks a, acc_norm cc
    ]
    lm = FixedLM(lls)
    scores = evaluate_mcq(lm, questions)
    assert lm.requests[:3] == [("Question: one?\nAnswer:", " a"), ("Question: one?\nAnswer:", " bbbbbbbb"),
                               ("Question: one?\nAnswer:", " cc")]
    # by hand: q1 acc pred 0 (wrong), norm: -2/1, -4/8, -3/2 -> pred 1 (right)
    #          q2 acc pred 0 (right), norm: -1/3, -1.5/2 -> pred 0 (right)
    #          q3 acc pred 1 (right: a), norm: -3/2, -2/1 -> pred 0 (wrong)
    assert list(scores.per_question["correct"]) == [False, True, True]
    assert list(scores.per_question["correct_norm"]) == [True, True, False]
    assert (scores.acc.k, scores.acc.n, scores.acc_norm.k) == (2, 3, 2)


def _direct_loglikelihood(model, context, continuation, hooks=()):
    """lm-eval's recipe written out: encode context+continuation whole, the continuation is the tail."""
    tok = model.tokenizer
    whole = tok(context + continuation)["input_ids"]
    n_ctx = len(tok(context)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=list(hooks)):
        logp = torch.log_softmax(model.bridge(ids).float(), -1)[0]
    return sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))


def test_score_mcq_runs_the_model_through_lm_eval_with_and_without_hooks(tiny):
    questions = load_builtin_mcq("val")[:3]
    plain = score_mcq(tiny, questions)
    for q, lls in zip(questions, plain.per_question["loglikelihoods"]):
        expected = [_direct_loglikelihood(tiny, q.context, " " + c) for c in q.choices]
        assert lls == pytest.approx(expected, abs=1e-3)
        best = max(range(len(lls)), key=lambda j: lls[j])
        assert plain.per_question.set_index("id").loc[q.id, "correct"] == (best == q.answer)
    hooks = add_hooks(tiny, torch.ones(tiny.d_model) * 3, 1)
    steered = score_mcq(tiny, questions, hooks)
    q = questions[0]
    assert steered.per_question["loglikelihoods"][0] == pytest.approx(
        [_direct_loglikelihood(tiny, q.context, " " + c, hooks) for c in q.choices], abs=1e-3)
    assert not math.isclose(steered.per_question["loglikelihoods"][0][0], plain.per_question["loglikelihoods"][0][0])


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_public_sets_map_to_one_schema_in_lm_evals_formats(tmp_path):
    mmlu = _write_jsonl(tmp_path / "mmlu.jsonl", [
        {"question": "What is 2 + 2? ", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1}])
    letters = load_public_mcq("mmlu", mmlu)[0]
    assert letters.context == ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
                               "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert letters.choices == ("A", "B", "C", "D") and letters.answer == 1
    cloze = load_public_mcq("mmlu-continuation", mmlu)[0]
    assert cloze.context.endswith("elementary mathematics.\n\nQuestion: What is 2 + 2?\nAnswer:") and cloze.choices[1] == "4"
    arc = _write_jsonl(tmp_path / "arc.jsonl", [
        {"id": "x", "question": "Which is a mammal?", "choices": {"text": ["shark", "whale", "trout"], "label": ["1", "2", "3"]},
         "answerKey": "2"}])
    q = load_public_mcq("arc-easy", arc)[0]
    assert (q.context, q.choices, q.answer) == ("Question: Which is a mammal?\nAnswer:", ("shark", "whale", "trout"), 1)
    hs = _write_jsonl(tmp_path / "hs.jsonl", [
        {"activity_label": "Baking cookies", "ctx_a": "A woman mixes dough.", "ctx_b": "she", "label": "2",
         "endings": ["eats it [title] now.", "runs away.", "puts it in the oven.", "sings."]}])
    q = load_public_mcq("hellaswag", hs)[0]
    assert q.context == "Baking cookies: A woman mixes dough. She" and q.choices[0] == "eats it. now." and q.answer == 2


def test_a_public_file_without_the_expected_columns_is_a_one_line_error(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi", "answer": 1}])
    with pytest.raises(SafeSteerError, match="missing column.*choices"):
        load_public_mcq("mmlu", bad)
    with pytest.raises(SafeSteerError, match="unknown multiple-choice set"):
        load_public_mcq("gsm8k", bad)
    with pytest.raises(SafeSteerError, match="at least one"):
        evaluate_mcq(FixedLM({}), [])
    with pytest.raises(SafeSteerError, match="answer index"):
        MCQuestion("q", "s", "c", ("a", "b"), 2)


@pytest.mark.integration
def test_the_embedded_model_scores_clearly_above_chance_on_the_shipped_set(embedded):
    scores = score_mcq(embedded, interleave_subjects(load_builtin_mcq("val"), 60))
    assert scores.acc.n == 60 and scores.acc.low > 0.25  # 4 options: chance is 25%


def test_a_limit_takes_subjects_in_turn_and_letters_name_answers(tmp_path):
    rows = [{"question": f"q{i}", "subject": "algebra" if i < 5 else "biology", "choices": ["w", "x", "y", "z"],
             "answer": "B"} for i in range(10)]
    questions = load_public_mcq("mmlu-continuation", _write_jsonl(tmp_path / "m.jsonl", rows), limit=4)
    assert [q.subject for q in questions] == ["algebra", "biology", "algebra", "biology"]
    assert all(q.answer == 1 for q in questions)


def test_mcq_specs_name_each_set_once(tmp_path):
    from safesteer_lens.capability import parse_mcq_specs

    path = _write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": 0}])
    assert list(parse_mcq_specs([f"MMLU={path}"])) == ["mmlu"]
    with pytest.raises(SafeSteerError, match="twice"):
        parse_mcq_specs([f"mmlu={path}", f"mmlu={path}"])


def test_a_hub_set_offline_says_to_pass_a_local_file():
    with pytest.raises(SafeSteerError, match="could not fetch arc-easy from the hub.*--mcq arc-easy=FILE"):
        load_public_mcq("arc-easy")  # the tests run with HF_HUB_OFFLINE=1
