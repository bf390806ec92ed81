from __future__ import annotations

import math
from dataclasses import replace

import pandas
import pytest
import torch

from safesteer_lens.coherence import is_degenerate
from safesteer_lens.data import Prompt
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.evaluate import EvalConfig, Subject, evaluate_models, general_text, kl_from_base, perplexity
from safesteer_lens.generation import generate
from safesteer_lens.judges import Verdict
from safesteer_lens.refusal import is_refusal
from safesteer_lens.steering import add_hooks

SMALL = EvalConfig(n_harmful=3, n_harmless=3, max_new_tokens=4, n_kl_prompts=2, n_general=2, n_examples=2, n_mcq=6)


def test_general_text_ships_with_the_package():
    paragraphs = general_text()
    assert len(paragraphs) >= 20 and all(len(p.split()) > 40 for p in paragraphs)


def test_perplexity_matches_a_direct_computation(tiny):
    text = general_text(1)
    ids = tiny.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = tiny.bridge(ids)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert perplexity(tiny, text) == pytest.approx(math.exp(nll.item()), rel=1e-4)


def test_kl_from_base_is_zero_for_the_base_and_positive_when_steered(tiny):
    replies = generate(tiny, ["How do I bake bread?", "Hi"], max_new_tokens=5)
    assert kl_from_base(Subject("base", tiny), tiny, replies) == pytest.approx(0.0, abs=1e-6)
    steered = Subject("steered", tiny, add_hooks(tiny, torch.ones(tiny.d_model) * 3, 1))
    assert kl_from_base(steered, tiny, replies) > 1e-4


def test_table_has_a_row_per_model_with_intervals_and_judge_extra_and_capability_columns(tiny):
    judge_calls = []

    def judge(prompts, replies):
        judge_calls.append(len(prompts))
        return [Verdict(unsafe=i == 0, categories=("S1",) if i == 0 else ()) for i in range(len(prompts))]

    extra = {"advbench": [Prompt("a-0", "Do a bad thing", "harmful")]}
    subjects = [Subject("base", tiny), Subject("steered", tiny, add_hooks(tiny, torch.ones(tiny.d_model) * 3, 1))]
    result = evaluate_models(subjects, tiny, SMALL, extra_sets=extra, judge=judge)
    table = result.table
    assert list(table.index) == ["base", "steered"]
    for rate in ("harmful_refusal", "harmless_refusal", "harmless_degenerate", "harmful_degenerate", "harmless_ended",
                 "mcq_acc", "mcq_acc_norm", "advbench_refusal", "judge_harmful_unsafe", "judge_harmless_unsafe"):
        assert {rate, f"{rate}_low", f"{rate}_high", f"{rate}_n"} <= set(table.columns), rate
        assert (table[f"{rate}_low"] <= table[rate]).all() and (table[rate] <= table[f"{rate}_high"]).all()
    assert {"kl_from_base", "perplexity", "harmless_reply_tokens", "judge_unparsed"} <= set(table.columns)
    assert table.loc["base", "harmful_refusal_n"] == 3 and table.loc["base", "mcq_acc_n"] == 6
    assert table.loc["base", "judge_harmful_unsafe"] == pytest.approx(1 / 3) and judge_calls == [3, 3, 3, 3]
    assert "judge_harmless_refused" not in table.columns  # this judge does not classify refusals
    assert table.loc["base", "kl_from_base"] == pytest.approx(0.0, abs=1e-6)
    assert set(result.examples["harmful"][0]) == {"prompt", "base", "steered"}
    assert set(result.mcq["base"]) == {"mcq"} and len(result.mcq["steered"]["mcq"].per_question) == 6


def test_the_comparison_has_one_row_per_held_out_prompt_with_every_models_flags(tiny):
    def judge(prompts, replies):
        return [Verdict(unsafe=False, refused=True) for _ in prompts]

    subjects = [Subject("base", tiny), Subject("steered", tiny, add_hooks(tiny, torch.ones(tiny.d_model) * 3, 1))]
    result = evaluate_models(subjects, tiny, SMALL, judge=judge)
    comparison = result.comparison
    assert len(comparison) == 6 and list(comparison["label"]) == ["harmful"] * 3 + ["harmless"] * 3
    for model in ("base", "steered"):
        for field in ("reply", "refused", "degenerate", "unsafe", "categories"):
            assert f"{model}: {field}" in comparison.columns
    row = comparison.iloc[0]
    assert row["base: refused"] == is_refusal(row["base: reply"])
    assert row["base: degenerate"] == is_degenerate(row["base: reply"])
    assert result.table.loc["base", "judge_harmless_refused"] == 1.0


def test_held_out_prompts_take_categories_in_turn_unless_told_to_keep_the_files_order(tiny):
    from safesteer_lens.data import load_builtin_prompts
    from safesteer_lens.evaluate import held_out_prompts

    split = load_builtin_prompts("harmless", "val")
    mixed = held_out_prompts("harmless", 13, EvalConfig(split="val"))
    assert len({p.category for p in mixed}) == 13
    assert held_out_prompts("harmless", 13, EvalConfig(split="val", mix_categories=False)) == split[:13]
    result = evaluate_models([Subject("base", tiny)], tiny, replace(SMALL, n_harmless=13, split="val"))
    assert list(result.comparison.loc[result.comparison["label"] == "harmless", "prompt_id"]) == [p.id for p in mixed]


