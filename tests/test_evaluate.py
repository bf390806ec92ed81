from __future__ import annotations

import math

import pytest
import torch

from safesteer_lens.data import Prompt
from safesteer_lens.evaluate import EvalConfig, Subject, evaluate_models, general_text, kl_from_base, perplexity
from safesteer_lens.generation import generate
from safesteer_lens.steering import add_hooks

SMALL = EvalConfig(n_harmful=3, n_harmless=3, max_new_tokens=4, n_kl_prompts=2, n_general=2, n_examples=2)


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


def test_table_has_a_row_per_model_and_judge_and_extra_columns(tiny):
    judge_calls = []

    def judge(prompts, replies):
        judge_calls.append(len(prompts))
        return [True] * len(prompts)

    extra = {"advbench": [Prompt("a-0", "Do a bad thing", "harmful")]}
    subjects = [Subject("base", tiny), Subject("steered", tiny, add_hooks(tiny, torch.ones(tiny.d_model) * 3, 1))]
    table, examples = evaluate_models(subjects, tiny, SMALL, extra_sets=extra, judge=judge)
    assert list(table.index) == ["base", "steered"]
    assert {"harmful_refusal", "harmless_refusal", "kl_from_base", "perplexity", "advbench_refusal",
            "judge_harmful_refusal", "judge_harmless_refusal"} <= set(table.columns)
    assert table.loc["base", "judge_harmful_refusal"] == 1.0 and judge_calls == [3, 3, 3, 3]
    assert table.loc["base", "kl_from_base"] == pytest.approx(0.0, abs=1e-6)
    assert set(examples["harmful"][0]) == {"prompt", "base", "steered"}