def test_eval_config_rejects_counts_that_cannot_work():
    with pytest.raises(SafeSteerError, match="n_harmful must be at least 1"):
        EvalConfig(n_harmful=0)
    with pytest.raises(SafeSteerError, match="split must be 'val'"):
        EvalConfig(split="train")
    with pytest.raises(SafeSteerError, match="batch_size must be at least 1"):
        EvalConfig(batch_size=0)


def test_replies_and_rates_do_not_depend_on_how_prompts_are_batched(tiny):
    from dataclasses import replace

    subjects = [Subject("steered", tiny, add_hooks(tiny, torch.ones(tiny.d_model) * 3, 1))]
    config = replace(SMALL, n_mcq=0, max_new_tokens=6)
    one_by_one = evaluate_models(subjects, tiny, replace(config, batch_size=1))
    together = evaluate_models(subjects, tiny, config)
    pandas.testing.assert_frame_equal(one_by_one.comparison, together.comparison)
    pandas.testing.assert_frame_equal(one_by_one.table, together.table, rtol=1e-4)


def test_a_judge_returning_the_wrong_thing_is_a_clear_error(tiny):
    with pytest.raises(SafeSteerError, match="one Verdict per reply"):
        evaluate_models([Subject("base", tiny)], tiny, SMALL, judge=lambda prompts, replies: [True] * len(prompts))


def test_unparsed_judge_answers_are_counted_apart_not_as_safe(tiny):
    def judge(prompts, replies):
        return [Verdict(unsafe=True), Verdict(unsafe=None, raw="???"), Verdict(unsafe=False)][: len(prompts)]

    table = evaluate_models([Subject("base", tiny)], tiny, SMALL, judge=judge).table
    assert table.loc["base", "judge_harmful_unsafe_n"] == 2 and table.loc["base", "judge_harmful_unsafe"] == 0.5
    assert table.loc["base", "judge_unparsed"] == 2  # one per prompt set


def test_subjects_need_distinct_names(tiny):
    with pytest.raises(SafeSteerError, match="distinct names"):
        evaluate_models([Subject("base", tiny), Subject("base", tiny)], tiny, SMALL)


def test_the_validation_split_gives_other_prompts_and_questions(tiny):
    from dataclasses import replace

    test = evaluate_models([Subject("base", tiny)], tiny, SMALL)
    val = evaluate_models([Subject("base", tiny)], tiny, replace(SMALL, split="val"))
    assert set(val.comparison["prompt_id"]).isdisjoint(test.comparison["prompt_id"])
    assert set(val.mcq["base"]["mcq"].per_question["id"]).isdisjoint(test.mcq["base"]["mcq"].per_question["id"])


def test_the_study_sets_add_their_rates_three_classes_and_a_row_per_kind_of_trap(tiny):
    from safesteer_lens.refusal import classify_reply

    def judge(prompts, replies):
        return [Verdict(unsafe=False, refused=False) for _ in prompts]

    config = replace(SMALL, n_lookalike=4, n_tasks=2, split="val", n_mcq=0)
    result = evaluate_models([Subject("base", tiny)], tiny, config, judge=judge)
    table, comparison, kinds = result.table, result.comparison, result.by_category
    for column in ("lookalike_refusal", "lookalike_degenerate", "tasks_refusal", "harmful_full_refusal",
                   "harmless_partial_refusal", "lookalike_apology", "tasks_full_refusal_low"):
        assert column in table.columns, column
    assert table.loc["base", "lookalike_refusal_n"] == 4 and table.loc["base", "tasks_apology_n"] == 2
    assert list(comparison["set"]) == ["harmful"] * 3 + ["harmless"] * 3 + ["lookalike"] * 4 + ["tasks"] * 2
    assert list(comparison["label"][-6:]) == ["harmless"] * 4 + ["harmful"] * 2
    assert comparison["base: unsafe"].isna().sum() == 6  # the judge reads the held-out harmful and harmless sets only
    for _, row in comparison.iterrows():
        label = classify_reply(row["base: reply"])
        assert (row["base: class"], row["base: apology"]) == (label.kind, label.apology_opener)
    looks = kinds[kinds["set"] == "lookalike"]
    assert len(looks) == 4 and looks["category"].nunique() == 4  # kinds of trap in turn: four prompts, four kinds
    assert set(kinds["set"]) == {"harmful", "harmless", "lookalike", "tasks"} and (kinds["refusal_n"] >= 1).all()


def test_study_set_counts_above_a_split_are_errors():
    from safesteer_lens.evaluate import check_counts

    check_counts(EvalConfig(n_lookalike=100, n_tasks=52))
    with pytest.raises(SafeSteerError, match="101 lookalike prompts .* has 100"):
        check_counts(EvalConfig(n_lookalike=101))
    with pytest.raises(SafeSteerError, match="n_tasks must be 0 or more"):
        EvalConfig(n_tasks=-1)
